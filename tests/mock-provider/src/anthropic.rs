//! `POST …/messages` and `POST …/messages/count_tokens` (Anthropic
//! Messages API): request validation with the real API's messages, the
//! message object, the typed SSE stream and Anthropic-shaped errors. No I/O
//! here.

use serde_json::{json, Map, Value};

use crate::provider::{content_bytes, split_text, sse_named, Reply, UsageReport};

/// Top-level keys a Messages request may have.
pub const ALLOWED_KEYS: [&str; 13] = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
];

/// Content block types accepted inside `messages[].content`.
const BLOCK_TYPES: [&str; 5] = ["text", "image", "tool_use", "tool_result", "document"];

/// Anthropic-style error object.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub fn invalid_request(message: &str) -> Value {
    error_body("invalid_request_error", message)
}

pub fn rate_limit_error(model: &str, name: &str) -> Value {
    error_body("rate_limit_error", &format!("Rate limit reached for {model} (mock {name})"))
}

pub fn unavailable_error(name: &str) -> Value {
    error_body("overloaded_error", &format!("mock {name} unavailable"))
}

/// The 400 for a prompt of `prompt` tokens over a window of `window`.
pub fn context_length_error(window: u64, prompt: u64) -> Value {
    invalid_request(&format!("prompt is too long: {prompt} tokens > {window} maximum"))
}

/// The `anthropic-version` header check.
pub fn check_version(header: Option<&str>) -> Result<(), String> {
    match header.map(str::trim) {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err("anthropic-version: header is required".into()),
    }
}

fn is_number(v: &Value) -> bool {
    v.is_number()
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

fn expect_object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object().ok_or_else(|| format!("{at}: Input should be a valid dictionary"))
}

fn expect_string(v: Option<&Value>, at: &str) -> Result<(), String> {
    match v {
        None => Err(format!("{at}: Field required")),
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(format!("{at}: Input should be a valid string")),
    }
}

fn range(v: &Value, at: &str, min: f64, max: Option<f64>) -> Result<(), String> {
    let Some(x) = v.as_f64().filter(|_| is_number(v)) else {
        return Err(format!("{at}: Input should be a valid number"));
    };
    if x < min {
        return Err(format!("{at}: Input should be greater than or equal to {min}"));
    }
    match max {
        Some(max) if x > max => Err(format!("{at}: Input should be less than or equal to {max}")),
        _ => Ok(()),
    }
}

fn check_block(block: &Value, at: &str) -> Result<(), String> {
    let obj = expect_object(block, at)?;
    let kind = match obj.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        _ => return Err(format!("{at}: Unable to extract tag using discriminator 'type'")),
    };
    if !BLOCK_TYPES.contains(&kind) {
        return Err(format!(
            "{at}: Input tag '{kind}' found using 'type' does not match any of the expected tags: 'text', \
             'image', 'tool_use', 'tool_result', 'document'"
        ));
    }
    match kind {
        "text" => expect_string(obj.get("text"), &format!("{at}.text")),
        "image" | "document" => match obj.get("source") {
            Some(Value::Object(_)) => Ok(()),
            None => Err(format!("{at}.source: Field required")),
            Some(_) => Err(format!("{at}.source: Input should be a valid dictionary")),
        },
        "tool_use" => {
            expect_string(obj.get("id"), &format!("{at}.id"))?;
            expect_string(obj.get("name"), &format!("{at}.name"))?;
            match obj.get("input") {
                Some(Value::Object(_)) => Ok(()),
                None => Err(format!("{at}.input: Field required")),
                Some(_) => Err(format!("{at}.input: Input should be a valid dictionary")),
            }
        }
        _ => expect_string(obj.get("tool_use_id"), &format!("{at}.tool_use_id")),
    }
}

fn check_message(message: &Value, i: usize) -> Result<(), String> {
    let at = format!("messages.{i}");
    let obj = expect_object(message, &at)?;
    for key in obj.keys() {
        if key != "role" && key != "content" {
            return Err(format!("{at}.{key}: Extra inputs are not permitted"));
        }
    }
    match obj.get("role") {
        None => return Err(format!("{at}.role: Field required")),
        Some(Value::String(role)) if role == "user" || role == "assistant" => {}
        Some(Value::String(role)) if role == "system" => {
            return Err("messages: Unexpected role \"system\". The Messages API accepts a top-level `system` \
                        parameter, not \"system\" as an input message role."
                .into());
        }
        Some(_) => return Err(format!("{at}.role: Input should be 'user' or 'assistant'")),
    }
    match obj.get("content") {
        None => Err(format!("{at}.content: Field required")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(blocks)) => {
            blocks.iter().enumerate().try_for_each(|(j, b)| check_block(b, &format!("{at}.content.{j}")))
        }
        Some(_) => Err(format!("{at}.content: Input should be a valid string or a list of content blocks")),
    }
}

fn check_system(system: &Value) -> Result<(), String> {
    match system {
        Value::String(_) => Ok(()),
        Value::Array(blocks) => blocks.iter().enumerate().try_for_each(|(j, block)| {
            let at = format!("system.{j}");
            let obj = expect_object(block, &at)?;
            match obj.get("type") {
                Some(Value::String(t)) if t == "text" => expect_string(obj.get("text"), &format!("{at}.text")),
                Some(Value::String(t)) => Err(format!("{at}.type: Input should be 'text' (got '{t}')")),
                _ => Err(format!("{at}.type: Field required")),
            }
        }),
        _ => Err("system: Input should be a valid string or a list of text blocks".into()),
    }
}

fn check_tools(tools: &Value) -> Result<(), String> {
    let Value::Array(tools) = tools else {
        return Err("tools: Input should be a valid list".into());
    };
    tools.iter().enumerate().try_for_each(|(j, tool)| {
        let at = format!("tools.{j}");
        let obj = expect_object(tool, &at)?;
        expect_string(obj.get("name"), &format!("{at}.name"))?;
        if let Some(description) = obj.get("description") {
            expect_string(Some(description), &format!("{at}.description"))?;
        }
        // Server tools (`"type": "web_search_20250305"` …) have no schema.
        let custom = obj.get("type").is_none_or(|t| t == "custom");
        match obj.get("input_schema") {
            Some(Value::Object(_)) => Ok(()),
            None if !custom => Ok(()),
            None => Err(format!("{at}.input_schema: Field required")),
            Some(_) => Err(format!("{at}.input_schema: Input should be a valid dictionary")),
        }
    })
}

fn check_tool_choice(choice: &Value) -> Result<(), String> {
    let obj = expect_object(choice, "tool_choice")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("auto" | "any" | "none") => Ok(()),
        Some("tool") => expect_string(obj.get("name"), "tool_choice.tool.name"),
        Some(other) => Err(format!(
            "tool_choice: Input tag '{other}' found using 'type' does not match any of the expected tags: 'auto', \
             'any', 'tool', 'none'"
        )),
        None => Err("tool_choice: Unable to extract tag using discriminator 'type'".into()),
    }
}

fn check_thinking(thinking: &Value, max_tokens: Option<&Value>) -> Result<(), String> {
    let obj = expect_object(thinking, "thinking")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("disabled") => Ok(()),
        Some("enabled") => {
            let budget = match obj.get("budget_tokens") {
                None => return Err("thinking.enabled.budget_tokens: Field required".into()),
                Some(v) if is_integer(v) => v.as_i64().unwrap_or(i64::MAX),
                Some(_) => return Err("thinking.enabled.budget_tokens: Input should be a valid integer".into()),
            };
            if budget < 1024 {
                return Err("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024".into());
            }
            match max_tokens.and_then(Value::as_i64) {
                Some(max) if max <= budget => Err("`max_tokens` must be greater than `thinking.budget_tokens`. \
                                                   Please consult our documentation at \
                                                   https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
                    .into()),
                _ => Ok(()),
            }
        }
        Some(other) => Err(format!(
            "thinking: Input tag '{other}' found using 'type' does not match any of the expected tags: 'enabled', \
             'disabled'"
        )),
        None => Err("thinking: Unable to extract tag using discriminator 'type'".into()),
    }
}

/// Validates a Messages request body (`count_tokens`: `max_tokens` is not
/// required). The error is the message for an `invalid_request_error`.
pub fn validate(body: &Value, count_tokens: bool) -> Result<(), String> {
    let obj = expect_object(body, "body")?;
    for key in obj.keys() {
        if !ALLOWED_KEYS.contains(&key.as_str()) {
            return Err(format!("{key}: Extra inputs are not permitted"));
        }
    }
    expect_string(obj.get("model"), "model")?;
    match obj.get("max_tokens") {
        None if count_tokens => {}
        None => return Err("max_tokens: Field required".into()),
        Some(v) if !is_integer(v) => return Err("max_tokens: Input should be a valid integer".into()),
        Some(v) if v.as_i64().is_some_and(|n| n < 1) => {
            return Err("max_tokens: Input should be greater than or equal to 1".into())
        }
        Some(_) => {}
    }
    match obj.get("messages") {
        None => return Err("messages: Field required".into()),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err("messages: at least one message is required".into())
        }
        Some(Value::Array(messages)) => {
            messages.iter().enumerate().try_for_each(|(i, m)| check_message(m, i))?;
        }
        Some(_) => return Err("messages: Input should be a valid list".into()),
    }
    if let Some(system) = obj.get("system") {
        check_system(system)?;
    }
    if let Some(stops) = obj.get("stop_sequences") {
        let Value::Array(stops) = stops else {
            return Err("stop_sequences: Input should be a valid list".into());
        };
        for (j, stop) in stops.iter().enumerate() {
            expect_string(Some(stop), &format!("stop_sequences.{j}"))?;
        }
    }
    if obj.get("stream").is_some_and(|s| !s.is_boolean()) {
        return Err("stream: Input should be a valid boolean".into());
    }
    if let Some(t) = obj.get("temperature") {
        range(t, "temperature", 0.0, Some(1.0))?;
    }
    if let Some(p) = obj.get("top_p") {
        range(p, "top_p", 0.0, Some(1.0))?;
    }
    if let Some(k) = obj.get("top_k") {
        if !is_integer(k) {
            return Err("top_k: Input should be a valid integer".into());
        }
        range(k, "top_k", 0.0, None)?;
    }
    if let Some(tools) = obj.get("tools") {
        check_tools(tools)?;
    }
    if let Some(choice) = obj.get("tool_choice") {
        check_tool_choice(choice)?;
    }
    if let Some(metadata) = obj.get("metadata") {
        let metadata = expect_object(metadata, "metadata")?;
        match metadata.get("user_id") {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(_) => return Err("metadata.user_id: Input should be a valid string".into()),
        }
    }
    if let Some(thinking) = obj.get("thinking") {
        check_thinking(thinking, obj.get("max_tokens"))?;
    }
    Ok(())
}

/// Prompt bytes: `system` (a string, or the `text` of its blocks) plus every
/// message's `content` (a string, or the string `text` of its blocks).
pub fn prompt_bytes(body: &Value) -> usize {
    let system = content_bytes(body.get("system"));
    let messages: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| messages.iter().map(|m| content_bytes(m.get("content"))).sum());
    system + messages
}

/// `(input_tokens, output_tokens, cache_read_input_tokens)` or garbage.
fn usage_json(usage: UsageReport, output_tokens: Option<u64>) -> Option<Value> {
    match usage {
        UsageReport::Omitted => None,
        UsageReport::Garbage => Some(json!({"input_tokens": "x", "output_tokens": -3})),
        UsageReport::Counts { prompt, completion, cached, .. } => Some(json!({
            "input_tokens": prompt,
            "output_tokens": output_tokens.unwrap_or(completion),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached.unwrap_or(0),
        })),
    }
}

fn message_object(reply: &Reply, content: Value, stop_reason: Value, usage: Option<Value>) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(reply.id));
    obj.insert("type".into(), json!("message"));
    obj.insert("role".into(), json!("assistant"));
    obj.insert("model".into(), json!(reply.model));
    obj.insert("content".into(), content);
    obj.insert("stop_reason".into(), stop_reason);
    obj.insert("stop_sequence".into(), Value::Null);
    if let Some(usage) = usage {
        obj.insert("usage".into(), usage);
    }
    Value::Object(obj)
}

/// Id of the mock's `tool_use` block (`x-mock-tool-args`).
pub const TOOL_USE_ID: &str = "toolu_mock_1";

/// The `tool_use` input for `x-mock-tool-args` (its JSON object, else `{}`).
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments).ok().filter(Value::is_object).unwrap_or_else(|| json!({}))
}

fn stop_reason(reply: &Reply) -> &'static str {
    if reply.extras.tool_args.is_some() {
        "tool_use"
    } else {
        "end_turn"
    }
}

/// Non-streaming message body (with `x-mock-tool-args`, a `lookup` tool_use block after
/// the text and `stop_reason: "tool_use"`).
pub fn message_body(reply: &Reply) -> Value {
    let mut content = vec![json!({"type": "text", "text": reply.text})];
    if let Some(arguments) = &reply.extras.tool_args {
        content.push(json!({"type": "tool_use", "id": TOOL_USE_ID, "name": "lookup", "input": tool_input(arguments)}));
    }
    message_object(reply, Value::Array(content), json!(stop_reason(reply)), usage_json(reply.usage, None))
}

/// `count_tokens` body.
pub fn count_tokens_body(input_tokens: u64) -> Value {
    json!({"input_tokens": input_tokens})
}

fn event(data: &Value) -> String {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("unknown");
    sse_named(kind, &data.to_string())
}

/// The stream: message_start, content_block_start, ping, one
/// content_block_delta per piece, content_block_stop, message_delta,
/// message_stop.
pub fn stream_events(reply: &Reply, pieces: usize) -> Vec<String> {
    let start = message_object(reply, json!([]), Value::Null, usage_json(reply.usage, Some(1)));
    let mut events = vec![
        event(&json!({"type": "message_start", "message": start})),
        event(&json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        event(&json!({"type": "ping"})),
    ];
    for piece in split_text(&reply.text, pieces) {
        events.push(event(&json!({
            "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}
        })));
    }
    events.push(event(&json!({"type": "content_block_stop", "index": 0})));
    if let Some(arguments) = &reply.extras.tool_args {
        events.push(event(&json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": TOOL_USE_ID, "name": "lookup", "input": {}}})));
        // The input as JSON text, in pieces (the real API streams `partial_json`).
        let text = tool_input(arguments).to_string();
        for piece in split_text(&text, pieces) {
            events.push(event(&json!({
                "type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}
            })));
        }
        events.push(event(&json!({"type": "content_block_stop", "index": 1})));
    }
    let mut delta = Map::new();
    delta.insert("type".into(), json!("message_delta"));
    delta.insert("delta".into(), json!({"stop_reason": stop_reason(reply), "stop_sequence": null}));
    match reply.usage {
        UsageReport::Omitted => {}
        UsageReport::Garbage => {
            delta.insert("usage".into(), json!({"output_tokens": -3}));
        }
        UsageReport::Counts { completion, .. } => {
            delta.insert("usage".into(), json!({"output_tokens": completion}));
        }
    }
    events.push(event(&Value::Object(delta)));
    events.push(event(&json!({"type": "message_stop"})));
    events
}

/// Events sent before a truncate / stall_mid_stream cut: up to and
/// including the first content_block_delta.
pub const STREAM_CUT: usize = 4;

/// message_start, then a cut-off content_block_delta; the stream then ends.
pub fn malformed_stream_events(reply: &Reply) -> Vec<String> {
    let mut events: Vec<String> = stream_events(reply, 1).into_iter().take(1).collect();
    events.push(sse_named("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"te"#));
    events
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::provider::Extras;

    fn ok_body() -> Value {
        json!({"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut body = ok_body();
        body[key] = value;
        body
    }

    fn err(body: &Value) -> String {
        validate(body, false).unwrap_err()
    }

    fn reply(usage: UsageReport) -> Reply {
        Reply {
            id: "msg_mock_3".into(),
            model: "claude-x".into(),
            text: "Hello from mock.".into(),
            usage,
            extras: Extras::default(),
        }
    }

    #[test]
    fn valid_requests() {
        validate(&ok_body(), false).unwrap();
        let full = json!({
            "model": "c", "max_tokens": 2048,
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}
                ]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}
            ],
            "system": [{"type": "text", "text": "sys"}],
            "stop_sequences": ["\n\nHuman:"], "stream": false, "temperature": 1, "top_p": 0.9, "top_k": 5,
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "f"}, "metadata": {"user_id": "u"},
            "thinking": {"type": "enabled", "budget_tokens": 1024}
        });
        validate(&full, false).unwrap();
        let mut no_max = ok_body();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        validate(&no_max, true).unwrap();
        assert_eq!(validate(&no_max, false).unwrap_err(), "max_tokens: Field required");
    }

    #[test]
    fn invalid_requests() {
        assert_eq!(err(&with("foo", json!(1))), "foo: Extra inputs are not permitted");
        assert_eq!(err(&with("stream_options", json!({}))), "stream_options: Extra inputs are not permitted");
        assert_eq!(err(&with("model", json!(3))), "model: Input should be a valid string");
        assert_eq!(err(&with("max_tokens", json!(0))), "max_tokens: Input should be greater than or equal to 1");
        assert_eq!(err(&with("max_tokens", json!(1.5))), "max_tokens: Input should be a valid integer");
        assert_eq!(err(&with("max_tokens", json!("5"))), "max_tokens: Input should be a valid integer");
        assert_eq!(err(&with("messages", json!([]))), "messages: at least one message is required");
        assert_eq!(err(&with("messages", json!("hi"))), "messages: Input should be a valid list");
        assert!(err(&with("messages", json!([{"role": "system", "content": "x"}]))).contains("top-level `system`"));
        assert_eq!(
            err(&with("messages", json!([{"role": "bot", "content": "x"}]))),
            "messages.0.role: Input should be 'user' or 'assistant'"
        );
        assert_eq!(err(&with("messages", json!([{"role": "user"}]))), "messages.0.content: Field required");
        assert_eq!(
            err(&with("messages", json!([{"role": "user", "content": "a", "name": "n"}]))),
            "messages.0.name: Extra inputs are not permitted"
        );
        assert!(err(&with("messages", json!([{"role": "user", "content": [{"type": "video"}]}])))
            .starts_with("messages.0.content.0: Input tag 'video'"));
        assert_eq!(
            err(&with("messages", json!([{"role": "user", "content": [{"type": "text"}]}]))),
            "messages.0.content.0.text: Field required"
        );
        assert_eq!(err(&with("temperature", json!(1.5))), "temperature: Input should be less than or equal to 1");
        assert_eq!(err(&with("temperature", json!(-1))), "temperature: Input should be greater than or equal to 0");
        assert_eq!(err(&with("temperature", json!("hot"))), "temperature: Input should be a valid number");
        assert_eq!(err(&with("top_k", json!(-1))), "top_k: Input should be greater than or equal to 0");
        assert_eq!(err(&with("stream", json!("yes"))), "stream: Input should be a valid boolean");
        assert_eq!(err(&with("stop_sequences", json!([1]))), "stop_sequences.0: Input should be a valid string");
        assert_eq!(err(&with("system", json!(5))), "system: Input should be a valid string or a list of text blocks");
        assert_eq!(err(&with("tools", json!([{"name": "f"}]))), "tools.0.input_schema: Field required");
        assert_eq!(err(&with("tools", json!([{"input_schema": {}}]))), "tools.0.name: Field required");
        assert!(err(&with("tool_choice", json!({"type": "sometimes"}))).contains("'sometimes'"));
        assert_eq!(err(&with("metadata", json!([]))), "metadata: Input should be a valid dictionary");
        assert!(err(&with("thinking", json!({"type": "enabled", "budget_tokens": 10}))).contains("1024"));
        assert!(err(&with("thinking", json!({"type": "enabled", "budget_tokens": 2000}))).contains("max_tokens"));
        let mut no_model = ok_body();
        no_model.as_object_mut().unwrap().remove("model");
        assert_eq!(err(&no_model), "model: Field required");
        assert_eq!(validate(&json!([1]), false).unwrap_err(), "body: Input should be a valid dictionary");
        assert_eq!(check_version(None).unwrap_err(), "anthropic-version: header is required");
        assert!(check_version(Some(" ")).is_err());
        check_version(Some("2023-06-01")).unwrap();
    }

    #[test]
    fn prompt_bytes_counts_system_and_messages() {
        let body = json!({
            "system": [{"type": "text", "text": "abc"}],
            "messages": [
                {"role": "user", "content": "héllo"},
                {"role": "user", "content": [{"type": "text", "text": "xy"}, {"type": "image", "source": {}}]}
            ]
        });
        assert_eq!(prompt_bytes(&body), 3 + 6 + 2);
        assert_eq!(prompt_bytes(&json!({"system": "abcd", "messages": []})), 4);
    }

    #[test]
    fn tool_use_blocks() {
        let mut r = reply(UsageReport::Omitted);
        r.extras.tool_args = Some(r#"{"q":"x"}"#.into());
        let body = message_body(&r);
        assert_eq!(body["stop_reason"], "tool_use");
        assert_eq!(
            body["content"][1],
            json!({"type": "tool_use", "id": TOOL_USE_ID, "name": "lookup", "input": {"q": "x"}})
        );
        let events = stream_events(&r, 2).concat();
        assert!(events.contains("input_json_delta") && events.contains(r#""stop_reason":"tool_use""#), "{events}");
        let args: String = events
            .split("\n\n")
            .filter_map(|e| e.split("data: ").nth(1))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v.pointer("/delta/partial_json").and_then(Value::as_str).map(str::to_string))
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"q": "x"}));
    }

    #[test]
    fn bodies_and_stream() {
        let usage = UsageReport::Counts { prompt: 4, completion: 3, cached: Some(2), reasoning: None };
        assert_eq!(
            message_body(&reply(usage)).to_string(),
            r#"{"id":"msg_mock_3","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"Hello from mock."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":4,"output_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":2}}"#
        );
        let events = stream_events(&reply(usage), 2);
        let parsed: Vec<(String, Value)> = events
            .iter()
            .map(|e| {
                let (head, data) = e.strip_suffix("\n\n").unwrap().split_once('\n').unwrap();
                (
                    head.strip_prefix("event: ").unwrap().to_string(),
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                )
            })
            .collect();
        let kinds: Vec<&str> = parsed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            vec![
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(kinds[STREAM_CUT - 1], "content_block_delta");
        for (kind, data) in &parsed {
            assert_eq!(data["type"], kind.as_str());
        }
        assert_eq!(
            parsed[0].1["message"]["usage"],
            json!({"input_tokens": 4, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2})
        );
        assert_eq!(parsed[0].1["message"]["content"], json!([]));
        let text: String = parsed[3..5].iter().map(|(_, d)| d["delta"]["text"].as_str().unwrap()).collect();
        assert_eq!(text, "Hello from mock.");
        assert_eq!(parsed[3].1["delta"]["type"], "text_delta");
        assert_eq!(
            parsed[6].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}})
        );
        let malformed = malformed_stream_events(&reply(usage));
        assert_eq!(malformed.len(), 2);
        assert!(message_body(&reply(UsageReport::Omitted)).get("usage").is_none());
        assert_eq!(count_tokens_body(9), json!({"input_tokens": 9}));
        assert_eq!(
            context_length_error(10, 12),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 12 tokens > 10 maximum"}})
        );
    }
}
