//! Configuration: a strict reader (`RawConfig::from_json`: unknown fields and wrong types are
//! errors naming the field, like `sluice_core::config::parse_json_config`) then validation
//! (`Config::try_from`).
//!
//! The reader walks a `serde_json::Value` by hand instead of deriving `Deserialize`: the
//! derived visitors (wrapped for field paths) cost ~100 KiB of wasm, a third of the budget.

use serde_json::{Map, Value};
use sluice_core::config::{json_kind, parse_duration, validate_header_name, ConfigError, FailureMode};
use std::collections::BTreeMap;
use std::time::Duration;

/// Filter name used in logs and error messages.
pub const FILTER: &str = "token-ratelimit";

/// The JSON document in the plugin's `configuration`.
#[derive(Debug, Default)]
pub struct RawConfig {
    /// `local` (shared-data counters in this Envoy) or `rls` (Envoy's rate-limit service).
    pub mode: Option<String>,
    /// What to do when counters cannot be read or the RLS does not answer.
    pub failure_mode: Option<FailureMode>,
    /// Report decisions without refusing.
    pub shadow: bool,
    /// Header naming the user when the auth filter left no `sluice.user`.
    pub user_header: Option<String>,
    /// Header naming the team when the auth filter left no `sluice.team`.
    pub team_header: Option<String>,
    /// Output tokens reserved when the request sets no `max_tokens`/`max_completion_tokens`.
    pub default_output_tokens: Option<u64>,
    /// Upper bound on the output reservation (a larger `max_tokens` is capped to it).
    pub max_output_tokens: Option<u64>,
    /// Largest request body read (bytes); larger bodies get 413.
    pub max_body_bytes: Option<usize>,
    /// Largest non-streaming response body kept for reading its usage (bytes).
    pub max_response_bytes: Option<usize>,
    /// Route-metadata key (namespace `sluice`) naming a route's rule set.
    pub route_metadata_key: Option<String>,
    /// Rule set for routes whose metadata names none; absent = no limits there.
    pub default_rule_set: Option<String>,
    /// Named rule sets.
    pub rule_sets: BTreeMap<String, Vec<RawRule>>,
    /// Shared-mode settings.
    pub rls: Option<RawRls>,
    /// CAS attempts per counter update before the failure mode applies.
    pub cas_retries: Option<u32>,
    /// Most distinct counters kept in local mode.
    pub max_counters: Option<usize>,
    /// How often stale counters are emptied (local mode).
    pub cleanup_interval: Option<Duration>,
}

/// One rule as written.
#[derive(Debug, Default)]
pub struct RawRule {
    /// Rule name (shows in errors, metrics, filter state).
    pub name: String,
    /// Key parts: `user`, `team`, `api_key`, `route`, `model`, `header:<name>`.
    pub key: Vec<String>,
    /// `input_tokens`, `output_tokens`, `total_tokens` or `requests`.
    pub count: String,
    /// Windows, each with its limit.
    pub windows: Vec<RawWindow>,
}

/// One window as written.
#[derive(Debug, Default)]
pub struct RawWindow {
    /// `second`, `minute`, `hour`, `day`, or a duration like `"10s"` (local mode only).
    pub window: String,
    /// Most units counted in one window.
    pub limit: u64,
}

/// Shared-mode settings as written.
#[derive(Debug, Default)]
pub struct RawRls {
    /// Envoy cluster of the rate-limit service (HTTP/2).
    pub cluster: String,
    /// RLS domain.
    pub domain: Option<String>,
    /// Call timeout.
    pub timeout: Option<Duration>,
}

/// A JSON object being read strictly: every key must be known; errors carry the field path.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn wrong(path: &str, v: &Value, want: &str) -> ConfigError {
    ConfigError::new(
        if path.is_empty() { "." } else { path },
        format!("invalid type: {}, expected {want}", json_kind(v)),
    )
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: String, allowed: &[&str]) -> Result<Self, ConfigError> {
        let Value::Object(map) = v else { return Err(wrong(&path, v, "an object")) };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ConfigError::new(
                join(&path, k),
                format!(
                    "unknown field `{k}`, expected one of {}",
                    allowed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(Self { map, path })
    }

    /// The value of `key`, absent when missing or `null`.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(wrong(&self.path(key), v, "a string")),
        }
    }

    fn req_string(&self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or_else(|| ConfigError::new(self.path.clone(), format!("missing field `{key}`")))
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| wrong(&self.path(key), v, "a non-negative integer")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(&self.path(key), v, "a boolean")),
        }
    }

    fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.string(key)?.map(|s| parse_duration(&s).map_err(|e| ConfigError::new(self.path(key), e))).transpose()
    }

    fn array(&self, key: &str) -> Result<&'a [Value], ConfigError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a.as_slice()),
            Some(v) => Err(wrong(&self.path(key), v, "an array")),
        }
    }
}

impl RawConfig {
    /// Read the plugin configuration strictly. Empty configuration reads as `{}`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
        let v: Value = serde_json::from_slice(text).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            ConfigError::new(".", format!("invalid JSON: {msg}"))
        })?;
        let o = Obj::new(
            &v,
            String::new(),
            &[
                "mode",
                "failure_mode",
                "shadow",
                "user_header",
                "team_header",
                "default_output_tokens",
                "max_output_tokens",
                "max_body_bytes",
                "max_response_bytes",
                "route_metadata_key",
                "default_rule_set",
                "rule_sets",
                "rls",
                "cas_retries",
                "max_counters",
                "cleanup_interval",
            ],
        )?;
        let failure_mode = match o.string("failure_mode")?.as_deref() {
            None => None,
            Some("allow") => Some(FailureMode::Allow),
            Some("deny") => Some(FailureMode::Deny),
            Some(other) => {
                return Err(ConfigError::new(
                    "failure_mode",
                    format!("unknown variant `{other}`, expected `allow` or `deny`"),
                ))
            }
        };
        let usize_of = |key: &str| -> Result<Option<usize>, ConfigError> {
            o.uint(key)?.map(|n| usize::try_from(n).map_err(|_| ConfigError::new(key, "too large"))).transpose()
        };
        let mut rule_sets = BTreeMap::new();
        if let Some(sets) = o.get("rule_sets") {
            let Value::Object(sets) = sets else { return Err(wrong("rule_sets", sets, "an object")) };
            for (name, rules) in sets {
                let path = format!("rule_sets.{name}");
                let Value::Array(rules) = rules else { return Err(wrong(&path, rules, "an array")) };
                let mut out = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    out.push(RawRule::read(r, format!("{path}[{i}]"))?);
                }
                rule_sets.insert(name.clone(), out);
            }
        }
        let rls = match o.get("rls") {
            None => None,
            Some(v) => {
                let r = Obj::new(v, "rls".into(), &["cluster", "domain", "timeout"])?;
                Some(RawRls {
                    cluster: r.req_string("cluster")?,
                    domain: r.string("domain")?,
                    timeout: r.duration("timeout")?,
                })
            }
        };
        Ok(RawConfig {
            mode: o.string("mode")?,
            failure_mode,
            shadow: o.boolean("shadow")?.unwrap_or(false),
            user_header: o.string("user_header")?,
            team_header: o.string("team_header")?,
            default_output_tokens: o.uint("default_output_tokens")?,
            max_output_tokens: o.uint("max_output_tokens")?,
            max_body_bytes: usize_of("max_body_bytes")?,
            max_response_bytes: usize_of("max_response_bytes")?,
            route_metadata_key: o.string("route_metadata_key")?,
            default_rule_set: o.string("default_rule_set")?,
            rule_sets,
            rls,
            cas_retries: o
                .uint("cas_retries")?
                .map(|n| u32::try_from(n).map_err(|_| ConfigError::new("cas_retries", "too large")))
                .transpose()?,
            max_counters: usize_of("max_counters")?,
            cleanup_interval: o.duration("cleanup_interval")?,
        })
    }
}

impl RawRule {
    fn read(v: &Value, path: String) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, &["name", "key", "count", "windows"])?;
        let mut key = Vec::new();
        for (i, k) in o.array("key")?.iter().enumerate() {
            match k {
                Value::String(s) => key.push(s.clone()),
                other => return Err(wrong(&format!("{}[{i}]", o.path("key")), other, "a string")),
            }
        }
        let mut windows = Vec::new();
        for (i, w) in o.array("windows")?.iter().enumerate() {
            let wo = Obj::new(w, format!("{}[{i}]", o.path("windows")), &["window", "limit"])?;
            let limit = wo.uint("limit")?.ok_or_else(|| ConfigError::new(wo.path.clone(), "missing field `limit`"))?;
            windows.push(RawWindow { window: wo.req_string("window")?, limit });
        }
        if o.get("windows").is_none() {
            return Err(ConfigError::new(o.path.clone(), "missing field `windows`"));
        }
        Ok(RawRule { name: o.req_string("name")?, key, count: o.req_string("count")?, windows })
    }
}

/// Where counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Proxy-wasm shared data in this Envoy process.
    Local,
    /// An Envoy rate-limit service (gRPC `ShouldRateLimit`).
    Rls(RlsConfig),
}

/// Shared-mode settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsConfig {
    /// Envoy cluster name.
    pub cluster: String,
    /// RLS domain.
    pub domain: String,
    /// Call timeout.
    pub timeout: Duration,
}

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// `sluice.user` filter state, else the `user_header`.
    User,
    /// `sluice.team` filter state, else the `team_header`.
    Team,
    /// A hash of the bearer token / `x-api-key` (never the key itself).
    ApiKey,
    /// Envoy's route name.
    Route,
    /// The model in the request body (or `sluice.model`).
    Model,
    /// A request header.
    Header(String),
}

impl KeyPart {
    /// The name used in descriptors and counter keys.
    pub fn name(&self) -> String {
        match self {
            Self::User => "user".into(),
            Self::Team => "team".into(),
            Self::ApiKey => "api_key".into(),
            Self::Route => "route".into(),
            Self::Model => "model".into(),
            Self::Header(h) => format!("header:{h}"),
        }
    }
}

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Prompt tokens.
    InputTokens,
    /// Completion tokens.
    OutputTokens,
    /// Prompt + completion tokens.
    TotalTokens,
    /// Requests (1 each).
    Requests,
}

impl Counts {
    /// `true` for token counts.
    pub fn is_tokens(self) -> bool {
        self != Self::Requests
    }
}

/// Standard RLS units (`RateLimitResponse.RateLimit.Unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// 1 s.
    Second = 1,
    /// 60 s.
    Minute = 2,
    /// 3600 s.
    Hour = 3,
    /// 86400 s.
    Day = 4,
}

/// A fixed window aligned to the clock (multiples of its length since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// As written (`minute`, `10s`).
    pub name: String,
    /// Length in milliseconds.
    pub len_ms: u64,
    /// The RLS unit, when the window is one.
    pub unit: Option<Unit>,
    /// Most units counted in one window.
    pub limit: u64,
}

impl Window {
    /// Start (ms since epoch) of the window holding `now_ms`.
    pub fn start(&self, now_ms: u64) -> u64 {
        now_ms - now_ms % self.len_ms.max(1)
    }
    /// Milliseconds until the window holding `now_ms` ends.
    pub fn ms_to_reset(&self, now_ms: u64) -> u64 {
        self.start(now_ms).saturating_add(self.len_ms).saturating_sub(now_ms)
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Name.
    pub name: String,
    /// Key parts, in order.
    pub key: Vec<KeyPart>,
    /// What it counts.
    pub counts: Counts,
    /// Windows, in order.
    pub windows: Vec<Window>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where counters live.
    pub mode: Mode,
    /// What to do when counting fails.
    pub failure_mode: FailureMode,
    /// Report without refusing.
    pub shadow: bool,
    /// Fallback user header.
    pub user_header: Option<String>,
    /// Fallback team header.
    pub team_header: Option<String>,
    /// Output reservation without `max_tokens`.
    pub default_output_tokens: u64,
    /// Cap on the output reservation.
    pub max_output_tokens: u64,
    /// Request body cap.
    pub max_body_bytes: usize,
    /// Non-streaming response body kept for usage.
    pub max_response_bytes: usize,
    /// Route-metadata key.
    pub route_metadata_key: String,
    /// Rule set used without route metadata.
    pub default_rule_set: Option<String>,
    /// Named rule sets.
    pub rule_sets: BTreeMap<String, Vec<Rule>>,
    /// CAS attempts per counter update.
    pub cas_retries: u32,
    /// Most distinct local counters.
    pub max_counters: usize,
    /// Stale-counter cleanup period.
    pub cleanup_interval: Duration,
}

impl Config {
    /// Parse and validate the plugin configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::from_json(bytes)?)
    }

    /// The rules for a rule-set name.
    pub fn rule_set(&self, name: &str) -> Option<&[Rule]> {
        self.rule_sets.get(name).map(Vec::as_slice)
    }
}

fn parse_key_part(s: &str) -> Result<KeyPart, String> {
    Ok(match s {
        "user" => KeyPart::User,
        "team" => KeyPart::Team,
        "api_key" => KeyPart::ApiKey,
        "route" => KeyPart::Route,
        "model" => KeyPart::Model,
        other => match other.strip_prefix("header:") {
            Some(h) => {
                validate_header_name(h)?;
                KeyPart::Header(h.to_string())
            }
            None => {
                return Err(format!(
                    "unknown key part {other:?}; use user, team, api_key, route, model or header:<name>"
                ))
            }
        },
    })
}

fn parse_counts(s: &str) -> Result<Counts, String> {
    Ok(match s {
        "input_tokens" => Counts::InputTokens,
        "output_tokens" => Counts::OutputTokens,
        "total_tokens" => Counts::TotalTokens,
        "requests" => Counts::Requests,
        other => {
            return Err(format!("unknown count {other:?}; use input_tokens, output_tokens, total_tokens or requests"))
        }
    })
}

fn parse_window(raw: &RawWindow, local: bool) -> Result<Window, ConfigError> {
    let (len_ms, unit) = match raw.window.as_str() {
        "second" => (1_000, Some(Unit::Second)),
        "minute" => (60_000, Some(Unit::Minute)),
        "hour" => (3_600_000, Some(Unit::Hour)),
        "day" => (86_400_000, Some(Unit::Day)),
        other => {
            let d = parse_duration(other).map_err(|e| ConfigError::new("window", e))?;
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms < 1_000 || ms % 1_000 != 0 {
                return Err(ConfigError::new("window", "a window must be a whole number of seconds, at least 1s"));
            }
            if !local {
                return Err(ConfigError::new(
                    "window",
                    format!("{other:?}: rls mode supports only second, minute, hour and day windows"),
                ));
            }
            (ms, None)
        }
    };
    if raw.limit == 0 {
        return Err(ConfigError::new("limit", "must be at least 1"));
    }
    if !local && raw.limit > u64::from(u32::MAX) {
        return Err(ConfigError::new("limit", "rls mode limits must fit in 32 bits (RateLimitOverride)"));
    }
    Ok(Window { name: raw.window.clone(), len_ms, unit, limit: raw.limit })
}

fn parse_rule(raw: &RawRule, local: bool) -> Result<Rule, ConfigError> {
    if raw.name.is_empty()
        || raw.name.len() > 64
        || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new("name", "1-64 characters of letters, digits, '-', '_' or '.'"));
    }
    let mut key = Vec::new();
    for (i, k) in raw.key.iter().enumerate() {
        key.push(parse_key_part(k).map_err(|e| ConfigError::new(format!("key[{i}]"), e))?);
    }
    let counts = parse_counts(&raw.count).map_err(|e| ConfigError::new("count", e))?;
    if raw.windows.is_empty() {
        return Err(ConfigError::new("windows", "at least one window is required"));
    }
    let mut windows: Vec<Window> = Vec::new();
    for (i, w) in raw.windows.iter().enumerate() {
        let w = parse_window(w, local).map_err(|e| e.within(&format!("windows[{i}]")))?;
        if windows.iter().any(|o| o.len_ms == w.len_ms) {
            return Err(ConfigError::new(format!("windows[{i}].window"), "two windows of the same length"));
        }
        windows.push(w);
    }
    Ok(Rule { name: raw.name.clone(), key, counts, windows })
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let mode = match raw.mode.as_deref().unwrap_or("local") {
            "local" => {
                if raw.rls.is_some() {
                    return Err(ConfigError::new("rls", "only allowed with mode \"rls\""));
                }
                Mode::Local
            }
            "rls" => {
                let Some(rls) = raw.rls.as_ref() else {
                    return Err(ConfigError::new("rls", "required with mode \"rls\""));
                };
                if rls.cluster.is_empty() {
                    return Err(ConfigError::new("rls.cluster", "must not be empty"));
                }
                let timeout = rls.timeout.unwrap_or(Duration::from_millis(500));
                if timeout.is_zero() {
                    return Err(ConfigError::new("rls.timeout", "must be positive"));
                }
                Mode::Rls(RlsConfig {
                    cluster: rls.cluster.clone(),
                    domain: rls.domain.clone().unwrap_or_else(|| "sluice".into()),
                    timeout,
                })
            }
            other => return Err(ConfigError::new("mode", format!("unknown mode {other:?}; use local or rls"))),
        };
        let local = mode == Mode::Local;
        for (field, h) in [("user_header", &raw.user_header), ("team_header", &raw.team_header)] {
            if let Some(h) = h {
                validate_header_name(h).map_err(|e| ConfigError::new(field, e))?;
            }
        }
        let mut rule_sets = BTreeMap::new();
        for (set, rules) in &raw.rule_sets {
            let mut out: Vec<Rule> = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                let rule = parse_rule(r, local).map_err(|e| e.within(&format!("rule_sets.{set}[{i}]")))?;
                if out.iter().any(|o| o.name == rule.name) {
                    return Err(ConfigError::new(format!("rule_sets.{set}[{i}].name"), "duplicate rule name"));
                }
                out.push(rule);
            }
            rule_sets.insert(set.clone(), out);
        }
        if let Some(d) = &raw.default_rule_set {
            if !rule_sets.contains_key(d) {
                return Err(ConfigError::new("default_rule_set", format!("no rule set named {d:?}")));
            }
        }
        let default_output_tokens = raw.default_output_tokens.unwrap_or(256);
        let max_output_tokens = raw.max_output_tokens.unwrap_or(u64::from(u32::MAX));
        if default_output_tokens > max_output_tokens {
            return Err(ConfigError::new("default_output_tokens", "larger than max_output_tokens"));
        }
        let cas_retries = raw.cas_retries.unwrap_or(1_000);
        if cas_retries == 0 {
            return Err(ConfigError::new("cas_retries", "must be at least 1"));
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(1 << 20);
        if max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be positive"));
        }
        let cleanup_interval = raw.cleanup_interval.unwrap_or(Duration::from_secs(10));
        if cleanup_interval < Duration::from_secs(1) {
            return Err(ConfigError::new("cleanup_interval", "at least 1s"));
        }
        Ok(Config {
            mode,
            failure_mode: raw.failure_mode.unwrap_or(FailureMode::Deny),
            shadow: raw.shadow,
            user_header: raw.user_header,
            team_header: raw.team_header,
            default_output_tokens,
            max_output_tokens,
            max_body_bytes,
            max_response_bytes: raw.max_response_bytes.unwrap_or(4 << 20),
            route_metadata_key: raw.route_metadata_key.unwrap_or_else(|| "ratelimit".into()),
            default_rule_set: raw.default_rule_set,
            rule_sets,
            cas_retries,
            max_counters: raw.max_counters.unwrap_or(100_000).max(1),
            cleanup_interval,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const TIERED: &str = r#"{
        "user_header": "x-user",
        "default_rule_set": "tiered",
        "rule_sets": {"tiered": [{"name": "per-user", "key": ["user"], "count": "total_tokens",
            "windows": [{"window": "minute", "limit": 150}, {"window": "hour", "limit": 300}, {"window": "day", "limit": 800}]}]}
    }"#;

    #[test]
    fn parses_tiered() {
        let c = Config::from_json(TIERED.as_bytes()).unwrap();
        assert_eq!(c.mode, Mode::Local);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        let r = &c.rule_set("tiered").unwrap()[0];
        assert_eq!(r.key, vec![KeyPart::User]);
        assert_eq!(r.windows[1].len_ms, 3_600_000);
        assert_eq!(r.windows[2].unit, Some(Unit::Day));
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let cases = [
            (r#"{"mode":"cluster"}"#, "mode"),
            (r#"{"mode":"rls"}"#, "rls"),
            (r#"{"default_rule_set":"x"}"#, "default_rule_set"),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"tokens","windows":[{"window":"minute","limit":1}]}]}}"#,
                "rule_sets.a[0].count",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"fortnight","limit":1}]}]}}"#,
                "rule_sets.a[0].windows[0].window",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"minute","limit":0}]}]}}"#,
                "rule_sets.a[0].windows[0].limit",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","key":["header:X"],"windows":[{"window":"minute","limit":1}]}]}}"#,
                "rule_sets.a[0].key[0]",
            ),
            (r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[]}]}}"#, "rule_sets.a[0].windows"),
            (
                r#"{"mode":"rls","rls":{"cluster":"rls"},"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"10s","limit":1}]}]}}"#,
                "rule_sets.a[0].windows[0].window",
            ),
            (r#"{"user_header":"X-User"}"#, "user_header"),
            (r#"{"limits":{}}"#, "limits"),
            (r#"{"shadow":"yes"}"#, "shadow"),
            (r#"{"failure_mode":"maybe"}"#, "failure_mode"),
            (r#"{"cleanup_interval":"5y"}"#, "cleanup_interval"),
            (r#"{"rls":{"cluster":"c","extra":1}}"#, "rls.extra"),
            (r#"{"mode":"rls","rls":{}}"#, "rls"),
            (r#"{"rule_sets":[]}"#, "rule_sets"),
            (r#"{"rule_sets":{"a":{}}}"#, "rule_sets.a"),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"minute","limit":-1}]}]}}"#,
                "rule_sets.a[0].windows[0].limit",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"minute"}]}]}}"#,
                "rule_sets.a[0].windows[0]",
            ),
            (r#"{"rule_sets":{"a":[{"name":"r","count":"requests"}]}}"#, "rule_sets.a[0]"),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","key":[1],"windows":[{"window":"minute","limit":1}]}]}}"#,
                "rule_sets.a[0].key[0]",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","colour":1,"windows":[]}]}}"#,
                "rule_sets.a[0].colour",
            ),
            (r#"{"max_body_bytes":1.5}"#, "max_body_bytes"),
            (r#"[1]"#, "."),
            (r#"{"#, "."),
        ];
        for (json, field) in cases {
            let e = Config::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn windows_align_to_clock() {
        let w = Window { name: "minute".into(), len_ms: 60_000, unit: Some(Unit::Minute), limit: 1 };
        assert_eq!(w.start(125_000), 120_000);
        assert_eq!(w.ms_to_reset(125_000), 55_000);
    }

    #[test]
    fn custom_window_in_local_mode() {
        let c = Config::from_json(
            br#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"3s","limit":1}]}]}}"#,
        )
        .unwrap();
        assert_eq!(c.rule_set("a").unwrap()[0].windows[0].len_ms, 3_000);
    }
}
