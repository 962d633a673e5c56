//! The request shape checks enrichment needs before it changes a body, per format: a known
//! field of the wrong type (`"max_tokens": "ten"`, a message without `role`) is refused the
//! way the provider would refuse it, never forwarded past a cap. Errors name the path in the
//! client's own body (`messages[0].role: missing required field`).
//!
//! Only the fields enrichment reads or writes are typed; everything else is the provider's
//! business and passes as it came.

use serde_json::{Map, Value};
use sluice_core::api::Api;

/// The output-cap fields of every format (`sluice_core::api::output_cap_fields` per API).
pub const OUTPUT_FIELDS: &[&str] = &["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// A shape error: `path: why`.
fn at(path: &str, why: &str) -> String {
    if path.is_empty() {
        why.to_string()
    } else {
        format!("{path}: {why}")
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// An optional field (absent and `null` are fine) checked by `f`.
fn optional(
    map: &Map<String, Value>,
    key: &str,
    base: &str,
    f: fn(&Value, &str) -> Result<(), String>,
) -> Result<(), String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => f(v, &join(base, key)),
    }
}

fn string(v: &Value, path: &str) -> Result<(), String> {
    if v.is_string() {
        Ok(())
    } else {
        Err(at(path, "expected a string"))
    }
}

fn boolean(v: &Value, path: &str) -> Result<(), String> {
    if v.is_boolean() {
        Ok(())
    } else {
        Err(at(path, "expected a boolean"))
    }
}

fn count(v: &Value, path: &str) -> Result<(), String> {
    if v.is_u64() {
        Ok(())
    } else {
        Err(at(path, "expected a non-negative integer"))
    }
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object().ok_or_else(|| at(path, "expected an object"))
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, String> {
    v.as_array().ok_or_else(|| at(path, "expected an array"))
}

fn stream_options(v: &Value, path: &str) -> Result<(), String> {
    let o = object(v, path)?;
    optional(o, "include_usage", path, boolean)
}

/// A content part or block: an object with a required `type` and an optional `text`.
fn part(v: &Value, path: &str) -> Result<(), String> {
    let o = object(v, path)?;
    match o.get("type") {
        None => return Err(at(&join(path, "type"), "missing required field")),
        Some(t) => string(t, &join(path, "type"))?,
    }
    optional(o, "text", path, string)
}

fn parts(v: &Value, path: &str) -> Result<(), String> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(items) => {
            for (i, p) in items.iter().enumerate() {
                part(p, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Err(at(path, "expected a string or an array of content parts")),
    }
}

fn function(v: &Value, path: &str) -> Result<(), String> {
    let o = object(v, path)?;
    optional(o, "name", path, string)?;
    optional(o, "arguments", path, string)
}

fn tool_calls(v: &Value, path: &str) -> Result<(), String> {
    for (i, c) in array(v, path)?.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let o = object(c, &p)?;
        optional(o, "id", &p, string)?;
        optional(o, "type", &p, string)?;
        optional(o, "function", &p, function)?;
    }
    Ok(())
}

/// One conversation message (chat, or Anthropic Messages): `role` required, `content` a
/// string or parts, tool calls well formed.
pub fn message(v: &Value, path: &str) -> Result<(), String> {
    let o = object(v, path)?;
    match o.get("role") {
        None => return Err(at(&join(path, "role"), "missing required field")),
        Some(r) => string(r, &join(path, "role"))?,
    }
    optional(o, "content", path, parts)?;
    optional(o, "tool_calls", path, tool_calls)
}

fn messages(v: &Value, path: &str) -> Result<(), String> {
    for (i, m) in array(v, path)?.iter().enumerate() {
        message(m, &format!("{path}[{i}]"))?;
    }
    Ok(())
}

/// Responses `input`: a string or a list of items (objects).
fn input(v: &Value, path: &str) -> Result<(), String> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                object(item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Err(at(path, "expected a string or an array of input items")),
    }
}

/// Messages `system`: a string or a list of text blocks.
fn system(v: &Value, path: &str) -> Result<(), String> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(items) => {
            for (i, b) in items.iter().enumerate() {
                part(b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Err(at(path, "expected a string or an array of text blocks")),
    }
}

/// Check the fields of `body` (a JSON object) that enrichment reads or writes, for `api`.
pub fn check_request(api: Api, body: &Value) -> Result<(), String> {
    let o = object(body, "")?;
    optional(o, "model", "", string)?;
    optional(o, "stream", "", boolean)?;
    match api {
        Api::Responses => {
            optional(o, "max_output_tokens", "", count)?;
            optional(o, "instructions", "", string)?;
            optional(o, "input", "", input)
        }
        Api::Messages | Api::CountTokens => {
            optional(o, "max_tokens", "", count)?;
            optional(o, "system", "", system)?;
            optional(o, "messages", "", messages)
        }
        _ => {
            optional(o, "stream_options", "", stream_options)?;
            optional(o, "max_tokens", "", count)?;
            optional(o, "max_completion_tokens", "", count)?;
            optional(o, "messages", "", messages)
        }
    }
}

/// Check a value the gateway writes into `field` (config load): the typed fields must get
/// their type (`max_tokens` a non-negative integer, `stream_options` an object, ...).
pub fn check_field(field: &str, v: &Value) -> Result<(), String> {
    if v.is_null() {
        return Ok(());
    }
    match field {
        "model" => string(v, ""),
        "stream" => boolean(v, ""),
        "stream_options" => stream_options(v, ""),
        "instructions" => string(v, ""),
        f if OUTPUT_FIELDS.contains(&f) => count(v, ""),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_errors_name_the_path() {
        let cases = [
            (json!({"messages": 3}), "messages: expected an array"),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content: expected a string or an array",
            ),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role: missing required field"),
            (json!({"messages": [{"role": null}]}), "messages[0].role: expected a string"),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}]}),
                "messages[0].content[0].type: missing required field",
            ),
            (json!({"max_tokens": -1}), "max_tokens: expected a non-negative integer"),
            (json!({"max_tokens": 1.5}), "max_tokens: expected a non-negative integer"),
            (json!({"stream": "yes"}), "stream: expected a boolean"),
            (json!({"model": 7}), "model: expected a string"),
            (json!({"stream_options": true}), "stream_options: expected an object"),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"function": 3}]}]}),
                "messages[0].tool_calls[0].function: expected an object",
            ),
        ];
        for (body, want) in cases {
            let e = check_request(Api::Chat, &body).unwrap_err();
            assert!(e.starts_with(want), "{body}: {e}");
        }
        let ok = json!({"model": "m", "stream": true, "max_tokens": null, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]});
        assert!(check_request(Api::Chat, &ok).is_ok());
    }

    #[test]
    fn other_formats() {
        assert!(
            check_request(Api::Responses, &json!({"input": "x", "instructions": "i", "max_output_tokens": 5})).is_ok()
        );
        assert!(check_request(Api::Responses, &json!({"input": [{"role": "user", "content": "x"}]})).is_ok());
        assert_eq!(
            check_request(Api::Responses, &json!({"max_output_tokens": "5"})).unwrap_err(),
            "max_output_tokens: expected a non-negative integer"
        );
        assert_eq!(
            check_request(Api::Responses, &json!({"input": 3})).unwrap_err(),
            "input: expected a string or an array of input items"
        );
        assert!(check_request(
            Api::Messages,
            &json!({"system": [{"type": "text", "text": "s"}], "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
        )
        .is_ok());
        assert_eq!(
            check_request(Api::Messages, &json!({"system": 3})).unwrap_err(),
            "system: expected a string or an array of text blocks"
        );
        // Messages has no max_completion_tokens: not typed there.
        assert!(check_request(Api::Messages, &json!({"max_completion_tokens": "x"})).is_ok());
    }

    #[test]
    fn fields_the_gateway_writes() {
        assert!(check_field("max_tokens", &json!(10)).is_ok());
        assert!(check_field("max_output_tokens", &json!(1.5)).is_err());
        assert!(check_field("stream_options", &json!({"include_usage": true})).is_ok());
        assert!(check_field("stream_options", &json!({"include_usage": 1})).is_err());
        assert!(check_field("temperature", &json!("anything")).is_ok());
        assert!(check_field("model", &json!(null)).is_ok());
    }
}
