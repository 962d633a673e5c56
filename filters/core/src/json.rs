//! Request and response JSON: parsed once, strictly, into `serde_json::Value`.
//!
//! Bodies are parsed with serde_json's recursion limit (128), so hostile nesting is an error,
//! never a stack overflow. A duplicate object key anywhere in a body is an error
//! ([`JsonError::DuplicateKey`]): providers' parsers disagree on which copy wins (Python and
//! Go keep the last, some keep the first), so a body with two `"model"` keys could be checked
//! as one request and served as another. sluice refuses such bodies with 400 instead of
//! guessing, and forwards exactly the bytes it checked (or its own re-serialization after a
//! change). See docs/security.md.
//!
//! Also here: small helpers every filter uses on untrusted strings (cutting on a char
//! boundary, lossy header values) so no filter slices a `str` by hand.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Why a body is not the JSON a filter can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not UTF-8.
    NotUtf8,
    /// Not valid JSON (syntax, truncation, nesting deeper than 128); the text says where.
    Syntax(String),
    /// An object has the same key twice; the path names it (`messages[0].content`).
    DuplicateKey(String),
    /// Valid JSON but not an object.
    NotObject,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("body is not valid UTF-8"),
            Self::Syntax(why) => write!(f, "body is not valid JSON: {why}"),
            Self::DuplicateKey(path) => write!(f, "duplicate JSON key {path:?}"),
            Self::NotObject => f.write_str("body is not a JSON object"),
        }
    }
}

impl std::error::Error for JsonError {}

/// Parse a request or response body that must be a JSON object, refusing duplicate keys.
pub fn parse_object(bytes: &[u8]) -> Result<Value, JsonError> {
    let v = parse_value(bytes)?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(JsonError::NotObject)
    }
}

/// Parse any JSON value, refusing duplicate keys.
pub fn parse_value(bytes: &[u8]) -> Result<Value, JsonError> {
    let text = std::str::from_utf8(bytes).map_err(|_| JsonError::NotUtf8)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut dup: Option<String> = None;
    let seed = Strict { path: Path::Root, dup: &mut dup };
    let result = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match (result, dup) {
        (_, Some(path)) => Err(JsonError::DuplicateKey(path)),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(JsonError::Syntax(strip_position(&e.to_string()))),
    }
}

/// Parse leniently (last duplicate wins), for bodies sluice only reads (provider answers).
pub fn parse_lenient(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes).ok()
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// Where in the document a value sits, built only when a duplicate is found.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Root => String::new(),
            Path::Key(parent, k) => {
                let p = parent.render();
                if p.is_empty() {
                    (*k).to_string()
                } else {
                    format!("{p}.{k}")
                }
            }
            Path::Index(parent, i) => format!("{}[{i}]", parent.render()),
        }
    }
}

struct Strict<'a, 'p> {
    path: Path<'p>,
    dup: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_, '_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            let parent = self.path;
            let seed = Strict { path: Path::Index(&parent, i), dup: &mut *self.dup };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => break,
            }
            i = i.saturating_add(1);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let parent = self.path;
            let value = {
                let seed = Strict { path: Path::Key(&parent, &key), dup: &mut *self.dup };
                map.next_value_seed(seed)?
            };
            if out.contains_key(&key) {
                if self.dup.is_none() {
                    *self.dup = Some(Path::Key(&parent, &key).render());
                }
                // Stop here: the caller refuses the body, nothing more needs reading.
                return Err(de::Error::custom("duplicate key"));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut at = max;
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    s.get(..at).unwrap_or("")
}

/// Cut `s` in place to at most `max` bytes, on a char boundary.
pub fn truncate(s: &mut String, max: usize) {
    let n = cut(s, max).len();
    s.truncate(n);
}

/// A header or metadata value as text, invalid UTF-8 replaced.
pub fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// A string field of an object.
pub fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// JSON-encode a string (with quotes).
pub fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_objects_and_refuses_duplicates_anywhere() {
        let v = parse_object(br#"{"model":"a","messages":[{"role":"user","content":"hi"}],"n":1.5,"x":null}"#).unwrap();
        assert_eq!(v["model"], "a");
        assert_eq!(v["n"], 1.5);
        for (body, path) in [
            (r#"{"model":"a","model":"b"}"#, "model"),
            (r#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#, "messages[0].content"),
            (r#"{"a":{"b":{"c":1,"c":2}}}"#, "a.b.c"),
            (r#"{"tools":[{},{"function":{"name":"x","name":"y"}}]}"#, "tools[1].function.name"),
        ] {
            assert_eq!(parse_object(body.as_bytes()), Err(JsonError::DuplicateKey(path.into())), "{body}");
        }
    }

    #[test]
    fn other_errors() {
        assert_eq!(parse_object(b"\xff"), Err(JsonError::NotUtf8));
        assert_eq!(parse_object(b"[1]"), Err(JsonError::NotObject));
        assert!(matches!(parse_object(b"{\"a\":"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b"{} x"), Err(JsonError::Syntax(_))));
        let deep = "[".repeat(100_000);
        assert!(matches!(parse_value(deep.as_bytes()), Err(JsonError::Syntax(_))));
        let e = parse_object(b"{\"a\":").unwrap_err().to_string();
        assert!(!e.contains("line 1"), "{e}");
    }

    #[test]
    fn cuts_on_char_boundaries() {
        let s = format!("{}é", "a".repeat(255));
        assert_eq!(cut(&s, 256).len(), 255);
        assert_eq!(cut(&s, 257), s);
        assert_eq!(cut("日本語", 4), "日");
        assert_eq!(cut("日本語", 0), "");
        let mut t = s.clone();
        truncate(&mut t, 256);
        assert_eq!(t.len(), 255);
        // every cut of every prefix length is valid UTF-8 and never longer than asked
        for n in 0..=s.len() + 2 {
            assert!(cut(&s, n).len() <= n);
        }
    }
}
