//! Configuration: read strictly, then compiled and checked into [`Config`].
//! Every template is parsed here, so a request never meets a malformed one.
//!
//! The JSON is read with a small strict reader over `serde_json::Value` rather than serde
//! derive + `parse_json_config`: the derive machinery (serde_path_to_error, typed visitors,
//! float formatting for error messages) cost about 90 KiB of wasm, a third of the budget.
//! The behaviour is the same: unknown fields and wrong types are rejected, and every error
//! names the field by its dotted path.

use crate::template::ValueTemplate;
use serde_json::{Map, Number, Value};
use sluice_core::config::{json_kind, ConfigError, FailureMode};
use sluice_core::wire::{ChatRequest, WireError};

/// Default cap on the buffered request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default route-metadata key naming the profile.
pub const DEFAULT_PROFILE_METADATA_KEY: &str = "enrichment_profile";

/// What a template variable without a value does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMissing {
    /// Render it as an empty string.
    #[default]
    Empty,
    /// Refuse the request (400) naming the variable.
    Refuse,
}

/// A compiled profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// Messages (as JSON templates) put first.
    pub prepend: Vec<ValueTemplate>,
    /// Messages put last.
    pub append: Vec<ValueTemplate>,
    /// Fields set when absent or `null`.
    pub defaults: Vec<(String, ValueTemplate)>,
    /// Fields always set.
    pub overrides: Vec<(String, ValueTemplate)>,
    /// Numeric upper bounds.
    pub caps: Vec<(String, Number)>,
    /// Missing-variable policy.
    pub on_missing: OnMissing,
}

impl Profile {
    /// True when the profile adds messages.
    pub fn has_message_ops(&self) -> bool {
        !self.prepend.is_empty() || !self.append.is_empty()
    }
}

/// The compiled configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Profiles, in config order.
    pub profiles: Vec<Profile>,
    /// Profile used when the route names none.
    pub default_profile: Option<String>,
    /// Route-metadata key naming the profile.
    pub profile_metadata_key: String,
    /// Body cap in bytes.
    pub max_body_bytes: usize,
    /// Failure mode.
    pub failure_mode: FailureMode,
}

const CONFIG_FIELDS: &[&str] =
    &["profiles", "default_profile", "profile_metadata_key", "max_body_bytes", "failure_mode", "on_missing_variable"];
const PROFILE_FIELDS: &[&str] = &["prepend", "append", "defaults", "overrides", "caps", "on_missing_variable"];

impl Config {
    /// Parse and compile JSON configuration bytes (empty means `{}`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(bytes).map_err(|e| ConfigError::new(".", strip_position(&e.to_string())))?
        };
        Self::from_value(value)
    }

    /// Compile a parsed JSON configuration.
    pub fn from_value(value: Value) -> Result<Self, ConfigError> {
        let mut top = Fields::new(value, CONFIG_FIELDS)?;
        let on_missing = top.on_missing("on_missing_variable")?.unwrap_or_default();
        let raw_profiles = top.object("profiles")?.unwrap_or_default();
        if raw_profiles.is_empty() {
            return Err(ConfigError::new("profiles", "at least one profile is required"));
        }
        let mut profiles = Vec::with_capacity(raw_profiles.len());
        for (name, value) in raw_profiles {
            let field = format!("profiles.{name}");
            check_profile_name(&name).map_err(|why| ConfigError::new(&field, why))?;
            let p = compile_profile(&name, value, on_missing).map_err(|e| e.within(&field))?;
            profiles.push(p);
        }
        let default_profile = top.string("default_profile")?;
        if let Some(d) = &default_profile {
            if !profiles.iter().any(|p| p.name == *d) {
                return Err(ConfigError::new("default_profile", format!("no profile named {d:?}")));
            }
        }
        let key = top.string("profile_metadata_key")?.unwrap_or_else(|| DEFAULT_PROFILE_METADATA_KEY.to_string());
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(ConfigError::new("profile_metadata_key", "must be a non-empty key without spaces"));
        }
        let max_body_bytes = match top.take("max_body_bytes") {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::new("max_body_bytes", "must be a positive integer (bytes)"))?,
        };
        let failure_mode = match top.string("failure_mode")?.as_deref() {
            None | Some("allow") => FailureMode::Allow,
            Some("deny") => FailureMode::Deny,
            Some(other) => {
                return Err(ConfigError::new(
                    "failure_mode",
                    format!("unknown value {other:?}, expected \"allow\" or \"deny\""),
                ))
            }
        };
        top.finish()?;
        Ok(Self { profiles, default_profile, profile_metadata_key: key, max_body_bytes, failure_mode })
    }

    /// A profile by name.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }
}

/// Strict reading of one JSON object: take the known fields, then reject what is left.
/// Field names in errors are relative to the object (callers add the parent with `within`).
struct Fields {
    map: Map<String, Value>,
    known: &'static [&'static str],
}

impl Fields {
    fn new(value: Value, known: &'static [&'static str]) -> Result<Self, ConfigError> {
        match value {
            Value::Object(map) => Ok(Self { map, known }),
            other => Err(ConfigError::new(".", format!("expected an object, found {}", json_kind(&other)))),
        }
    }

    /// The value of `key`; `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.shift_remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ConfigError::new(key, format!("expected a string, found {}", json_kind(&other)))),
        }
    }

    fn object(&mut self, key: &str) -> Result<Option<Map<String, Value>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(other) => Err(ConfigError::new(key, format!("expected an object, found {}", json_kind(&other)))),
        }
    }

    fn array(&mut self, key: &str) -> Result<Vec<Value>, ConfigError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(ConfigError::new(key, format!("expected an array, found {}", json_kind(&other)))),
        }
    }

    fn on_missing(&mut self, key: &str) -> Result<Option<OnMissing>, ConfigError> {
        match self.string(key)?.as_deref() {
            None => Ok(None),
            Some("empty") => Ok(Some(OnMissing::Empty)),
            Some("refuse") => Ok(Some(OnMissing::Refuse)),
            Some(other) => {
                Err(ConfigError::new(key, format!("unknown value {other:?}, expected \"empty\" or \"refuse\"")))
            }
        }
    }

    /// Fail on the first field nobody took.
    fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(ConfigError::new(
                k.as_str(),
                format!("unknown field `{k}`, expected one of {}", self.known.join(", ")),
            )),
        }
    }
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// A wire shape error `path: why` as a config error at that path, below `prefix`.
fn shape_error(e: &WireError, prefix: &str) -> ConfigError {
    let text = match e {
        WireError::Shape(s) => s.as_str(),
        _ => "invalid value",
    };
    match text.split_once(": ") {
        Some((path, why)) => {
            let path = path.strip_prefix(prefix).unwrap_or(path);
            let path = path.strip_prefix('.').unwrap_or(path);
            ConfigError::new(if path.is_empty() { "." } else { path }, why)
        }
        None => ConfigError::new(".", text),
    }
}

fn check_profile_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err("profile names use letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

fn compile_profile(name: &str, value: Value, inherited: OnMissing) -> Result<Profile, ConfigError> {
    let mut f = Fields::new(value, PROFILE_FIELDS)?;
    let prepend = compile_messages(f.array("prepend")?).map_err(|e| e.within("prepend"))?;
    let append = compile_messages(f.array("append")?).map_err(|e| e.within("append"))?;
    let caps = compile_caps(f.object("caps")?.unwrap_or_default()).map_err(|e| e.within("caps"))?;
    let defaults =
        compile_fields(f.object("defaults")?.unwrap_or_default(), &caps).map_err(|e| e.within("defaults"))?;
    let overrides =
        compile_fields(f.object("overrides")?.unwrap_or_default(), &caps).map_err(|e| e.within("overrides"))?;
    let on_missing = f.on_missing("on_missing_variable")?.unwrap_or(inherited);
    f.finish()?;
    if prepend.is_empty() && append.is_empty() && defaults.is_empty() && overrides.is_empty() && caps.is_empty() {
        return Err(ConfigError::new(".", "profile does nothing: set prepend, append, defaults, overrides or caps"));
    }
    Ok(Profile { name: name.to_string(), prepend, append, defaults, overrides, caps, on_missing })
}

fn compile_messages(raw: Vec<Value>) -> Result<Vec<ValueTemplate>, ConfigError> {
    raw.into_iter().enumerate().map(|(i, m)| compile_message(m).map_err(|e| e.within(&format!("[{i}]")))).collect()
}

fn compile_message(raw: Value) -> Result<ValueTemplate, ConfigError> {
    let Value::Object(obj) = &raw else {
        return Err(ConfigError::new(".", "a message is an object with role and content"));
    };
    match obj.get("role") {
        Some(Value::String(r)) if !r.trim().is_empty() => {
            if r.contains("{{") {
                return Err(ConfigError::new("role", "the role cannot use template variables"));
            }
        }
        Some(_) => return Err(ConfigError::new("role", "must be a non-empty string such as \"system\"")),
        None => return Err(ConfigError::new("role", "missing; use e.g. \"system\", \"developer\" or \"user\"")),
    }
    match obj.get("content") {
        None | Some(Value::Null) => return Err(ConfigError::new("content", "missing; a string or an array of parts")),
        Some(Value::String(_) | Value::Array(_)) => {}
        Some(_) => return Err(ConfigError::new("content", "must be a string or an array of content parts")),
    }
    // The same shape rules as client messages (content parts need a "type", ...).
    let probe = serde_json::to_vec(&serde_json::json!({ "messages": [&raw] })).unwrap_or_default();
    ChatRequest::parse(&probe).map_err(|e| shape_error(&e, "messages[0]"))?;
    ValueTemplate::compile(raw).map_err(|(path, why)| ConfigError::new(if path.is_empty() { "." } else { &path }, why))
}

fn compile_caps(raw: Map<String, Value>) -> Result<Vec<(String, Number)>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (field, v) in raw {
        check_field_name(&field)?;
        let n = match v {
            Value::Number(n) if n.as_f64().is_some_and(|f| f.is_finite() && f >= 0.0) => n,
            _ => return Err(ConfigError::new(&field, "a cap is a non-negative number")),
        };
        // A cap is written into the request: it must fit the field (max_tokens an integer).
        let mut probe = Map::new();
        probe.insert(field.clone(), Value::Number(n.clone()));
        ChatRequest::parse(&serde_json::to_vec(&probe).unwrap_or_default()).map_err(|e| shape_error(&e, ""))?;
        out.push((field, n));
    }
    Ok(out)
}

fn compile_fields(
    raw: Map<String, Value>,
    caps: &[(String, Number)],
) -> Result<Vec<(String, ValueTemplate)>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (field, v) in raw {
        check_field_name(&field)?;
        // Values of typed request fields must have the right type (max_tokens an integer, ...).
        let mut probe = Map::new();
        probe.insert(field.clone(), v.clone());
        ChatRequest::parse(&serde_json::to_vec(&probe).unwrap_or_default()).map_err(|e| shape_error(&e, ""))?;
        if let (Some(cap), Some(n)) = (caps.iter().find(|(f, _)| *f == field), v.as_f64()) {
            if cap.1.as_f64().is_some_and(|c| n > c) {
                return Err(ConfigError::new(&field, format!("{v} is above caps.{field} ({})", cap.1)));
            }
        }
        let t = ValueTemplate::compile(v).map_err(|(path, why)| {
            let p = if path.is_empty() || path.starts_with('[') {
                format!("{field}{path}")
            } else {
                format!("{field}.{path}")
            };
            ConfigError::new(p, why)
        })?;
        out.push((field, t));
    }
    Ok(out)
}

fn check_field_name(field: &str) -> Result<(), ConfigError> {
    if field.is_empty() {
        return Err(ConfigError::new(".", "empty field name"));
    }
    if field == "messages" {
        return Err(ConfigError::new(field, "messages are changed with prepend and append"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> ConfigError {
        Config::from_json(v.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn full_config() {
        let c = Config::from_json(
            json!({
                "default_profile": "csv",
                "max_body_bytes": 4096,
                "failure_mode": "deny",
                "on_missing_variable": "refuse",
                "profiles": {
                    "csv": {
                        "prepend": [{"role": "system", "content": "Team {{team}}"}],
                        "append": [{"role": "user", "content": [{"type": "text", "text": "Be brief."}]}],
                        "defaults": {"temperature": 0.2, "max_tokens": 256, "user": "{{user}}"},
                        "overrides": {"stream_options": {"include_usage": true}},
                        "caps": {"max_tokens": 1024},
                        "on_missing_variable": "empty"
                    },
                    "other": {"caps": {"max_completion_tokens": 10}}
                }
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        assert_eq!(c.profile_metadata_key, "enrichment_profile");
        let p = c.profile("csv").unwrap();
        assert_eq!(p.on_missing, OnMissing::Empty);
        assert_eq!(c.profile("other").unwrap().on_missing, OnMissing::Refuse);
        assert_eq!(p.prepend.len(), 1);
        assert!(p.prepend[0].literal().is_none());
        assert!(p.append[0].literal().is_some());
        assert_eq!(p.defaults.len(), 3);
        assert_eq!(p.caps[0].0, "max_tokens");
        assert!(p.has_message_ops());
    }

    #[test]
    fn minimal_defaults() {
        let c = Config::from_json(br#"{"profiles":{"p":{"caps":{"max_tokens":5}}}}"#).unwrap();
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert_eq!(c.default_profile, None);
        assert_eq!(c.profile("p").unwrap().on_missing, OnMissing::Empty);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({}), "profiles", "at least one"),
            (json!({"profiles": {"p": {}}}), "profiles.p", "does nothing"),
            (json!({"profiles": {"p p": {"caps": {"a": 1}}}}), "profiles.p p", "profile names"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "default_profile": "q"}),
                "default_profile",
                "no profile named",
            ),
            (json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": 0}), "max_body_bytes", "positive integer"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": -1}),
                "max_body_bytes",
                "positive integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "max_body_bytes": 1.5}),
                "max_body_bytes",
                "positive integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "default_profile": 3}),
                "default_profile",
                "expected a string",
            ),
            (json!({"profiles": []}), "profiles", "expected an object"),
            (json!({"profiles": {"p": []}}), "profiles.p", "expected an object"),
            (json!({"profiles": {"p": {"prepend": {}}}}), "profiles.p.prepend", "expected an array"),
            (json!({"profiles": {"p": {"defaults": []}}}), "profiles.p.defaults", "expected an object"),
            (json!([1]), ".", "expected an object"),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}}}, "profile_metadata_key": ""}),
                "profile_metadata_key",
                "non-empty",
            ),
            (json!({"profiles": {"p": {"caps": {"a": 1}}}, "failure_mode": "maybe"}), "failure_mode", "unknown value"),
            (json!({"profiles": {"p": {"caps": {"a": 1}}}, "extra": 1}), "extra", "unknown field"),
            (json!({"profiles": {"p": {"caps": {"a": 1}, "bogus": 1}}}), "profiles.p.bogus", "unknown field"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": "{{team"}]}}}),
                "profiles.p.prepend[0].content",
                "unclosed {{",
            ),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": "{{nope}}"}]}}}),
                "profiles.p.prepend[0].content",
                "unknown template variable {{nope}}",
            ),
            (
                json!({"profiles": {"p": {"append": [{"role": "user", "content": [{"type": "text", "text": "{{x.y}}"}]}]}}}),
                "profiles.p.append[0].content[0].text",
                "unknown template variable",
            ),
            (json!({"profiles": {"p": {"prepend": [{"content": "x"}]}}}), "profiles.p.prepend[0].role", "missing"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "", "content": "x"}]}}}),
                "profiles.p.prepend[0].role",
                "non-empty",
            ),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "{{header.r}}", "content": "x"}]}}}),
                "profiles.p.prepend[0].role",
                "cannot use template",
            ),
            (json!({"profiles": {"p": {"prepend": [{"role": "system"}]}}}), "profiles.p.prepend[0].content", "missing"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": 3}]}}}),
                "profiles.p.prepend[0].content",
                "string or an array",
            ),
            (json!({"profiles": {"p": {"prepend": ["x"]}}}), "profiles.p.prepend[0]", "object with role"),
            (
                json!({"profiles": {"p": {"prepend": [{"role": "system", "content": [{"text": "x"}]}]}}}),
                "profiles.p.prepend[0].content[0].type",
                "missing required field",
            ),
            (
                json!({"profiles": {"p": {"defaults": {"messages": []}}}}),
                "profiles.p.defaults.messages",
                "prepend and append",
            ),
            (
                json!({"profiles": {"p": {"overrides": {"max_tokens": "ten"}}}}),
                "profiles.p.overrides.max_tokens",
                "non-negative integer",
            ),
            (
                json!({"profiles": {"p": {"overrides": {"stream_options": true}}}}),
                "profiles.p.overrides.stream_options",
                "expected an object",
            ),
            (json!({"profiles": {"p": {"defaults": {"user": "{{who}}"}}}}), "profiles.p.defaults.user", "{{who}}"),
            (
                json!({"profiles": {"p": {"defaults": {"metadata": {"a": ["{{x"]}}}}}),
                "profiles.p.defaults.metadata.a[0]",
                "unclosed",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": "1"}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative number",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": -1}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative number",
            ),
            (json!({"profiles": {"p": {"caps": {"": 1}}}}), "profiles.p.caps", "empty field name"),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": 10.5}}}}),
                "profiles.p.caps.max_tokens",
                "non-negative integer",
            ),
            (
                json!({"profiles": {"p": {"caps": {"max_tokens": 100}, "defaults": {"max_tokens": 200}}}}),
                "profiles.p.defaults.max_tokens",
                "above caps.max_tokens",
            ),
            (
                json!({"profiles": {"p": {"caps": {"a": 1}, "on_missing_variable": "skip"}}}),
                "profiles.p.on_missing_variable",
                "unknown value",
            ),
        ];
        for (cfg, field, why) in cases {
            let e = err(cfg.clone());
            assert_eq!(e.field, field, "{cfg}: {e}");
            assert!(e.reason.contains(why), "{cfg}: {e}");
        }
    }

    #[test]
    fn empty_config_is_rejected() {
        assert_eq!(Config::from_json(b"").unwrap_err().field, "profiles");
        assert_eq!(Config::from_json(b" \n").unwrap_err().field, "profiles");
        let e = Config::from_json(br#"{"profiles":{}} x"#).unwrap_err();
        assert_eq!(e.field, ".");
        assert!(!e.reason.contains("line 1"), "{e}");
        assert_eq!(Config::from_json(b"{").unwrap_err().field, ".");
    }
}
