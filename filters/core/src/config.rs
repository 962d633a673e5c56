//! Config helpers shared by every filter: strict JSON loading with errors that name the
//! field, durations such as `"500ms"` or `"1h30m"`, and the failure mode.
//!
//! Filters parse in two stages (see STYLE.md): serde reads a `Raw*` struct strictly
//! (`deny_unknown_fields`), then `Config::try_from(raw)` checks ranges and compiles.
//! Both stages report a [`ConfigError`] whose `field` is a dotted path like `rules[2].limit`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A rejected configuration: which field, and why. Displayed as `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field (`.` for the document itself).
    pub field: String,
    /// Human-readable reason.
    pub reason: String,
}

impl ConfigError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// Prefix the field path, for errors raised while validating a nested struct.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field == "." || self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Parse a filter's JSON configuration strictly. An empty configuration is read as `{}`.
/// Errors carry the path of the field serde stopped at.
pub fn parse_json_config<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let trimmed = bytes.iter().all(|b| b.is_ascii_whitespace());
    let input: &[u8] = if trimmed { b"{}" } else { bytes };
    let mut de = serde_json::Deserializer::from_slice(input);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::new(path, strip_position(&inner.to_string()))
    })?;
    de.end().map_err(|e| ConfigError::new(".", strip_position(&e.to_string())))?;
    Ok(value)
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// Parse a duration: one or more `<integer><unit>` groups, units `ms`, `s`, `m`, `h`, `d`
/// (`"500ms"`, `"90s"`, `"1h30m"`, `"1d"`). A bare `"0"` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration; use e.g. \"500ms\", \"90s\", \"1h\", \"1d\"".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {s:?}: expected a number before {rest:?}"));
        }
        let (num, tail) = rest.split_at(digits);
        let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("invalid duration {s:?}: missing unit (ms, s, m, h, d)")),
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        let add = n.checked_mul(millis_per_unit).ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        total = total.checked_add(add).ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        rest = tail;
    }
    Ok(Duration::from_millis(total))
}

/// serde `deserialize_with` for a required duration string.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// serde `deserialize_with` for an optional duration string.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
}

/// How a config error names a JSON value's type: `"a string"`, `"an array"`, ... (for strict
/// hand-written readers over `serde_json::Value`, which some filters use instead of serde
/// derive to stay inside their wasm size budget).
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a filter does when it cannot decide (a callout failed, a backend is down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Let the request through.
    Allow,
    /// Refuse the request.
    Deny,
}

/// Check an environment variable name as Envoy passes it (`host_env_keys`): letters,
/// digits and `_`, not starting with a digit.
pub fn validate_env_var_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("empty environment variable name".into()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(format!("invalid environment variable name {name:?}: must start with a letter or _"))
        }
        _ => {}
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!("invalid environment variable name {name:?}: only letters, digits and _"))
    }
}

/// Check a header name: lowercase token characters (HTTP/2 requires lowercase).
pub fn validate_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty header name".into());
    }
    let ok = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid header name {name:?}: use lowercase token characters"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("500ms", 500),
            ("90s", 90_000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("1d", 86_400_000),
            ("1h30m", 5_400_000),
            (" 2s ", 2_000),
            ("0", 0),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "s", "10", "10x", "1.5s", "-1s", "99999999999999999999d", "1h 30m"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        limit: u64,
        #[serde(default, deserialize_with = "de_opt_duration")]
        window: Option<Duration>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        #[serde(default)]
        rules: Vec<Inner>,
        failure_mode: Option<FailureMode>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json_config::<Outer>(br#"{"rules":[{"limit":1},{"limit":"x"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[1].limit");
        assert!(e.reason.contains("invalid type"), "{e}");
        assert!(!e.reason.contains("line 1"), "{e}");

        let e = parse_json_config::<Outer>(br#"{"rulez":[]}"#).unwrap_err();
        assert!(e.reason.contains("unknown field `rulez`"), "{e}");

        let e = parse_json_config::<Outer>(br#"{"rules":[{"limit":1,"window":"5y"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].window");
        assert!(e.reason.contains("unknown unit"), "{e}");

        let e = parse_json_config::<Outer>(br#"{"failure_mode":"maybe"}"#).unwrap_err();
        assert_eq!(e.field, "failure_mode");

        let e = parse_json_config::<Outer>(b"{} trailing").unwrap_err();
        assert_eq!(e.field, ".");
    }

    #[test]
    fn empty_config_is_empty_object() {
        let c = parse_json_config::<Outer>(b"  ").unwrap();
        assert!(c.rules.is_empty());
    }

    #[test]
    fn within_builds_paths() {
        assert_eq!(ConfigError::new("limit", "x").within("rules[0]").field, "rules[0].limit");
        assert_eq!(ConfigError::new("[1]", "x").within("backups").field, "backups[1]");
        assert_eq!(ConfigError::new(".", "x").within("auth").to_string(), "auth: x");
    }

    #[test]
    fn json_kinds() {
        assert_eq!(json_kind(&serde_json::json!([1])), "an array");
        assert_eq!(json_kind(&serde_json::json!({})), "an object");
        assert_eq!(json_kind(&serde_json::Value::Null), "null");
    }

    #[test]
    fn env_and_header_names() {
        assert!(validate_env_var_name("OPENAI_API_KEY").is_ok());
        assert!(validate_env_var_name("_X1").is_ok());
        for bad in ["", "1X", "A-B", "A B", "ä"] {
            assert!(validate_env_var_name(bad).is_err(), "{bad}");
        }
        assert!(validate_header_name("x-user").is_ok());
        for bad in ["", "X-User", "a b", "a:b"] {
            assert!(validate_header_name(bad).is_err(), "{bad}");
        }
    }
}
