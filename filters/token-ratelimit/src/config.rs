//! Configuration, read and validated in one pass with the one core reader
//! (`sluice_core::config::Obj`): unknown fields and wrong types are errors naming the field
//! (`rule_sets.tiered[0].windows[1].limit: must be at least 1`).

use sluice_core::config::{parse_duration, validate_header_name, ConfigError, FailureMode, Obj};
use sluice_core::price::PriceTable;
use std::collections::BTreeMap;
use std::time::Duration;

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
    /// The service understands `RateLimitDescriptor.is_negative_hits` (Envoy 1.38+ API):
    /// unused reservations are returned through it.
    pub negative_hits: bool,
}

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The authenticated user; the `user_header` only when the request has no identity.
    User,
    /// The authenticated team; the `team_header` only when the request has no identity.
    Team,
    /// The key id auth publishes; without auth, SHA-256 of the bearer / `x-api-key` value.
    ApiKey,
    /// Envoy's route name.
    Route,
    /// The requested model.
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
    /// Money: micro-units of the price table's currency (`prices`).
    Cost,
}

/// What one request amounts to, in every unit a rule may count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Units {
    /// Input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Cost in micro-units of the configured currency.
    pub cost: u64,
}

impl Counts {
    /// The `x-ratelimit-*-<unit>` suffix: `tokens`, `requests` or `cost`.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Cost => "cost",
            _ => "tokens",
        }
    }

    /// The name used in config and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
            Self::TotalTokens => "total_tokens",
            Self::Requests => "requests",
            Self::Cost => "cost",
        }
    }

    /// Units this rule counts for a request.
    pub fn amount(self, u: &Units) -> u64 {
        match self {
            Self::InputTokens => u.input,
            Self::OutputTokens => u.output,
            Self::TotalTokens => u.input.saturating_add(u.output),
            Self::Requests => 1,
            Self::Cost => u.cost,
        }
    }
}

/// Standard RLS units (`RateLimitResponse.RateLimit.Unit`, `type.v3.RateLimitUnit`).
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
    /// A calendar month (local mode: UTC calendar months; an RLS applies its own month).
    Month = 5,
}

/// A fixed window aligned to the clock (multiples of its length since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// As written (`minute`, `10s`).
    pub name: String,
    /// Length in milliseconds (at least 1000).
    pub len_ms: u64,
    /// The RLS unit, when the window is one.
    pub unit: Option<Unit>,
    /// Most units counted in one window.
    pub limit: u64,
}

/// Length that stands for a calendar month in counters (its id; the real boundaries come
/// from the calendar).
pub const MONTH_MS: u64 = 31 * 86_400_000;

const DAY_MS: u64 = 86_400_000;

/// Days since the epoch of the first day of the month holding `day` (proleptic Gregorian,
/// UTC; Howard Hinnant's civil-from-days and days-from-civil).
fn month_start_day(day: i64, next: bool) -> i64 {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let mut m = if mp < 10 { mp + 3 } else { mp - 9 };
    let mut y = yoe + era * 400 + i64::from(m <= 2);
    if next {
        m += 1;
        if m > 12 {
            m = 1;
            y += 1;
        }
    }
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn month_bounds(now_ms: u64) -> (u64, u64) {
    let day = i64::try_from(now_ms / DAY_MS).unwrap_or(0);
    let to_ms = |d: i64| u64::try_from(d).unwrap_or(0).saturating_mul(DAY_MS);
    (to_ms(month_start_day(day, false)), to_ms(month_start_day(day, true)))
}

impl Window {
    /// True for a calendar-month window.
    pub fn is_month(&self) -> bool {
        self.unit == Some(Unit::Month)
    }

    /// Start (ms since epoch) of the window holding `now_ms`.
    pub fn start(&self, now_ms: u64) -> u64 {
        if self.is_month() {
            return month_bounds(now_ms).0;
        }
        now_ms.saturating_sub(now_ms.checked_rem(self.len_ms).unwrap_or(0))
    }

    /// Milliseconds until the window holding `now_ms` ends.
    pub fn ms_to_reset(&self, now_ms: u64) -> u64 {
        if self.is_month() {
            return month_bounds(now_ms).1.saturating_sub(now_ms);
        }
        self.start(now_ms).saturating_add(self.len_ms).saturating_sub(now_ms)
    }

    /// The RLS unit number (0 when the window is not a standard unit: local mode only).
    pub fn unit_number(&self) -> u32 {
        self.unit.map_or(0, |u| u as u32)
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
    /// User header, used only for requests without an authenticated identity.
    pub user_header: Option<String>,
    /// Team header, used only for requests without an authenticated identity.
    pub team_header: Option<String>,
    /// Output reservation without a client cap (`max_tokens`, ...).
    pub default_output_tokens: u64,
    /// Cap on the output reservation.
    pub max_output_tokens: u64,
    /// Request body cap.
    pub max_body_bytes: usize,
    /// Non-streaming response bodies above this size are not read for usage.
    pub max_response_bytes: usize,
    /// Route-metadata key.
    pub route_metadata_key: String,
    /// Rule set used without route metadata.
    pub default_rule_set: Option<String>,
    /// Named rule sets.
    pub rule_sets: BTreeMap<String, Vec<Rule>>,
    /// CAS attempts per counter update.
    pub cas_retries: u32,
    /// Most live local counters.
    pub max_counters: usize,
    /// Period of the expired-counter sweep.
    pub cleanup_interval: Duration,
    /// Price table for rules that count `cost`.
    pub prices: PriceTable,
    /// What a `cost` rule does with a model the table does not price (`deny`: 403).
    pub unpriced: FailureMode,
}

impl Config {
    /// Parse and validate the plugin configuration bytes (tests, config-check).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, Self::load)
    }

    /// The rules for a rule-set name.
    pub fn rule_set(&self, name: &str) -> Option<&[Rule]> {
        self.rule_sets.get(name).map(Vec::as_slice)
    }

    /// Read and validate the configuration object.
    pub fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(&[
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
            "prices",
            "currency",
            "unpriced_models",
        ])?;
        let prices = PriceTable::load(&o)?;
        let mode = match o.choice("mode", &["local", "rls"])?.as_deref().unwrap_or("local") {
            "rls" => {
                let rls = o.object("rls", load_rls)?.ok_or_else(|| o.err("rls", "required with mode \"rls\""))?;
                Mode::Rls(rls)
            }
            _ => {
                if o.has("rls") {
                    return Err(o.err("rls", "only allowed with mode \"rls\""));
                }
                Mode::Local
            }
        };
        let local = mode == Mode::Local;
        let header = |key: &str| -> Result<Option<String>, ConfigError> {
            match o.string(key)? {
                Some(h) => validate_header_name(&h).map(|()| Some(h)).map_err(|e| o.err(key, e)),
                None => Ok(None),
            }
        };
        let user_header = header("user_header")?;
        let team_header = header("team_header")?;
        let mut rule_sets = BTreeMap::new();
        if let Some(sets) = o.get("rule_sets") {
            let path = o.field_path("rule_sets");
            let sets = Obj::new(sets, &path)?;
            for (name, _) in sets.entries() {
                let rules = sets.list(name, |v, p| load_rule(Obj::new(v, p)?, local))?.unwrap_or_default();
                if let Some(i) = rules.iter().position(|r| r.counts == Counts::Cost) {
                    if prices.is_empty() {
                        return Err(ConfigError::new(
                            format!("{path}.{name}[{i}].count"),
                            "counting cost needs `prices`",
                        ));
                    }
                }
                for (i, r) in rules.iter().enumerate() {
                    if rules.iter().take(i).any(|o| o.name == r.name) {
                        return Err(ConfigError::new(format!("{path}.{name}[{i}].name"), "duplicate rule name"));
                    }
                }
                rule_sets.insert(name.clone(), rules);
            }
        }
        let default_rule_set = o.string("default_rule_set")?;
        if let Some(d) = &default_rule_set {
            if !rule_sets.contains_key(d) {
                return Err(o.err("default_rule_set", format!("no rule set named {d:?}")));
            }
        }
        let default_output_tokens = o.u64("default_output_tokens")?.unwrap_or(256);
        let max_output_tokens = o.u64("max_output_tokens")?.unwrap_or(u64::from(u32::MAX));
        if default_output_tokens > max_output_tokens {
            return Err(o.err("default_output_tokens", "larger than max_output_tokens"));
        }
        let cas_retries = o.ranged("cas_retries", 1, u64::from(u32::MAX))?.unwrap_or(1_000);
        let max_body_bytes = o.count("max_body_bytes")?.unwrap_or(1 << 20);
        if max_body_bytes == 0 {
            return Err(o.err("max_body_bytes", "must be positive"));
        }
        let cleanup_interval = o.duration("cleanup_interval")?.unwrap_or(Duration::from_secs(10));
        if cleanup_interval < Duration::from_secs(1) {
            return Err(o.err("cleanup_interval", "at least 1s"));
        }
        let max_counters = o.count("max_counters")?.unwrap_or(100_000);
        if max_counters == 0 {
            return Err(o.err("max_counters", "must be at least 1"));
        }
        Ok(Config {
            mode,
            failure_mode: o.failure_mode("failure_mode")?.unwrap_or(FailureMode::Deny),
            shadow: o.flag("shadow", false)?,
            user_header,
            team_header,
            default_output_tokens,
            max_output_tokens,
            max_body_bytes,
            max_response_bytes: o.count("max_response_bytes")?.unwrap_or(4 << 20),
            route_metadata_key: o.non_empty("route_metadata_key")?.unwrap_or_else(|| "ratelimit".into()),
            default_rule_set,
            rule_sets,
            cas_retries: u32::try_from(cas_retries).unwrap_or(u32::MAX),
            max_counters,
            cleanup_interval,
            prices,
            unpriced: o.failure_mode("unpriced_models")?.unwrap_or(FailureMode::Deny),
        })
    }
}

fn load_rls(r: Obj<'_>) -> Result<RlsConfig, ConfigError> {
    r.known(&["cluster", "domain", "timeout", "negative_hits"])?;
    let cluster = r.required("cluster")?;
    if cluster.is_empty() {
        return Err(r.err("cluster", "must not be empty"));
    }
    let timeout = r.duration("timeout")?.unwrap_or(Duration::from_millis(500));
    if timeout.is_zero() {
        return Err(r.err("timeout", "must be positive"));
    }
    Ok(RlsConfig {
        cluster,
        domain: r.non_empty("domain")?.unwrap_or_else(|| "sluice".into()),
        timeout,
        negative_hits: r.flag("negative_hits", true)?,
    })
}

fn load_rule(o: Obj<'_>, local: bool) -> Result<Rule, ConfigError> {
    o.known(&["name", "key", "count", "windows"])?;
    let name = o.required("name")?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(o.err("name", "1-64 characters of letters, digits, '-', '_' or '.'"));
    }
    let key = o
        .list("key", |v, p| {
            let s = v.as_str().ok_or_else(|| ConfigError::new(p, "expected a string"))?;
            parse_key_part(s).map_err(|e| ConfigError::new(p, e))
        })?
        .unwrap_or_default();
    let count = o.required("count")?;
    let counts = parse_counts(&count).map_err(|e| o.err("count", e))?;
    let windows = o
        .objects("windows", |w| load_window(w, local, counts))?
        .ok_or_else(|| o.err(".", "missing field `windows`"))?;
    if windows.is_empty() {
        return Err(o.err("windows", "at least one window is required"));
    }
    for (i, w) in windows.iter().enumerate() {
        if windows.iter().take(i).any(|o| o.len_ms == w.len_ms) {
            return Err(o.err(&format!("windows[{i}].window"), "two windows of the same length"));
        }
    }
    Ok(Rule { name, key, counts, windows })
}

fn load_window(w: Obj<'_>, local: bool, counts: Counts) -> Result<Window, ConfigError> {
    w.known(&["window", "limit"])?;
    let limit = if counts == Counts::Cost {
        // Money in the table's currency (`5.0`), kept in micro-units.
        match w.number("limit")? {
            Some(v) if v > 0.0 => sluice_core::price::to_micros(v),
            Some(_) => return Err(w.err("limit", "must be positive")),
            None => return Err(w.err(".", "missing field `limit`")),
        }
    } else {
        w.u64("limit")?.ok_or_else(|| w.err(".", "missing field `limit`"))?
    };
    let name = w.required("window")?;
    let (len_ms, unit) = match name.as_str() {
        "second" => (1_000, Some(Unit::Second)),
        "minute" => (60_000, Some(Unit::Minute)),
        "hour" => (3_600_000, Some(Unit::Hour)),
        "day" => (86_400_000, Some(Unit::Day)),
        "month" => (MONTH_MS, Some(Unit::Month)),
        other => {
            let d = parse_duration(other).map_err(|e| w.err("window", e))?;
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms < 1_000 || ms % 1_000 != 0 {
                return Err(w.err("window", "a window must be a whole number of seconds, at least 1s"));
            }
            if !local {
                return Err(w.err(
                    "window",
                    format!("{other:?}: rls mode supports only second, minute, hour, day and month windows"),
                ));
            }
            (ms, None)
        }
    };
    if limit == 0 {
        return Err(w.err("limit", "must be at least 1"));
    }
    if !local && limit > u64::from(u32::MAX) {
        return Err(w.err("limit", "rls mode limits must fit in 32 bits (RateLimitOverride)"));
    }
    Ok(Window { name, len_ms, unit, limit })
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
        "cost" => Counts::Cost,
        other => {
            return Err(format!(
                "unknown count {other:?}; use input_tokens, output_tokens, total_tokens, requests or cost"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_months_in_utc() {
        let w = Window { name: "month".into(), len_ms: MONTH_MS, unit: Some(Unit::Month), limit: 1 };
        let day = |y: i64, m: i64, d: i64| -> u64 {
            // days from civil, for test inputs
            let yy = if m <= 2 { y - 1 } else { y };
            let era = yy.div_euclid(400);
            let yoe = yy - era * 400;
            let mp = if m > 2 { m - 3 } else { m + 9 };
            let doy = (153 * mp + 2) / 5 + d - 1;
            let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
            u64::try_from(era * 146_097 + doe - 719_468).unwrap() * DAY_MS
        };
        for (y, m, next) in [(2026, 12, (2027, 1)), (2024, 2, (2024, 3)), (2026, 1, (2026, 2)), (2000, 2, (2000, 3))] {
            let start = day(y, m, 1);
            let now = start + 10 * DAY_MS + 12_345;
            assert_eq!(w.start(now), start, "{y}-{m}");
            assert_eq!(w.start(start), start, "{y}-{m} first instant");
            assert_eq!(now + w.ms_to_reset(now), day(next.0, next.1, 1), "{y}-{m}");
            assert_eq!(w.start(day(next.0, next.1, 1) - 1), start, "{y}-{m} last instant");
        }
        assert_eq!(w.start(0), 0);
    }

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
        assert_eq!((c.cas_retries, c.max_counters, c.default_output_tokens), (1_000, 100_000, 256));
    }

    #[test]
    fn rls_settings_and_negative_hits_switch() {
        let c = Config::from_json(br#"{"mode":"rls","rls":{"cluster":"c"}}"#).unwrap();
        let Mode::Rls(r) = &c.mode else { panic!() };
        assert!(r.negative_hits, "on by default (Envoy 1.38+ API)");
        assert_eq!((r.domain.as_str(), r.timeout), ("sluice", Duration::from_millis(500)));
        let c =
            Config::from_json(br#"{"mode":"rls","rls":{"cluster":"c","negative_hits":false,"timeout":"2s"}}"#).unwrap();
        let Mode::Rls(r) = &c.mode else { panic!() };
        assert!(!r.negative_hits);
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
            (r#"{"rls":{"cluster":"c","extra":1}}"#, "rls"),
            (r#"{"mode":"rls","rls":{"cluster":"c","extra":1}}"#, "rls.extra"),
            (r#"{"mode":"rls","rls":{}}"#, "rls.cluster"),
            (r#"{"mode":"rls","rls":{"cluster":"c","negative_hits":"yes"}}"#, "rls.negative_hits"),
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
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"minute","limit":1}]},{"name":"r","count":"requests","windows":[{"window":"minute","limit":1}]}]}}"#,
                "rule_sets.a[1].name",
            ),
            (
                r#"{"rule_sets":{"a":[{"name":"r","count":"requests","windows":[{"window":"minute","limit":1},{"window":"60s","limit":2}]}]}}"#,
                "rule_sets.a[0].windows[1].window",
            ),
            (r#"{"max_body_bytes":1.5}"#, "max_body_bytes"),
            (r#"{"max_counters":0}"#, "max_counters"),
            (r#"{"cas_retries":0}"#, "cas_retries"),
            (r#"[1]"#, "."),
            (r#"{"#, "."),
        ];
        for (json, field) in cases {
            let e = Config::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = Config::from_json(
            br#"{"rule_sets":{"tiered":[{"name":"r","count":"requests","windows":[{"window":"minute","limit":0}]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "rule_sets.tiered[0].windows[0].limit: must be at least 1");
    }

    #[test]
    fn windows_align_to_clock() {
        let w = Window { name: "minute".into(), len_ms: 60_000, unit: Some(Unit::Minute), limit: 1 };
        assert_eq!(w.start(125_000), 120_000);
        assert_eq!(w.ms_to_reset(125_000), 55_000);
        assert_eq!(w.start(u64::MAX), u64::MAX - u64::MAX % 60_000);
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
