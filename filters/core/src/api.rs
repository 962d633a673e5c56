//! The one place that knows the wire formats of the APIs sluice governs:
//! OpenAI chat completions, legacy completions, the Responses API, embeddings, and Anthropic
//! Messages (plus `count_tokens`). Filters ask this module for the model, the stream flag,
//! the output cap, every text the model reads, every text it wrote and the usage; a new
//! format is a change here only.
//!
//! Request texts: everything the provider shows the model is visited, on every endpoint: all
//! string values of the body except fields that are identifiers, enums or opaque data
//! ([`SKIP_KEYS`], base64 payloads), plus the property names of JSON schemas (tool
//! parameters, response formats), which the model reads too. This is deliberately broader
//! than "message content": tool descriptions, `response_format` schemas, `name`, refusal
//! parts, `prediction`, Responses `input`/`instructions`, Messages `system`, embeddings
//! `input` and completions `prompt` arrays are all scanned.
//!
//! Response texts (JSON): every string value except identifiers, enums and opaque data.
//! Streams: [`visit_stream_event`] yields the text pieces of one event, each tagged with the
//! channel it continues (choice + field, Responses item + part, Messages block), so a
//! masker can hold back the tail of each channel across events.

use serde_json::{Map, Value};

/// Which API a request speaks, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Api {
    /// `POST …/chat/completions`.
    Chat,
    /// `POST …/completions` (legacy text completions).
    Completions,
    /// `POST …/responses`.
    Responses,
    /// `POST …/embeddings`.
    Embeddings,
    /// `POST …/messages` (Anthropic).
    Messages,
    /// `POST …/messages/count_tokens` (Anthropic).
    CountTokens,
    /// `GET …/models` and `…/models/{id}`.
    Models,
    /// Anything else.
    #[default]
    Other,
}

impl Api {
    /// The API for a request path (query ignored).
    pub fn from_path(path: &str) -> Api {
        let p = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        if p.ends_with("/chat/completions") {
            Api::Chat
        } else if p.ends_with("/completions") {
            Api::Completions
        } else if p.ends_with("/responses") {
            Api::Responses
        } else if p.ends_with("/embeddings") {
            Api::Embeddings
        } else if p.ends_with("/messages/count_tokens") {
            Api::CountTokens
        } else if p.ends_with("/messages") {
            Api::Messages
        } else if p.ends_with("/models") || p.contains("/models/") {
            Api::Models
        } else {
            Api::Other
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry semantic conventions).
    pub fn operation(self) -> &'static str {
        match self {
            Api::Chat | Api::Responses | Api::Messages => "chat",
            Api::Completions => "text_completion",
            Api::Embeddings => "embeddings",
            Api::CountTokens => "count_tokens",
            Api::Models => "models",
            Api::Other => "other",
        }
    }

    /// True for the endpoints that generate text (usage is charged, answers are masked).
    pub fn generates(self) -> bool {
        matches!(self, Api::Chat | Api::Completions | Api::Responses | Api::Messages)
    }

    /// True for the model APIs sluice reads bodies of.
    pub fn is_model_call(self) -> bool {
        !matches!(self, Api::Models | Api::Other)
    }

    /// True where `stream_options.include_usage` exists (chat and legacy completions only:
    /// the Responses API rejects it, Messages always reports usage).
    pub fn supports_include_usage(self) -> bool {
        matches!(self, Api::Chat | Api::Completions)
    }
}

/// Fields whose string values are identifiers, enums or opaque data, never text the model
/// reads or writes.
pub const SKIP_KEYS: &[&str] = &[
    "model",
    "role",
    "type",
    "id",
    "object",
    "tool_call_id",
    "call_id",
    "item_id",
    "previous_response_id",
    "user",
    "metadata",
    "service_tier",
    "encoding_format",
    "logit_bias",
    "prompt_cache_key",
    "safety_identifier",
    "system_fingerprint",
    "finish_reason",
    "stop_reason",
    "status",
    "media_type",
    "detail",
    "voice",
    "reasoning_effort",
    "modalities",
    "encrypted_content",
    "b64_json",
    "signature",
    "logprobs",
];

/// Keys whose string values are base64 or URL payloads (images, audio, files).
const DATA_KEYS: &[&str] = &["data", "file_data", "image_url", "url", "audio_url", "file_id"];

/// Keys under which a JSON schema sits: its property names are text the model reads.
const SCHEMA_KEYS: &[&str] = &["parameters", "input_schema", "schema", "properties"];

/// Opaque payloads: data URLs, base64 blobs under `data`/`file_data`, file ids. A
/// plain-text document (`data` with spaces) is text and is scanned.
fn is_data(key: &str, s: &str) -> bool {
    if !DATA_KEYS.contains(&key) {
        return false;
    }
    match key {
        "file_id" => true,
        "data" | "file_data" => {
            s.starts_with("data:")
                || s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
        }
        _ => s.starts_with("data:"),
    }
}

/// The request's `model`, when a non-empty string.
pub fn model(body: &Value) -> Option<&str> {
    body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty())
}

/// Set the request's `model`.
pub fn set_model(body: &mut Value, model: &str) {
    if let Some(o) = body.as_object_mut() {
        o.insert("model".into(), Value::String(model.to_string()));
    }
}

/// `"stream": true`.
pub fn is_stream(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool) == Some(true)
}

/// The client's cap on output tokens, per format.
pub fn max_output_tokens(api: Api, body: &Value) -> Option<u64> {
    let get = |k: &str| body.get(k).and_then(Value::as_u64);
    match api {
        Api::Chat => get("max_completion_tokens").or_else(|| get("max_tokens")),
        Api::Completions | Api::Messages => get("max_tokens"),
        Api::Responses => get("max_output_tokens"),
        Api::Embeddings | Api::CountTokens => Some(0),
        Api::Models | Api::Other => None,
    }
}

/// The fields that cap output per format (for enrichment's caps and the security check that
/// both chat caps are set).
pub fn output_cap_fields(api: Api) -> &'static [&'static str] {
    match api {
        Api::Chat => &["max_tokens", "max_completion_tokens"],
        Api::Completions | Api::Messages => &["max_tokens"],
        Api::Responses => &["max_output_tokens"],
        _ => &[],
    }
}

/// The role of one conversation item, where the item has one.
fn item_role(item: &Value) -> Option<&str> {
    item.get("role").and_then(Value::as_str)
}

/// Visit every text of a request body the model reads (see the module docs). `roles`, when
/// set, limits conversation items (`messages[]`, Responses `input[]`) to those roles; other
/// texts (tools, schemas, instructions, system) are always visited. The visitor may change
/// each text in place.
pub fn visit_request_texts(body: &mut Value, roles: Option<&[String]>, f: &mut dyn FnMut(&mut String)) {
    let Value::Object(root) = body else { return };
    for (key, value) in root.iter_mut() {
        if SKIP_KEYS.contains(&key.as_str()) {
            continue;
        }
        let conversation = key == "messages" || key == "input";
        match (conversation, roles, value) {
            (true, Some(roles), Value::Array(items)) => {
                for item in items {
                    let visible = item_role(item).is_none_or(|r| roles.iter().any(|x| x == r));
                    if visible {
                        walk(item, key, false, f);
                    }
                }
            }
            (_, _, v) => walk(v, key, SCHEMA_KEYS.contains(&key.as_str()), f),
        }
    }
}

/// Visit every generated text of a non-streaming response (any format).
pub fn visit_response_texts(body: &mut Value, f: &mut dyn FnMut(&mut String)) {
    walk(body, "", false, f);
}

/// Walk a value, visiting text strings (and schema property names when `schema`).
fn walk(v: &mut Value, key: &str, schema: bool, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::String(s) if !is_data(key, s) => f(s),
        Value::Array(items) => {
            for item in items {
                walk(item, key, schema, f);
            }
        }
        Value::Object(map) => {
            if schema {
                rename_keys(map, f);
            }
            for (k, child) in map.iter_mut() {
                if SKIP_KEYS.contains(&k.as_str()) {
                    continue;
                }
                let child_schema = schema || SCHEMA_KEYS.contains(&k.as_str());
                walk(child, k, child_schema, f);
            }
        }
        _ => {}
    }
}

/// Visit the keys of a schema object (property names); a changed key renames the entry.
fn rename_keys(map: &mut Map<String, Value>, f: &mut dyn FnMut(&mut String)) {
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if SKIP_KEYS.contains(&k.as_str()) || SCHEMA_KEYS.contains(&k.as_str()) || is_schema_keyword(&k) {
            continue;
        }
        let mut new = k.clone();
        f(&mut new);
        if new != k {
            if let Some(v) = map.shift_remove(&k) {
                map.insert(new, v);
            }
        }
    }
}

fn is_schema_keyword(k: &str) -> bool {
    matches!(
        k,
        "description"
            | "required"
            | "enum"
            | "items"
            | "additionalProperties"
            | "anyOf"
            | "oneOf"
            | "allOf"
            | "$defs"
            | "definitions"
            | "$ref"
            | "default"
            | "title"
            | "format"
            | "strict"
            | "name"
            | "minimum"
            | "maximum"
            | "pattern"
    )
}

/// UTF-8 bytes of every text the model reads: input to token estimates.
pub fn prompt_bytes(body: &Value) -> usize {
    let mut copy = body.clone();
    let mut n: usize = 0;
    visit_request_texts(&mut copy, None, &mut |s| n = n.saturating_add(s.len()));
    n
}

/// UTF-8 bytes of every text of a response body: input to output estimates.
pub fn response_text_bytes(body: &Value) -> usize {
    let mut copy = body.clone();
    let mut n: usize = 0;
    visit_response_texts(&mut copy, &mut |s| n = n.saturating_add(s.len()));
    n
}

/// The generated text of a non-streaming response, joined (cache keys, replays).
pub fn response_text(api: Api, body: &Value) -> String {
    let mut out = String::new();
    match api {
        Api::Chat => {
            for c in body.get("choices").and_then(Value::as_array).into_iter().flatten() {
                if let Some(t) = c.pointer("/message/content").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        Api::Completions => {
            for c in body.get("choices").and_then(Value::as_array).into_iter().flatten() {
                if let Some(t) = c.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        Api::Responses => {
            for item in body.get("output").and_then(Value::as_array).into_iter().flatten() {
                for part in item.get("content").and_then(Value::as_array).into_iter().flatten() {
                    if part.get("type").and_then(Value::as_str) == Some("output_text") {
                        if let Some(t) = part.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                        }
                    }
                }
            }
        }
        Api::Messages => {
            for block in body.get("content").and_then(Value::as_array).into_iter().flatten() {
                if block.get("type").and_then(Value::as_str) == Some("text") {
                    if let Some(t) = block.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// The model named by a response (JSON), or by a stream event.
pub fn response_model(v: &Value) -> Option<&str> {
    v.get("model")
        .or_else(|| v.pointer("/response/model"))
        .or_else(|| v.pointer("/message/model"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
}

/// For a streaming chat/completions request without `stream_options.include_usage: true`,
/// set it. Returns true when the body changed. Other APIs are never touched.
pub fn ensure_include_usage(api: Api, body: &mut Value) -> bool {
    if !api.supports_include_usage() || !is_stream(body) {
        return false;
    }
    let Some(root) = body.as_object_mut() else { return false };
    let options = root.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
    if options.is_null() {
        *options = Value::Object(Map::new());
    }
    let Some(options) = options.as_object_mut() else { return false };
    if options.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return false;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    true
}

/// True when the client asked for an `include_usage` chunk itself.
pub fn asked_include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true)
}

/// True when the request asks for token log-probabilities (chat `logprobs`/`top_logprobs`,
/// completions `logprobs`, Responses `include: [...logprobs]` or `top_logprobs`).
pub fn wants_logprobs(body: &Value) -> bool {
    let truthy = |v: Option<&Value>| match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n > 0),
        _ => false,
    };
    truthy(body.get("logprobs"))
        || truthy(body.get("top_logprobs"))
        || body
            .get("include")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|i| i.as_str().is_some_and(|s| s.contains("logprobs"))))
}

/// Whether a request has tools (cache rules skip those).
pub fn has_tools(body: &Value) -> bool {
    ["tools", "functions"].iter().any(|k| body.get(*k).and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
}

/// The text of the last user message (semantic-cache key text), per format.
pub fn last_user_text(api: Api, body: &Value) -> Option<String> {
    let items = match api {
        Api::Chat | Api::Messages => body.get("messages")?.as_array()?,
        Api::Responses => match body.get("input")? {
            Value::String(s) => return Some(s.clone()),
            Value::Array(a) => a,
            _ => return None,
        },
        Api::Completions => {
            return match body.get("prompt")? {
                Value::String(s) => Some(s.clone()),
                _ => None,
            }
        }
        _ => return None,
    };
    let item = items.iter().rev().find(|m| item_role(m) == Some("user"))?;
    Some(content_text(item.get("content")?))
}

/// The text of a message `content` (string or parts).
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            texts.join("\n")
        }
        _ => String::new(),
    }
}

/// The whole conversation as text (system prompt optional), for cache keys.
pub fn conversation_text(api: Api, body: &Value, with_system: bool) -> String {
    let mut out = String::new();
    if with_system {
        for k in ["system", "instructions"] {
            if let Some(v) = body.get(k) {
                out.push_str("system: ");
                out.push_str(&content_text(v));
                out.push('\n');
            }
        }
    }
    let items = match api {
        Api::Responses => body.get("input"),
        _ => body.get("messages"),
    };
    match items {
        Some(Value::String(s)) => {
            out.push_str("user: ");
            out.push_str(s);
        }
        Some(Value::Array(a)) => {
            for m in a {
                let role = item_role(m).unwrap_or("user");
                if !with_system && (role == "system" || role == "developer") {
                    continue;
                }
                out.push_str(role);
                out.push_str(": ");
                out.push_str(&m.get("content").map(content_text).unwrap_or_default());
                out.push('\n');
            }
        }
        _ => {}
    }
    out
}

/// Add `text` as a system prompt in the format's own place: a system message first (chat),
/// `instructions` (Responses, prepended), `system` (Messages, prepended). Completions and
/// other APIs have no system prompt (returns false).
pub fn add_system_text(api: Api, body: &mut Value, text: &str) -> bool {
    let Some(root) = body.as_object_mut() else { return false };
    match api {
        Api::Chat => {
            let msg = serde_json::json!({"role": "system", "content": text});
            match root.get_mut("messages") {
                Some(Value::Array(items)) => {
                    items.insert(0, msg);
                    true
                }
                _ => false,
            }
        }
        Api::Responses => prepend_text_field(root, "instructions", text),
        Api::Messages | Api::CountTokens => match root.get_mut("system") {
            Some(Value::Array(blocks)) => {
                blocks.insert(0, serde_json::json!({"type": "text", "text": text}));
                true
            }
            _ => prepend_text_field(root, "system", text),
        },
        _ => false,
    }
}

fn prepend_text_field(root: &mut Map<String, Value>, key: &str, text: &str) -> bool {
    let new = match root.get(key).and_then(Value::as_str) {
        Some(old) if !old.is_empty() => format!("{text}\n\n{old}"),
        _ => text.to_string(),
    };
    root.insert(key.to_string(), Value::String(new));
    true
}

/// One stream channel: where a piece of generated text continues.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel {
    /// Choice index (chat/completions), output index (Responses), block index (Messages).
    pub index: u64,
    /// Field: `content`, `reasoning_content`, `refusal`, `tool:N` (tool-call arguments),
    /// `audio`, `text` (completions), a Responses part `item:<id>:<content_index>`...
    pub field: String,
}

/// A text piece of one stream event.
#[derive(Debug)]
pub enum Piece<'a> {
    /// A delta that continues `channel`.
    Delta(Channel, &'a mut String),
    /// A complete text (Responses `*.done` events, the final response object): mask whole.
    Whole(&'a mut String),
    /// `channel` is finished after this event.
    End(Channel),
}

/// Visit the text pieces of one stream event (`event` is the SSE `event:` field).
pub fn visit_stream_event(api: Api, event: Option<&str>, data: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    match api {
        Api::Chat | Api::Completions => chat_event(data, f),
        Api::Responses => responses_event(data, f),
        Api::Messages => messages_event(data, f),
        _ => {
            let _ = event;
        }
    }
}

fn chat_event(data: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    let Some(Value::Array(choices)) = data.get_mut("choices") else { return };
    for (pos, choice) in choices.iter_mut().enumerate() {
        let index = choice.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
        let finished = choice.get("finish_reason").is_some_and(|v| !v.is_null());
        let ch = |field: &str| Channel { index, field: field.to_string() };
        if let Some(Value::String(t)) = choice.get_mut("text") {
            f(Piece::Delta(ch("text"), t));
        }
        let mut fields: Vec<String> = Vec::new();
        if let Some(Value::Object(delta)) = choice.get_mut("delta") {
            for key in ["content", "reasoning_content", "reasoning", "refusal"] {
                if let Some(Value::String(t)) = delta.get_mut(key) {
                    f(Piece::Delta(ch(key), t));
                    fields.push(key.to_string());
                }
            }
            if let Some(Value::String(t)) = delta.get_mut("audio").and_then(|a| a.get_mut("transcript")) {
                f(Piece::Delta(ch("audio"), t));
            }
            if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                for (cpos, call) in calls.iter_mut().enumerate() {
                    let ci = call.get("index").and_then(Value::as_u64).unwrap_or(cpos as u64);
                    if let Some(Value::String(t)) = call.pointer_mut("/function/arguments") {
                        f(Piece::Delta(ch(&format!("tool:{ci}")), t));
                    }
                }
            }
        }
        if finished {
            f(Piece::End(Channel { index, field: "*".into() }));
        }
    }
}

fn responses_event(data: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let index = data.get("output_index").and_then(Value::as_u64).unwrap_or(0);
    let part = data.get("content_index").and_then(Value::as_u64).unwrap_or(0);
    let item = data.get("item_id").and_then(Value::as_str).unwrap_or_default().to_string();
    let channel = |what: &str| Channel { index, field: format!("{what}:{item}:{part}") };
    if let Some(stem) = kind.strip_suffix(".delta") {
        if let Some(Value::String(t)) = data.get_mut("delta") {
            f(Piece::Delta(channel(stem), t));
        }
        return;
    }
    if let Some(stem) = kind.strip_suffix(".done") {
        // The complete text again: end the channel, then mask the whole text.
        f(Piece::End(channel(stem)));
        for key in ["text", "arguments", "refusal", "transcript"] {
            if let Some(Value::String(t)) = data.get_mut(key) {
                f(Piece::Whole(t));
            }
        }
        for key in ["part", "item", "response"] {
            if let Some(v) = data.get_mut(key) {
                walk_whole(v, f);
            }
        }
        return;
    }
    for key in ["response", "item", "part"] {
        if let Some(v) = data.get_mut(key) {
            walk_whole(v, f);
        }
    }
}

fn walk_whole(v: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    walk(v, "", false, &mut |s| f(Piece::Whole(s)));
}

fn messages_event(data: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
    match kind.as_str() {
        "content_block_delta" => {
            if let Some(Value::Object(delta)) = data.get_mut("delta") {
                for key in ["text", "thinking", "partial_json"] {
                    if let Some(Value::String(t)) = delta.get_mut(key) {
                        f(Piece::Delta(Channel { index, field: key.to_string() }, t));
                    }
                }
            }
        }
        "content_block_start" => {
            if let Some(block) = data.get_mut("content_block") {
                walk_whole(block, f);
            }
        }
        "content_block_stop" => f(Piece::End(Channel { index, field: "*".into() })),
        _ => {}
    }
}

/// A delta event for `channel` carrying `text`, shaped like `template` (the last event of
/// the stream: ids, model). Used to flush held-back text before a channel ends.
pub fn delta_event(api: Api, template: &Value, channel: &Channel, text: String) -> Value {
    match api {
        Api::Chat | Api::Completions => {
            let mut chunk = Map::new();
            for key in ["id", "object", "created", "model", "system_fingerprint", "service_tier"] {
                if let Some(v) = template.get(key) {
                    chunk.insert(key.to_string(), v.clone());
                }
            }
            let choice = if channel.field == "text" {
                serde_json::json!({"index": channel.index, "text": text, "finish_reason": null})
            } else if let Some(ci) = channel.field.strip_prefix("tool:") {
                let ci: u64 = ci.parse().unwrap_or(0);
                serde_json::json!({"index": channel.index,
                    "delta": {"tool_calls": [{"index": ci, "function": {"arguments": text}}]}, "finish_reason": null})
            } else if channel.field == "audio" {
                serde_json::json!({"index": channel.index, "delta": {"audio": {"transcript": text}}, "finish_reason": null})
            } else {
                let mut delta = Map::new();
                delta.insert(channel.field.clone(), Value::String(text));
                serde_json::json!({"index": channel.index, "delta": delta, "finish_reason": null})
            };
            chunk.insert("choices".into(), Value::Array(vec![choice]));
            Value::Object(chunk)
        }
        Api::Responses => {
            let mut parts = channel.field.splitn(3, ':');
            let stem = parts.next().unwrap_or("response.output_text");
            let item = parts.next().unwrap_or_default();
            let part: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            serde_json::json!({"type": format!("{stem}.delta"), "item_id": item, "output_index": channel.index,
                "content_index": part, "delta": text,
                "sequence_number": template.get("sequence_number").cloned().unwrap_or(Value::Null)})
        }
        Api::Messages => {
            let kind = match channel.field.as_str() {
                "thinking" => "thinking_delta",
                "partial_json" => "input_json_delta",
                _ => "text_delta",
            };
            let mut delta = Map::new();
            delta.insert("type".into(), Value::String(kind.into()));
            delta.insert(channel.field.clone(), Value::String(text));
            serde_json::json!({"type": "content_block_delta", "index": channel.index, "delta": delta})
        }
        _ => Value::Null,
    }
}

/// The SSE `event:` name a synthesized event of `api` needs (Responses and Messages name
/// their events; chat does not).
pub fn event_name(api: Api, data: &Value) -> Option<String> {
    match api {
        Api::Responses | Api::Messages => data.get("type").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn texts(mut v: Value, roles: Option<&[String]>) -> Vec<String> {
        let mut out = Vec::new();
        visit_request_texts(&mut v, roles, &mut |s| out.push(s.clone()));
        out
    }

    #[test]
    fn apis_from_paths() {
        for (p, a) in [
            ("/v1/chat/completions", Api::Chat),
            ("/openai/v1/chat/completions?x=1", Api::Chat),
            ("/v1/completions", Api::Completions),
            ("/v1/responses", Api::Responses),
            ("/v1/embeddings", Api::Embeddings),
            ("/v1/messages", Api::Messages),
            ("/v1/messages/count_tokens", Api::CountTokens),
            ("/v1/models", Api::Models),
            ("/v1/models/", Api::Models),
            ("/v1/models/gpt-4o", Api::Models),
            ("/health", Api::Other),
        ] {
            assert_eq!(Api::from_path(p), a, "{p}");
        }
        assert!(Api::Chat.supports_include_usage() && !Api::Responses.supports_include_usage());
    }

    #[test]
    fn every_text_the_model_reads_is_visited() {
        let body = json!({
            "model": "gpt-4o", "user": "u1", "metadata": {"k": "secret-meta"},
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "name": "NAME", "content": [{"type": "text", "text": "part"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "refusal": "REFUSAL",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "ARGS"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "TOOLRESULT"}
            ],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "DESC",
                "parameters": {"type": "object", "properties": {"PROPNAME": {"type": "string", "description": "PDESC"}}}}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object",
                "properties": {"SCHEMAPROP": {"type": "string"}}}}},
            "prediction": {"type": "content", "content": "PREDICTION"},
            "stop": ["STOP"]
        });
        let t = texts(body, None);
        for want in [
            "sys",
            "NAME",
            "part",
            "REFUSAL",
            "ARGS",
            "TOOLRESULT",
            "DESC",
            "PROPNAME",
            "PDESC",
            "SCHEMAPROP",
            "PREDICTION",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} not visited: {t:?}");
        }
        for never in
            ["gpt-4o", "u1", "secret-meta", "call_1", "function", "data:image/png;base64,AAAA", "user", "assistant"]
        {
            assert!(!t.iter().any(|x| x == never), "{never} visited: {t:?}");
        }
    }

    #[test]
    fn other_endpoints_are_visited_too() {
        let r = texts(
            json!({"model": "m", "instructions": "INSTR", "input": [{"role": "user",
            "content": [{"type": "input_text", "text": "ITEM"}]}]}),
            None,
        );
        assert_eq!(r, ["INSTR", "ITEM"]);
        assert_eq!(texts(json!({"model": "m", "input": "STR"}), None), ["STR"]);
        assert_eq!(texts(json!({"model": "m", "input": ["A", "B"]}), None), ["A", "B"]);
        assert_eq!(texts(json!({"model": "m", "prompt": ["P1", "P2"]}), None), ["P1", "P2"]);
        let m = texts(
            json!({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "SYS"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "HI"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUFB"}}]}]}),
            None,
        );
        assert!(m.contains(&"SYS".to_string()) && m.contains(&"HI".to_string()), "{m:?}");
    }

    #[test]
    fn roles_limit_conversation_items_only() {
        let body = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                          "tools": [{"function": {"description": "D"}}]});
        assert_eq!(texts(body, Some(&["user".to_string()])), ["U", "D"]);
    }

    #[test]
    fn schema_keys_can_be_renamed() {
        let mut v = json!({"tools": [{"function": {"parameters": {"properties": {"card 4111": {"type": "string"}}}}}]});
        visit_request_texts(&mut v, None, &mut |s| {
            if s.contains("4111") {
                *s = s.replace("4111", "XXXX");
            }
        });
        assert!(v["tools"][0]["function"]["parameters"]["properties"].get("card XXXX").is_some());
    }

    #[test]
    fn caps_models_and_include_usage() {
        let chat = json!({"model": "m", "stream": true, "max_tokens": 5, "max_completion_tokens": 9});
        assert_eq!(max_output_tokens(Api::Chat, &chat), Some(9));
        assert_eq!(max_output_tokens(Api::Responses, &json!({"max_output_tokens": 7})), Some(7));
        assert_eq!(max_output_tokens(Api::Embeddings, &json!({})), Some(0));
        assert_eq!(model(&chat), Some("m"));
        let mut c = chat.clone();
        assert!(ensure_include_usage(Api::Chat, &mut c));
        assert!(!ensure_include_usage(Api::Chat, &mut c));
        assert_eq!(c["stream_options"]["include_usage"], true);
        let mut r = json!({"stream": true});
        assert!(!ensure_include_usage(Api::Responses, &mut r));
        assert!(r.get("stream_options").is_none());
        assert!(wants_logprobs(&json!({"logprobs": true})));
        assert!(wants_logprobs(&json!({"top_logprobs": 2})));
        assert!(wants_logprobs(&json!({"include": ["message.output_text.logprobs"]})));
        assert!(!wants_logprobs(&json!({"logprobs": false})));
    }

    #[test]
    fn system_text_in_each_format() {
        let mut c = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(add_system_text(Api::Chat, &mut c, "S"));
        assert_eq!(c["messages"][0], json!({"role": "system", "content": "S"}));
        let mut r = json!({"instructions": "old", "input": "x"});
        assert!(add_system_text(Api::Responses, &mut r, "S"));
        assert_eq!(r["instructions"], "S\n\nold");
        let mut m = json!({"system": [{"type": "text", "text": "old"}], "messages": []});
        assert!(add_system_text(Api::Messages, &mut m, "S"));
        assert_eq!(m["system"][0]["text"], "S");
        assert!(!add_system_text(Api::Completions, &mut json!({"prompt": "x"}), "S"));
    }

    #[test]
    fn response_texts_and_stream_pieces() {
        let mut body = json!({"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "C", "reasoning_content": "R", "refusal": "F",
                "audio": {"id": "a", "data": "QUJD", "transcript": "T"},
                "tool_calls": [{"id": "call", "type": "function", "function": {"name": "f", "arguments": "A"}}]}}],
            "usage": {"prompt_tokens": 1}});
        let mut seen = Vec::new();
        visit_response_texts(&mut body, &mut |s| seen.push(s.clone()));
        for want in ["C", "R", "F", "T", "A"] {
            assert!(seen.contains(&want.to_string()), "{want}: {seen:?}");
        }
        assert!(!seen.contains(&"QUJD".to_string()) && !seen.contains(&"stop".to_string()));

        let mut ev = json!({"choices": [{"index": 0, "delta": {"content": "x", "reasoning_content": "y",
            "tool_calls": [{"index": 1, "function": {"arguments": "z"}}]}, "finish_reason": "stop"}]});
        let mut pieces = Vec::new();
        visit_stream_event(Api::Chat, None, &mut ev, &mut |p| {
            pieces.push(match p {
                Piece::Delta(c, t) => format!("{}:{}={t}", c.index, c.field),
                Piece::Whole(t) => format!("whole={t}"),
                Piece::End(c) => format!("end {}", c.index),
            })
        });
        assert_eq!(pieces, ["0:content=x", "0:reasoning_content=y", "0:tool:1=z", "end 0"]);

        let mut ev = json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "delta": "hel"});
        let mut got = Vec::new();
        visit_stream_event(Api::Responses, None, &mut ev, &mut |p| {
            if let Piece::Delta(c, t) = p {
                got.push((c.field, t.clone()));
            }
        });
        assert_eq!(got, [("response.output_text:msg_1:0".to_string(), "hel".to_string())]);
        let d = delta_event(
            Api::Responses,
            &json!({}),
            &Channel { index: 0, field: "response.output_text:msg_1:0".into() },
            "lo".into(),
        );
        assert_eq!(d["type"], "response.output_text.delta");
        assert_eq!(d["item_id"], "msg_1");

        let mut ev = json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "T"}});
        let mut got = Vec::new();
        visit_stream_event(Api::Messages, None, &mut ev, &mut |p| {
            if let Piece::Delta(c, t) = p {
                got.push((c.index, t.clone()));
            }
        });
        assert_eq!(got, [(2, "T".to_string())]);
    }

    #[test]
    fn user_texts_for_cache_keys() {
        let c = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "last"}]}]});
        assert_eq!(last_user_text(Api::Chat, &c).as_deref(), Some("last"));
        assert_eq!(last_user_text(Api::Responses, &json!({"input": "q"})).as_deref(), Some("q"));
        assert!(conversation_text(Api::Chat, &c, false).starts_with("user: first"));
        assert!(conversation_text(Api::Chat, &c, true).starts_with("system: S"));
    }
}
