//! The one config reader every filter uses: strict JSON (unknown fields refused), errors
//! that name the field (`rules[2].limit: expected a non-negative integer, got a string`),
//! durations such as `"500ms"` or `"1h30m"`, and the failure mode.
//!
//! A filter's `Config::load(&Obj)` reads and compiles in one pass with [`Obj`]; the pipeline
//! logs a refused config once, in one wording: `<filter>: invalid config: <field>: <why>`,
//! and `on_configure` returns false (Envoy then refuses the listener: bad config never runs).
//! Hand-written instead of serde derive: derive plus path tracking cost 60–100 KiB of wasm
//! per filter.

use serde_json::{Map, Value};
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

/// Parse a configuration document (empty means `{}`), refusing duplicate keys.
pub fn parse_document(bytes: &[u8]) -> Result<Value, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    crate::json::parse_value(bytes).map_err(|e| ConfigError::new(".", e.to_string()))
}

/// The one wording of a refused configuration, for logs and `envoy --mode validate`.
pub fn refused(filter: &str, e: &ConfigError) -> String {
    format!("{filter}: invalid config: {e}")
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() || path == "." {
        key.to_string()
    } else if key.starts_with('[') {
        format!("{path}{key}")
    } else {
        format!("{path}.{key}")
    }
}

/// A JSON object being read, with its dotted path for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

/// An owned path for nested readers (an `Obj` borrows its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(pub String);

impl<'a> Obj<'a> {
    /// Read `v` at `path` as an object.
    pub fn new(v: &'a Value, path: &'a str) -> Result<Self, ConfigError> {
        match v {
            Value::Object(map) => Ok(Self { map, path }),
            other => Err(ConfigError::new(
                if path.is_empty() { "." } else { path },
                format!("expected an object, got {}", json_kind(other)),
            )),
        }
    }

    /// The path of this object (`.` for the document).
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "."
        } else {
            self.path
        }
    }

    /// The path of a field of this object.
    pub fn field_path(&self, key: &str) -> String {
        join(self.path, key)
    }

    /// An error about `key` (`"."`: the object itself).
    pub fn err(&self, key: &str, why: impl Into<String>) -> ConfigError {
        let field = if key == "." { self.path().to_string() } else { join(self.path, key) };
        ConfigError::new(field, why)
    }

    /// Refuse fields not in `fields`.
    pub fn known(&self, fields: &[&str]) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !fields.contains(&k.as_str())) {
            Some(k) => Err(self.err(k, format!("unknown field `{k}`, expected one of {}", fields.join(", ")))),
            None => Ok(()),
        }
    }

    /// A field (`null` counts as absent).
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the field is present (and not `null`).
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The fields, in document order.
    pub fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No fields.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// An optional string.
    pub fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, got {}", json_kind(v)))),
        }
    }

    /// A required string.
    pub fn required(&self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or_else(|| self.err(key, "missing field"))
    }

    /// An optional non-empty string.
    pub fn non_empty(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.string(key)? {
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            other => Ok(other),
        }
    }

    /// An optional boolean.
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {}", json_kind(v)))),
        }
    }

    /// A boolean with a default.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.boolean(key)?.unwrap_or(default))
    }

    /// An optional non-negative integer.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {}", json_kind(v)))),
        }
    }

    /// An optional count (non-negative integer that fits `usize`).
    pub fn count(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(n) => usize::try_from(n).map(Some).map_err(|_| self.err(key, "too large")),
        }
    }

    /// An optional integer in `[min, max]`.
    pub fn ranged(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.u64(key)? {
            Some(n) if n < min || n > max => Err(self.err(key, format!("must be between {min} and {max}, got {n}"))),
            other => Ok(other),
        }
    }

    /// An optional number (integer or decimal).
    pub fn number(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {}", json_kind(v)))),
        }
    }

    /// An optional duration string (`"500ms"`, `"90s"`, `"1h"`).
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => parse_duration(&s).map(Some).map_err(|e| self.err(key, e)),
        }
    }

    /// An optional failure mode (`"allow"` or `"deny"`).
    pub fn failure_mode(&self, key: &str) -> Result<Option<FailureMode>, ConfigError> {
        match self.string(key)?.as_deref() {
            None => Ok(None),
            Some("allow") => Ok(Some(FailureMode::Allow)),
            Some("deny") => Ok(Some(FailureMode::Deny)),
            Some(other) => Err(self.err(key, format!("expected \"allow\" or \"deny\", got {other:?}"))),
        }
    }

    /// One of `choices`.
    pub fn choice(&self, key: &str, choices: &[&str]) -> Result<Option<String>, ConfigError> {
        match self.string(key)? {
            Some(s) if !choices.contains(&s.as_str()) => {
                Err(self.err(key, format!("expected one of {}, got {s:?}", choices.join(", "))))
            }
            other => Ok(other),
        }
    }

    /// A nested object, read with `f` (which gets the object and its path).
    pub fn object<T>(
        &self,
        key: &str,
        f: impl FnOnce(Obj<'_>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let path = join(self.path, key);
        let o = Obj::new(v, &path)?;
        f(o).map(Some)
    }

    /// A list, each element read with `f` (which gets the element and its path).
    pub fn list<T>(
        &self,
        key: &str,
        mut f: impl FnMut(&'a Value, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let base = join(self.path, key);
                let mut out = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    out.push(f(v, &format!("{base}[{i}]"))?);
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.err(key, format!("expected a list, got {}", json_kind(v)))),
        }
    }

    /// A list of objects, each read with `f`.
    pub fn objects<T>(
        &self,
        key: &str,
        mut f: impl FnMut(Obj<'_>) -> Result<T, ConfigError>,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        self.list(key, |v, path| f(Obj::new(v, path)?))
    }

    /// A map of name to object, each read with `f(name, obj)`, in document order.
    pub fn named<T>(
        &self,
        key: &str,
        mut f: impl FnMut(&str, Obj<'_>) -> Result<T, ConfigError>,
    ) -> Result<Option<Vec<(String, T)>>, ConfigError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let base = join(self.path, key);
        let o = Obj::new(v, &base)?;
        let mut out = Vec::with_capacity(o.len());
        for (name, item) in o.entries() {
            let path = join(&base, name);
            out.push((name.clone(), f(name, Obj::new(item, &path)?)?));
        }
        Ok(Some(out))
    }

    /// A list of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        self.list(key, |v, path| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| ConfigError::new(path, format!("expected a string, got {}", json_kind(v))))
        })
    }
}

/// Read a whole document with `f`, the root object at path `.`.
pub fn read<T>(bytes: &[u8], f: impl FnOnce(Obj<'_>) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
    let doc = parse_document(bytes)?;
    f(Obj::new(&doc, "")?)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    #[test]
    fn reader_names_the_field() {
        let doc = parse_document(br#"{"rules":[{"limit":1},{"limit":"x"}],"mode":"maybe","d":"5y"}"#).unwrap();
        let o = Obj::new(&doc, "").unwrap();
        let e = o
            .objects("rules", |r| {
                r.known(&["limit"])?;
                r.u64("limit")
            })
            .unwrap_err();
        assert_eq!(e.field, "rules[1].limit");
        assert_eq!(e.to_string(), "rules[1].limit: expected a non-negative integer, got a string");
        assert_eq!(o.failure_mode("mode").unwrap_err().field, "mode");
        assert!(o.duration("d").unwrap_err().reason.contains("unknown unit"));
        let e = o.known(&["rules"]).unwrap_err();
        assert!(e.reason.contains("unknown field `mode`"), "{e}");
        let nested = parse_document(br#"{"a":{"b":{"c":true}}}"#).unwrap();
        let o = Obj::new(&nested, "").unwrap();
        let e = o.object("a", |a| a.object("b", |b| b.u64("c"))).unwrap_err();
        assert_eq!(e.to_string(), "a.b.c: expected a non-negative integer, got a boolean");
        let named = o.named("a", |name, _| Ok(name.to_string())).unwrap().unwrap();
        assert_eq!(named[0].0, "b");
        assert_eq!(refused("auth", &e), "auth: invalid config: a.b.c: expected a non-negative integer, got a boolean");
    }

    #[test]
    fn documents() {
        assert!(parse_document(b"  ").unwrap().as_object().unwrap().is_empty());
        assert_eq!(parse_document(b"{} trailing").unwrap_err().field, ".");
        assert!(parse_document(br#"{"a":1,"a":2}"#).unwrap_err().reason.contains("duplicate"));
        let e = read(b"[1]", |_| Ok(())).unwrap_err();
        assert_eq!(e.to_string(), ".: expected an object, got an array");
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
