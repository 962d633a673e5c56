//! OpenAI-compatible chat-completion wire types that keep every field they don't know.
//!
//! A filter parses a body, reads or edits a few typed fields and writes it back; everything
//! else the client or provider sent must come out unchanged. So each object type has an
//! `extra` map for unknown fields, and `parse` then `to_vec` gives a JSON value equal to the
//! input (object key order aside: known fields are written first).
//!
//! Presence is kept with one rule. A typed field cannot tell "absent" from an explicit
//! `null` (`Option`), or from an empty list (`Vec`). When the input holds such a value, it is
//! left in `extra` under its own name as a shadow: `"content": null` gives `content == None`
//! and `extra["content"] == null`; `"messages": []` gives an empty `messages` and
//! `extra["messages"] == []`. On output a typed field that carries something (`Some`, a
//! non-empty list) is written and wins over a shadow of the same name; otherwise the shadow is
//! written back. Consequences: setting a field replaces the original `null`; emptying a list
//! that arrived non-empty drops the key; to drop a shadow, remove it from `extra`.
//!
//! Parsing goes through `serde_json::Value` with serde_json's recursion limit (128), so
//! hostile nesting is an error, never a stack overflow. Known fields are checked strictly
//! (`"max_tokens": "ten"` is a [`WireError::Shape`] naming the path).

use serde::de::{Deserializer, Error as _};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// A JSON object, insertion order preserved.
pub type JsonMap = serde_json::Map<String, Value>;

/// Why a body could not be read as the expected wire type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The body is not valid JSON (syntax, truncation, or nesting deeper than 128).
    NotJson,
    /// The body is not valid UTF-8.
    NotUtf8,
    /// Valid JSON of the wrong shape, e.g. `"messages": 3`; the text names the path.
    Shape(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson => f.write_str("body is not valid JSON"),
            Self::NotUtf8 => f.write_str("body is not valid UTF-8"),
            Self::Shape(why) => write!(f, "unexpected JSON shape: {why}"),
        }
    }
}

impl std::error::Error for WireError {}

/// A chat-completion request (`POST /v1/chat/completions`), plus legacy `prompt` in `extra`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// Requested model.
    pub model: Option<String>,
    /// Conversation; an empty list that was sent is kept as a shadow in `extra`.
    pub messages: Vec<Message>,
    /// `true` for a streaming (SSE) response.
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    pub stream_options: Option<StreamOptions>,
    /// Legacy output-token cap.
    pub max_tokens: Option<u64>,
    /// Current output-token cap (includes reasoning tokens).
    pub max_completion_tokens: Option<u64>,
    /// Every other field: tools, tool_choice, response_format, temperature, prompt, vendor fields.
    pub extra: JsonMap,
}

/// `stream_options` of a request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamOptions {
    /// Ask for a final usage-only chunk.
    pub include_usage: Option<bool>,
    /// Other options.
    pub extra: JsonMap,
}

/// One message of a conversation (request) or a choice's message (response).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant`, `tool`, ...; required.
    pub role: String,
    /// Text or parts; `None` when absent or `null` (an assistant tool-call message).
    pub content: Option<Content>,
    /// Tool calls made by the assistant.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Other fields: name, tool_call_id, refusal, audio, ...
    pub extra: JsonMap,
}

/// Message content: a plain string or a list of typed parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// `"content": "text"`.
    Text(String),
    /// `"content": [{"type": "text", "text": ...}, {"type": "image_url", ...}]`.
    Parts(Vec<ContentPart>),
}

/// One part of array content.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContentPart {
    /// The part's `type` (`text`, `image_url`, `input_audio`, `file`, ...); required.
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
    /// Other fields (`image_url`, ...).
    pub extra: JsonMap,
}

/// A tool call; in stream deltas every field may be missing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCall {
    /// Call id.
    pub id: Option<String>,
    /// The call's `type` (`function`).
    pub kind: Option<String>,
    /// The function called.
    pub function: Option<FunctionCall>,
    /// Other fields (`index` in stream deltas, ...).
    pub extra: JsonMap,
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FunctionCall {
    /// Function name.
    pub name: Option<String>,
    /// Arguments as a JSON-encoded string (a fragment of it in stream deltas).
    pub arguments: Option<String>,
    /// Other fields.
    pub extra: JsonMap,
}

/// A chat-completion response, or (as [`ChatChunk`]) one streaming chunk.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatResponse {
    /// Completion id.
    pub id: Option<String>,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: Option<String>,
    /// The model that answered.
    pub model: Option<String>,
    /// Choices; the usage-only final chunk has `"choices": []` (kept as a shadow in `extra`).
    pub choices: Vec<Choice>,
    /// Token usage; `None` when absent or `null`.
    pub usage: Option<Usage>,
    /// Other fields (created, system_fingerprint, service_tier, ...).
    pub extra: JsonMap,
}

/// A streaming chunk: a [`ChatResponse`] whose choices carry `delta` instead of `message`.
pub type ChatChunk = ChatResponse;

/// One choice of a response or chunk.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Choice {
    /// Choice index.
    pub index: Option<u64>,
    /// The message (non-streaming).
    pub message: Option<Message>,
    /// The delta (streaming).
    pub delta: Option<Delta>,
    /// `"stop"`, `"length"`, `"tool_calls"`, ...; `None` when absent or `null`.
    pub finish_reason: Option<Value>,
    /// Other fields (`logprobs`, ...).
    pub extra: JsonMap,
}

/// The incremental part of a streaming choice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// Role, usually only on the first chunk.
    pub role: Option<String>,
    /// A fragment of content text.
    pub content: Option<String>,
    /// Fragments of tool calls (fields may be missing).
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Other fields (`refusal`, `reasoning_content`, ...).
    pub extra: JsonMap,
}

/// Token usage as reported by the provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    /// Input tokens.
    pub prompt_tokens: Option<u64>,
    /// Output tokens.
    pub completion_tokens: Option<u64>,
    /// Sum of both.
    pub total_tokens: Option<u64>,
    /// Other fields (`prompt_tokens_details`, `completion_tokens_details`, ...).
    pub extra: JsonMap,
}

/// An OpenAI-style error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`]; `param` and `code` are written as `null` when `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// Error `type`, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault.
    #[serde(default)]
    pub param: Option<String>,
    /// Stable machine-readable code.
    #[serde(default)]
    pub code: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Helpers

impl ChatRequest {
    /// Parse a request body.
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        parse_object(bytes)
    }

    /// Serialize back to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `true` when the client asked for a streaming response.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// `true` when `stream_options.include_usage` is `true`.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }

    /// Set `stream_options.include_usage = true` so the stream ends with a usage chunk.
    /// Returns `true` when the request changed.
    pub fn ensure_include_usage(&mut self) -> bool {
        if self.include_usage() {
            return false;
        }
        self.stream_options.get_or_insert_with(StreamOptions::default).include_usage = Some(true);
        true
    }

    /// UTF-8 bytes of the prompt: message texts, tool-call argument strings, and a legacy
    /// `prompt` (string or array of strings). Input to token estimates.
    pub fn prompt_bytes(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .map(|m| m.text_len().saturating_add(m.tool_call_args_len()))
            .fold(0, usize::saturating_add);
        let legacy = match self.extra.get("prompt") {
            Some(Value::String(s)) => s.len(),
            Some(Value::Array(items)) => {
                items.iter().filter_map(Value::as_str).map(str::len).fold(0, usize::saturating_add)
            }
            _ => 0,
        };
        messages.saturating_add(legacy)
    }
}

impl ChatResponse {
    /// Parse a response body or one streaming chunk's `data`.
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        parse_object(bytes)
    }

    /// Serialize back to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Message {
    /// A message with plain-text content.
    pub fn with_text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self { role: role.into(), content: Some(Content::Text(text.into())), ..Self::default() }
    }

    /// UTF-8 bytes of the message's content texts (0 without content).
    pub fn text_len(&self) -> usize {
        self.content.as_ref().map_or(0, Content::text_len)
    }

    /// UTF-8 bytes of the argument strings of the message's tool calls.
    pub fn tool_call_args_len(&self) -> usize {
        self.tool_calls
            .iter()
            .flatten()
            .filter_map(|c| c.function.as_ref()?.arguments.as_deref())
            .map(str::len)
            .fold(0, usize::saturating_add)
    }
}

impl Content {
    /// The texts: the string itself, or the `text` of every part that has one.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let (whole, parts) = match self {
            Self::Text(s) => (Some(s.as_str()), &[][..]),
            Self::Parts(parts) => (None, parts.as_slice()),
        };
        whole.into_iter().chain(parts.iter().filter_map(|p| p.text.as_deref()))
    }

    /// Replace texts in place: `f` gets each text and returns `Some(new)` to replace it.
    pub fn map_texts(&mut self, mut f: impl FnMut(&str) -> Option<String>) {
        match self {
            Self::Text(s) => {
                if let Some(new) = f(s) {
                    *s = new;
                }
            }
            Self::Parts(parts) => {
                for text in parts.iter_mut().filter_map(|p| p.text.as_mut()) {
                    if let Some(new) = f(text) {
                        *text = new;
                    }
                }
            }
        }
    }

    /// UTF-8 bytes of all texts.
    pub fn text_len(&self) -> usize {
        self.texts().map(str::len).fold(0, usize::saturating_add)
    }
}

impl ErrorBody {
    /// An error body; `kind` is the `type` (e.g. `invalid_request_error`), `param` is `null`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>, code: Option<&str>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param: None,
                code: code.map(str::to_string),
            },
        }
    }

    /// Parse an error body (e.g. from an upstream provider).
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let value = parse_value(bytes)?;
        serde_json::from_value(value).map_err(|e| WireError::Shape(e.to_string()))
    }

    /// Serialize to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing machinery: Value -> typed, moving strings out of the Value (no copies).

/// Bytes -> `Value`, with the UTF-8 / JSON distinction and serde_json's recursion limit.
fn parse_value(bytes: &[u8]) -> Result<Value, WireError> {
    let text = std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8)?;
    serde_json::from_str(text).map_err(|_| WireError::NotJson)
}

fn parse_object<T: FromJson>(bytes: &[u8]) -> Result<T, WireError> {
    let value = parse_value(bytes)?;
    T::from_json(value).map_err(|e| WireError::Shape(e.to_string()))
}

/// A shape error with the JSON path where it happened (`messages[2].content`).
#[derive(Debug)]
struct ShapeError {
    path: String,
    why: &'static str,
}

impl ShapeError {
    fn new(why: &'static str) -> Self {
        Self { path: String::new(), why }
    }

    fn at_key(mut self, key: &str) -> Self {
        self.path = if self.path.is_empty() || self.path.starts_with('[') {
            format!("{key}{}", self.path)
        } else {
            format!("{key}.{}", self.path)
        };
        self
    }

    fn at_index(mut self, index: usize) -> Self {
        self.path = if self.path.is_empty() || self.path.starts_with('[') {
            format!("[{index}]{}", self.path)
        } else {
            format!("[{index}].{}", self.path)
        };
        self
    }
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(self.why)
        } else {
            write!(f, "{}: {}", self.path, self.why)
        }
    }
}

/// Conversion from an owned `Value` (strict for typed fields).
trait FromJson: Sized {
    fn from_json(value: Value) -> Result<Self, ShapeError>;
}

impl FromJson for String {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        match value {
            Value::String(s) => Ok(s),
            _ => Err(ShapeError::new("expected a string")),
        }
    }
}

impl FromJson for bool {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        value.as_bool().ok_or(ShapeError::new("expected a boolean"))
    }
}

impl FromJson for u64 {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        value.as_u64().ok_or(ShapeError::new("expected a non-negative integer"))
    }
}

impl FromJson for Value {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        Ok(value)
    }
}

impl<T: FromJson> FromJson for Vec<T> {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        match value {
            Value::Array(items) => {
                items.into_iter().enumerate().map(|(i, item)| T::from_json(item).map_err(|e| e.at_index(i))).collect()
            }
            _ => Err(ShapeError::new("expected an array")),
        }
    }
}

impl FromJson for Content {
    fn from_json(value: Value) -> Result<Self, ShapeError> {
        match value {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(_) => Vec::<ContentPart>::from_json(value).map(Self::Parts),
            _ => Err(ShapeError::new("expected a string or an array of content parts")),
        }
    }
}

impl Serialize for Content {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Text(s) => serializer.serialize_str(s),
            Self::Parts(parts) => parts.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(value).map_err(D::Error::custom)
    }
}

/// A typed field of an object: how it is taken out of the input map and whether it is written.
trait Slot: Sized + Serialize {
    /// Take the field from `map`. A value the type cannot tell from absence stays in `map`.
    fn take(map: &mut JsonMap, key: &str) -> Result<Self, ShapeError>;
    /// Whether the typed value is written (and wins over a shadow in `extra`).
    fn carries(&self) -> bool;
}

impl<T: FromJson + Serialize> Slot for Option<T> {
    fn take(map: &mut JsonMap, key: &str) -> Result<Self, ShapeError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => map.shift_remove(key).map(T::from_json).transpose(),
        }
    }

    fn carries(&self) -> bool {
        self.is_some()
    }
}

impl<T: FromJson + Serialize> Slot for Vec<T> {
    fn take(map: &mut JsonMap, key: &str) -> Result<Self, ShapeError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) if items.is_empty() => Ok(Vec::new()),
            Some(_) => map.shift_remove(key).map_or(Ok(Vec::new()), Vec::<T>::from_json),
        }
    }

    fn carries(&self) -> bool {
        !self.is_empty()
    }
}

/// A required string (`role`, a part's `type`).
impl Slot for String {
    fn take(map: &mut JsonMap, key: &str) -> Result<Self, ShapeError> {
        match map.shift_remove(key) {
            Some(value) => String::from_json(value),
            None => Err(ShapeError::new("missing required field")),
        }
    }

    fn carries(&self) -> bool {
        true
    }
}

/// Implements `FromJson`, `Serialize` and `Deserialize` for a struct of `Slot` fields plus
/// `extra`, following the shadow rule in the module docs.
macro_rules! wire_object {
    ($ty:ident { $($field:ident => $key:literal),+ $(,)? }) => {
        impl FromJson for $ty {
            fn from_json(value: Value) -> Result<Self, ShapeError> {
                let Value::Object(mut extra) = value else {
                    return Err(ShapeError::new("expected an object"));
                };
                $( let $field = Slot::take(&mut extra, $key).map_err(|e| e.at_key($key))?; )+
                Ok(Self { $($field,)+ extra })
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(None)?;
                $(
                    if Slot::carries(&self.$field) {
                        map.serialize_entry($key, &self.$field)?;
                    }
                )+
                for (key, value) in &self.extra {
                    let shadowed = false $( || (key == $key && Slot::carries(&self.$field)) )+;
                    if !shadowed {
                        map.serialize_entry(key, value)?;
                    }
                }
                map.end()
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = Value::deserialize(deserializer)?;
                Self::from_json(value).map_err(D::Error::custom)
            }
        }
    };
}

wire_object!(ChatRequest {
    model => "model",
    messages => "messages",
    stream => "stream",
    stream_options => "stream_options",
    max_tokens => "max_tokens",
    max_completion_tokens => "max_completion_tokens",
});
wire_object!(StreamOptions { include_usage => "include_usage" });
wire_object!(Message { role => "role", content => "content", tool_calls => "tool_calls" });
wire_object!(ContentPart { kind => "type", text => "text" });
wire_object!(ToolCall { id => "id", kind => "type", function => "function" });
wire_object!(FunctionCall { name => "name", arguments => "arguments" });
wire_object!(ChatResponse {
    id => "id",
    object => "object",
    model => "model",
    choices => "choices",
    usage => "usage",
});
wire_object!(Choice {
    index => "index",
    message => "message",
    delta => "delta",
    finish_reason => "finish_reason",
});
wire_object!(Delta { role => "role", content => "content", tool_calls => "tool_calls" });
wire_object!(Usage {
    prompt_tokens => "prompt_tokens",
    completion_tokens => "completion_tokens",
    total_tokens => "total_tokens",
});

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request_with_tools() -> Value {
        json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
                ]},
                {"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                    {"id": "call_abc", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\":21}"},
                {"role": "user", "content": "Thanks", "name": "bob"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": false},
                "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "number"}}}}},
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.2,
            "top_p": 1,
            "max_completion_tokens": 512,
            "seed": null,
            "user": null,
            "logit_bias": {"50256": -100},
            "x_vendor": {"a": [1, 2]}
        })
    }

    fn openai_response() -> Value {
        json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion",
            "created": 1741570283,
            "model": "gpt-4o-2024-08-06",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "A wooden boardwalk.",
                            "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fc9f1d7035"
        })
    }

    fn tool_call_response() -> Value {
        json!({
            "id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "logprobs": null, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "refusal": null,
                    "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        })
    }

    fn role_chunk() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "gpt-4o-mini", "system_fingerprint": "fp_x",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
                            "logprobs": null, "finish_reason": null}],
               "usage": null})
    }

    fn tool_delta_chunk() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": null, "tool_calls": [
                   {"index": 0, "function": {"arguments": "{\"ci"}}]},
                   "logprobs": null, "finish_reason": null}]})
    }

    fn finish_chunk() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}],
               "usage": null})
    }

    fn usage_only_chunk() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [],
               "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                         "prompt_tokens_details": {"cached_tokens": 0}}})
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn reparse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let cases = [
            request_with_tools(),
            json!({"model": "m", "messages": []}),
            json!({"messages": null, "stream": null, "stream_options": null, "max_tokens": null}),
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "bc"], "max_tokens": 7}),
            json!({}),
            json!({"model": "m", "messages": [{"role": "user", "content": []}]}),
            json!({"model": "m", "messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": null, "tool_calls": null}]}),
            json!({"stream_options": {"include_usage": null, "continuous_usage_stats": true}}),
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}),
        ];
        for (i, case) in cases.iter().enumerate() {
            let req = ChatRequest::parse(&bytes(case)).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(&reparse(&req.to_vec()), case, "case {i}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let cases = [
            openai_response(),
            tool_call_response(),
            role_chunk(),
            tool_delta_chunk(),
            finish_chunk(),
            usage_only_chunk(),
            json!({"choices": null, "usage": null, "id": null}),
            json!({"choices": [{"index": 0, "finish_reason": null, "message": null, "delta": null}]}),
            json!({"object": "list", "usage": {"prompt_tokens": null, "total_tokens": 3}}),
        ];
        for (i, case) in cases.iter().enumerate() {
            let resp = ChatResponse::parse(&bytes(case)).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(&reparse(&resp.to_vec()), case, "case {i}");
        }
    }

    #[test]
    fn request_typed_fields() {
        let req = ChatRequest::parse(&bytes(&request_with_tools())).unwrap();
        assert_eq!(req.model.as_deref(), Some("gpt-4o"));
        assert_eq!(req.messages.len(), 5);
        assert!(req.is_stream());
        assert!(req.include_usage());
        assert_eq!(req.max_completion_tokens, Some(512));
        assert_eq!(req.max_tokens, None);
        assert_eq!(req.extra["x_vendor"], json!({"a": [1, 2]}));
        assert_eq!(req.extra["parallel_tool_calls"], json!(false));
        assert!(req.extra["seed"].is_null());

        let assistant = &req.messages[2];
        assert_eq!(assistant.role, "assistant");
        assert_eq!(assistant.content, None);
        assert!(assistant.extra["content"].is_null(), "null kept as a shadow");
        let call = &assistant.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.id.as_deref(), Some("call_abc"));
        assert_eq!(call.kind.as_deref(), Some("function"));
        let function = call.function.as_ref().unwrap();
        assert_eq!(function.name.as_deref(), Some("get_weather"));
        assert_eq!(function.arguments.as_deref(), Some("{\"city\":\"Paris\"}"));

        let tool = &req.messages[3];
        assert_eq!(tool.extra["tool_call_id"], json!("call_abc"));

        let Some(Content::Parts(parts)) = &req.messages[1].content else {
            panic!("parts expected");
        };
        assert_eq!(parts[0].kind, "text");
        assert_eq!(parts[1].kind, "image_url");
        assert_eq!(parts[1].text, None);
        assert_eq!(parts[1].extra["image_url"]["detail"], json!("low"));
    }

    #[test]
    fn response_typed_fields() {
        let resp = ChatResponse::parse(&bytes(&openai_response())).unwrap();
        assert_eq!(resp.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let usage = resp.usage.as_ref().unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            (Some(1117), Some(46), Some(1163))
        );
        assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], json!(0));
        let choice = &resp.choices[0];
        assert_eq!(choice.finish_reason, Some(json!("stop")));
        assert!(choice.extra["logprobs"].is_null());
        let msg = choice.message.as_ref().unwrap();
        assert_eq!(msg.content, Some(Content::Text("A wooden boardwalk.".into())));

        let chunk: ChatChunk = ChatChunk::parse(&bytes(&tool_delta_chunk())).unwrap();
        let delta = chunk.choices[0].delta.as_ref().unwrap();
        assert_eq!(delta.content, None);
        let call = &delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.id, None);
        assert_eq!(call.extra["index"], json!(0));
        assert_eq!(call.function.as_ref().unwrap().arguments.as_deref(), Some("{\"ci"));

        let usage_only = ChatChunk::parse(&bytes(&usage_only_chunk())).unwrap();
        assert!(usage_only.choices.is_empty());
        assert_eq!(usage_only.extra["choices"], json!([]));
        assert_eq!(usage_only.usage.unwrap().total_tokens, Some(21));

        let role = ChatChunk::parse(&bytes(&role_chunk())).unwrap();
        assert_eq!(role.usage, None);
        assert_eq!(role.choices[0].finish_reason, None);
        assert_eq!(role.choices[0].delta.as_ref().unwrap().role.as_deref(), Some("assistant"));
    }

    #[test]
    fn typed_value_wins_over_shadow() {
        let mut req = ChatRequest::parse(
            br#"{"messages":[{"role":"assistant","content":null}],"max_tokens":null,"stream":null}"#,
        )
        .unwrap();
        req.messages[0].content = Some(Content::Text("hi".into()));
        req.max_tokens = Some(10);
        let out = String::from_utf8(req.to_vec()).unwrap();
        assert_eq!(out.matches("\"content\"").count(), 1, "{out}");
        assert_eq!(out.matches("\"max_tokens\"").count(), 1, "{out}");
        assert_eq!(
            reparse(out.as_bytes()),
            json!({"messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 10, "stream": null})
        );
    }

    #[test]
    fn empty_list_shadow() {
        let mut req = ChatRequest::parse(br#"{"model":"m","messages":[]}"#).unwrap();
        assert!(req.messages.is_empty());
        assert_eq!(reparse(&req.to_vec()), json!({"model": "m", "messages": []}));
        req.messages.push(Message::with_text("user", "hi"));
        assert_eq!(reparse(&req.to_vec()), json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));

        // A list that arrived non-empty and was emptied is dropped; absent stays absent.
        let mut req = ChatRequest::parse(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap();
        req.messages.clear();
        assert_eq!(reparse(&req.to_vec()), json!({}));
        assert_eq!(reparse(&ChatResponse::default().to_vec()), json!({}));
    }

    #[test]
    fn shape_errors_name_the_path() {
        let cases: &[(&str, &str)] = &[
            (r#"{"messages":3}"#, "messages: expected an array"),
            (r#"{"messages":[{"role":"user","content":5}]}"#, "messages[0].content: expected a string or an array"),
            (r#"{"messages":[{"content":"x"}]}"#, "messages[0].role: missing required field"),
            (r#"{"messages":[{"role":null}]}"#, "messages[0].role: expected a string"),
            (
                r#"{"messages":[{"role":"u","content":[{"text":"x"}]}]}"#,
                "messages[0].content[0].type: missing required field",
            ),
            (r#"{"max_tokens":-1}"#, "max_tokens: expected a non-negative integer"),
            (r#"{"max_tokens":1.5}"#, "max_tokens: expected a non-negative integer"),
            (r#"{"stream":"yes"}"#, "stream: expected a boolean"),
            (r#"{"model":7}"#, "model: expected a string"),
            (r#"{"stream_options":true}"#, "stream_options: expected an object"),
            (
                r#"{"messages":[{"role":"a","tool_calls":[{"function":[]}]}]}"#,
                "messages[0].tool_calls[0].function: expected an object",
            ),
            (r#"[1,2]"#, "expected an object"),
            (r#""text""#, "expected an object"),
            ("null", "expected an object"),
        ];
        for (body, want) in cases {
            match ChatRequest::parse(body.as_bytes()) {
                Err(WireError::Shape(why)) => assert!(why.contains(want), "{body}: {why}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        match ChatResponse::parse(br#"{"choices":[{"index":0},{"delta":{"content":1}}]}"#) {
            Err(WireError::Shape(why)) => {
                assert_eq!(why, "choices[1].delta.content: expected a string")
            }
            other => panic!("{other:?}"),
        }
        match ChatResponse::parse(br#"{"usage":{"total_tokens":"3"}}"#) {
            Err(WireError::Shape(why)) => {
                assert_eq!(why, "usage.total_tokens: expected a non-negative integer")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_json_and_not_utf8() {
        let not_json: &[&[u8]] = &[b"", b"{", b"{\"a\":}", b"{} x", b"nul", b"{\"a\":1,}", b"'a'", b"{\"a\":1e999}"];
        for body in not_json {
            assert_eq!(ChatRequest::parse(body), Err(WireError::NotJson), "{body:?}");
            assert_eq!(ChatResponse::parse(body), Err(WireError::NotJson), "{body:?}");
        }
        for body in [&b"\xff{}"[..], b"{\"model\":\"\xc3\x28\"}", b"{\"a\":\"\xed\xa0\x80\"}"] {
            assert_eq!(ChatRequest::parse(body), Err(WireError::NotUtf8), "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        for open in ["[", "{\"a\":", "{\"messages\":"] {
            let body = open.repeat(10_000);
            assert_eq!(ChatRequest::parse(body.as_bytes()), Err(WireError::NotJson));
            assert_eq!(ChatResponse::parse(body.as_bytes()), Err(WireError::NotJson));
            assert_eq!(ErrorBody::parse(body.as_bytes()), Err(WireError::NotJson));
        }
        let closed = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(ChatRequest::parse(closed.as_bytes()), Err(WireError::NotJson));

        // Nesting within the limit still round-trips through `extra`.
        let ok = format!("{{\"x\":{}1{}}}", "[".repeat(120), "]".repeat(120));
        let req = ChatRequest::parse(ok.as_bytes()).unwrap();
        assert_eq!(reparse(&req.to_vec()), reparse(ok.as_bytes()));
    }

    #[test]
    fn texts_and_lengths() {
        let text = Content::Text("héllo".into());
        assert_eq!(text.texts().collect::<Vec<_>>(), ["héllo"]);
        assert_eq!(text.text_len(), 6);
        let parts: Content = serde_json::from_value(json!([
            {"type": "text", "text": "ab"},
            {"type": "image_url", "image_url": {"url": "u"}},
            {"type": "text", "text": "日本"}
        ]))
        .unwrap();
        assert_eq!(parts.texts().collect::<Vec<_>>(), ["ab", "日本"]);
        assert_eq!(parts.text_len(), 8);
        assert_eq!(Content::Parts(vec![]).texts().count(), 0);

        let msg = Message { content: None, ..Message::with_text("assistant", "") };
        assert_eq!(msg.text_len(), 0);
        assert_eq!(Message::with_text("user", "abc").text_len(), 3);
    }

    #[test]
    fn map_texts_replaces_in_place() {
        let mut text = Content::Text("secret here".into());
        text.map_texts(|t| Some(t.replace("secret", "[x]")));
        assert_eq!(text, Content::Text("[x] here".into()));

        let mut parts: Content = serde_json::from_value(json!([
            {"type": "text", "text": "keep"},
            {"type": "image_url", "image_url": {"url": "secret"}},
            {"type": "text", "text": "secret"}
        ]))
        .unwrap();
        let mut seen = Vec::new();
        parts.map_texts(|t| {
            seen.push(t.to_string());
            (t == "secret").then(|| "[x]".to_string())
        });
        assert_eq!(seen, ["keep", "secret"]);
        assert_eq!(
            serde_json::to_value(&parts).unwrap(),
            json!([
                {"type": "text", "text": "keep"},
                {"type": "image_url", "image_url": {"url": "secret"}},
                {"type": "text", "text": "[x]"}
            ])
        );
    }

    #[test]
    fn prompt_bytes_table() {
        let cases = [
            (json!({}), 0),
            (json!({"messages": [{"role": "user", "content": "abcd"}]}), 4),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "é"}]}]}),
                4,
            ),
            (
                json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}]}),
                7,
            ),
            (json!({"prompt": "hello"}), 5),
            (json!({"prompt": ["ab", "cd", 3]}), 4),
            (json!({"prompt": [1, 2, 3]}), 0),
            (json!({"messages": [{"role": "system", "content": "日本語"}], "prompt": "x"}), 10),
        ];
        for (body, want) in cases {
            let req = ChatRequest::parse(&bytes(&body)).unwrap();
            assert_eq!(req.prompt_bytes(), want, "{body}");
        }
    }

    #[test]
    fn include_usage_table() {
        let cases = [
            (json!({}), false),
            (json!({"stream_options": null}), false),
            (json!({"stream_options": {}}), false),
            (json!({"stream_options": {"include_usage": false}}), false),
            (json!({"stream_options": {"include_usage": true}}), true),
        ];
        for (body, want) in cases {
            let mut req = ChatRequest::parse(&bytes(&body)).unwrap();
            assert_eq!(req.include_usage(), want, "{body}");
            assert_eq!(req.ensure_include_usage(), !want, "{body}");
            assert!(req.include_usage());
            assert_eq!(reparse(&req.to_vec())["stream_options"]["include_usage"], json!(true));
        }
        let mut req = ChatRequest::parse(br#"{"stream_options":{"x":1}}"#).unwrap();
        req.ensure_include_usage();
        assert_eq!(reparse(&req.to_vec()), json!({"stream_options": {"include_usage": true, "x": 1}}));
    }

    #[test]
    fn error_body() {
        let body = ErrorBody::new("rate_limit_error", "slow down", Some("token_budget_exceeded"));
        assert_eq!(
            reparse(&body.to_vec()),
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null,
                             "code": "token_budget_exceeded"}})
        );
        let body = ErrorBody::new("invalid_request_error", String::from("bad"), None);
        assert_eq!(reparse(&body.to_vec())["error"]["code"], Value::Null);
        assert_eq!(ErrorBody::parse(&body.to_vec()).unwrap(), body);
        let upstream = br#"{"error":{"message":"m","type":"server_error"}}"#;
        assert_eq!(ErrorBody::parse(upstream).unwrap().error.code, None);
        assert!(matches!(ErrorBody::parse(br#"{"error":"x"}"#), Err(WireError::Shape(_))));
    }

    #[test]
    fn serde_integration() {
        // The types work through plain serde too, e.g. embedded in another struct.
        #[derive(Deserialize)]
        struct Wrapper {
            request: ChatRequest,
        }
        let w: Wrapper = serde_json::from_value(json!({"request": request_with_tools()})).unwrap();
        assert_eq!(serde_json::to_value(&w.request).unwrap(), request_with_tools());
        assert!(serde_json::from_value::<Message>(json!({"content": "x"})).is_err());
        let resp: ChatResponse = serde_json::from_slice(&bytes(&openai_response())).unwrap();
        assert_eq!(serde_json::to_value(&resp).unwrap(), openai_response());
    }

    #[test]
    fn wire_error_display() {
        assert_eq!(WireError::NotJson.to_string(), "body is not valid JSON");
        assert_eq!(WireError::NotUtf8.to_string(), "body is not valid UTF-8");
        assert_eq!(WireError::Shape("a: b".into()).to_string(), "unexpected JSON shape: a: b");
    }

    #[test]
    fn known_fields_are_written_first() {
        let req =
            ChatRequest::parse(br#"{"temperature":1,"model":"m","messages":[{"content":"x","role":"user"}]}"#).unwrap();
        assert_eq!(
            String::from_utf8(req.to_vec()).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1}"#
        );
    }
}
