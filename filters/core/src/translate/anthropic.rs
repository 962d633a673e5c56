//! OpenAI chat completions ⇄ Anthropic Messages.
//!
//! Request: `system`/`developer` messages become the top-level `system` blocks; user and
//! assistant content (strings, text parts, images as base64 or URL sources) becomes content
//! blocks; assistant `tool_calls` become `tool_use` blocks (arguments parsed as JSON) and
//! `tool` messages `tool_result` blocks in a user turn (consecutive turns of one role are
//! merged, as Anthropic needs every result of a turn in the next user message); `tools`
//! become `name`/`description`/`input_schema`; `tool_choice` (`auto`, `none`, `required` →
//! `any`, a named function → `tool`) with `parallel_tool_calls: false` →
//! `disable_parallel_tool_use`; `max_completion_tokens`/`max_tokens` (else the configured
//! default) → `max_tokens`; `stop` → `stop_sequences`; `temperature` (clamped to Anthropic's
//! 0–1), `top_p`, `stream`; `user` → `metadata.user_id`. OpenAI-only options with no
//! Anthropic meaning (`seed`, penalties, `logprobs`, `response_format`, ...) are dropped;
//! `n > 1` and audio/file parts are refused.
//!
//! Answer: text blocks → `message.content`, `tool_use` → `tool_calls`, `thinking` →
//! `reasoning_content`; `stop_reason` → `finish_reason`; usage → `prompt_tokens` (input
//! *plus* cache reads and writes, as OpenAI counts them), `completion_tokens`,
//! `prompt_tokens_details.cached_tokens`. Streams: `message_start` → the role chunk,
//! `content_block_start` (tool_use) → the tool call's id and name, `content_block_delta` →
//! content / arguments / reasoning deltas, `message_delta` → the finish chunk, `message_stop`
//! → the usage chunk (when the client asked `stream_options.include_usage`) and
//! `data: [DONE]`; an `error` event → an OpenAI error chunk and `[DONE]`.

use super::{Dialect, RequestOptions, ResponseContext, StreamOut, StreamTranslate, Translator, Untranslatable};
use serde_json::{json, Map, Value};

/// The `anthropic-version` every request carries.
pub const VERSION: &str = "2023-06-01";

/// The table row.
pub const TRANSLATOR: Translator = Translator {
    dialect: Dialect::Anthropic,
    path: "/v1/messages",
    headers: &[("anthropic-version", VERSION)],
    credential: ("x-api-key", ""),
    request,
    response,
    error,
    stream: new_stream,
};

fn bad(why: impl Into<String>) -> Untranslatable {
    Untranslatable(why.into())
}

/// The text of a string or an array of text parts (system messages, tool results).
fn plain_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            texts.join("\n")
        }
        _ => String::new(),
    }
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// An `image_url` part as an Anthropic image block.
fn image_block(part: &Value) -> Result<Value, Untranslatable> {
    let url = part
        .pointer("/image_url/url")
        .or_else(|| part.get("image_url"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("an image_url part has no url"))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let (media, data) = rest.split_once(";base64,").ok_or_else(|| bad("an image data URL is not base64"))?;
        return Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

/// User or assistant content (string or parts) as blocks.
fn content_blocks(content: Option<&Value>, role: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match part.get("type").and_then(Value::as_str).unwrap_or("text") {
                    "text" | "refusal" => {
                        let t = part.get("text").or_else(|| part.get("refusal")).and_then(Value::as_str);
                        if let Some(t) = t.filter(|t| !t.is_empty()) {
                            out.push(text_block(t));
                        }
                    }
                    "image_url" if role == "user" => out.push(image_block(part)?),
                    other => return Err(bad(format!("{role} content part type {other:?} has no Anthropic form"))),
                }
            }
            Ok(out)
        }
        Some(_) => Err(bad(format!("{role} content must be a string or an array of parts"))),
    }
}

/// Assistant `tool_calls` as `tool_use` blocks.
fn tool_use_blocks(calls: &[Value]) -> Result<Vec<Value>, Untranslatable> {
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let id = call.get("id").and_then(Value::as_str).ok_or_else(|| bad("a tool call has no id"))?;
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a tool call has no function name"))?;
        let args = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
        let input: Value = if args.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(args).map_err(|_| bad(format!("tool call {id}: arguments are not JSON")))?
        };
        if !input.is_object() {
            return Err(bad(format!("tool call {id}: arguments must be a JSON object")));
        }
        out.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(out)
}

/// Append a turn, merging it into the previous one when the role repeats.
fn push_turn(turns: &mut Vec<(String, Vec<Value>)>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((r, b)) if r == role => b.extend(blocks),
        _ => turns.push((role.to_string(), blocks)),
    }
}

fn tools(list: &[Value]) -> Result<Vec<Value>, Untranslatable> {
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        if t.get("type").and_then(Value::as_str).is_some_and(|k| k != "function") {
            return Err(bad("only function tools have an Anthropic form"));
        }
        let f = t.get("function").unwrap_or(t);
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| bad("a tool has no function name"))?;
        let mut tool = Map::new();
        tool.insert("name".into(), json!(name));
        if let Some(d) = f.get("description").and_then(Value::as_str) {
            tool.insert("description".into(), json!(d));
        }
        let schema = f.get("parameters").filter(|p| p.is_object()).cloned();
        tool.insert("input_schema".into(), schema.unwrap_or_else(|| json!({"type": "object", "properties": {}})));
        out.push(Value::Object(tool));
    }
    Ok(out)
}

/// `tool_choice` (with `parallel_tool_calls`); `Ok(None)`: send none.
fn tool_choice(choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Value>, Untranslatable> {
    let mut c = match choice {
        None | Some(Value::Null) => {
            if parallel == Some(false) {
                json!({"type": "auto"})
            } else {
                return Ok(None);
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => return Ok(Some(json!({"type": "none"}))),
            "required" => json!({"type": "any"}),
            other => return Err(bad(format!("tool_choice {other:?} has no Anthropic form"))),
        },
        Some(v) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice must name a function"))?;
            json!({"type": "tool", "name": name})
        }
    };
    if parallel == Some(false) {
        if let Some(o) = c.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    Ok(Some(c))
}

/// OpenAI chat request → Anthropic Messages request.
pub fn request(body: &Value, opts: &RequestOptions) -> Result<Value, Untranslatable> {
    let root = body.as_object().ok_or_else(|| bad("the body is not a JSON object"))?;
    if root.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(bad("n > 1 has no Anthropic form"));
    }
    let messages = root.get("messages").and_then(Value::as_array).ok_or_else(|| bad("messages must be an array"))?;
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        match role {
            "system" | "developer" => {
                let t = plain_text(m.get("content"));
                if !t.is_empty() {
                    system.push(text_block(&t));
                }
            }
            "user" => push_turn(&mut turns, "user", content_blocks(m.get("content"), "user")?),
            "assistant" => {
                let mut blocks = content_blocks(m.get("content"), "assistant")?;
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                    blocks.extend(tool_use_blocks(calls)?);
                }
                push_turn(&mut turns, "assistant", blocks);
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("messages[{i}]: a tool message has no tool_call_id")))?;
                let block = json!({"type": "tool_result", "tool_use_id": id, "content": plain_text(m.get("content"))});
                push_turn(&mut turns, "user", vec![block]);
            }
            other => return Err(bad(format!("messages[{i}]: role {other:?} has no Anthropic form"))),
        }
    }
    let mut out = Map::new();
    if let Some(m) = root.get("model") {
        out.insert("model".into(), m.clone());
    }
    let max = crate::api::max_output_tokens(crate::api::Api::Chat, body).unwrap_or(opts.default_max_tokens);
    out.insert("max_tokens".into(), json!(max));
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    let turns: Vec<Value> =
        turns.into_iter().map(|(role, blocks)| json!({"role": role, "content": Value::Array(blocks)})).collect();
    out.insert("messages".into(), Value::Array(turns));
    match root.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(t) = root.get("temperature").and_then(Value::as_f64) {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = root.get("top_p").filter(|p| p.is_number()) {
        out.insert("top_p".into(), p.clone());
    }
    if let Some(s) = root.get("stream").filter(|s| s.is_boolean()) {
        out.insert("stream".into(), s.clone());
    }
    if let Some(list) = root.get("tools").and_then(Value::as_array).filter(|l| !l.is_empty()) {
        out.insert("tools".into(), Value::Array(tools(list)?));
        let parallel = root.get("parallel_tool_calls").and_then(Value::as_bool);
        if let Some(c) = tool_choice(root.get("tool_choice"), parallel)? {
            out.insert("tool_choice".into(), c);
        }
    }
    if let Some(u) = root.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    Ok(Value::Object(out))
}

/// `stop_reason` → `finish_reason`.
pub fn finish_reason(stop: Option<&str>) -> Value {
    match stop {
        None => Value::Null,
        Some("max_tokens" | "model_context_window_exceeded") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(_) => json!("stop"),
    }
}

/// Anthropic's counts (input without cache tokens) as an OpenAI usage object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    input: u64,
    cache_read: u64,
    cache_write: u64,
    output: u64,
}

impl Counts {
    /// Take every count the object has (later events repeat or update them).
    fn update(&mut self, u: Option<&Value>) {
        let Some(u) = u else { return };
        let get = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(n) = get("input_tokens") {
            self.input = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_write = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output = n;
        }
    }

    fn openai(self) -> Value {
        let prompt = self.input.saturating_add(self.cache_read).saturating_add(self.cache_write);
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
            "prompt_tokens_details": {"cached_tokens": self.cache_read},
        })
    }
}

/// Anthropic message → `chat.completion`.
pub fn response(msg: &Value, ctx: &ResponseContext) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for block in msg.get("content").and_then(Value::as_array).into_iter().flatten() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("thinking") => {
                reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or_default());
            }
            Some("tool_use") => {
                let args = block.get("input").map_or_else(|| "{}".to_string(), Value::to_string);
                calls.push(json!({"id": block.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                    "function": {"name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": args}}));
            }
            _ => {}
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert("content".into(), if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) });
    if !reasoning.is_empty() {
        message.insert("reasoning_content".into(), json!(reasoning));
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let mut out = json!({
        "id": msg.get("id").cloned().unwrap_or_else(|| json!("msg")),
        "object": "chat.completion",
        "created": ctx.created,
        "model": msg.get("model").cloned().unwrap_or_else(|| json!(ctx.model)),
        "choices": [{"index": 0, "message": Value::Object(message), "logprobs": null,
            "finish_reason": finish_reason(msg.get("stop_reason").and_then(Value::as_str))}],
    });
    if msg.get("usage").is_some_and(Value::is_object) {
        let mut c = Counts::default();
        c.update(msg.get("usage"));
        if let Some(o) = out.as_object_mut() {
            o.insert("usage".into(), c.openai());
        }
    }
    out
}

/// `{"type":"error","error":{"type":…,"message":…}}` → the OpenAI error shape.
pub fn error(body: &Value) -> Option<Value> {
    if body.get("type").and_then(Value::as_str) != Some("error") {
        return None;
    }
    let e = body.get("error")?;
    let kind = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
    let message = e.get("message").and_then(Value::as_str).unwrap_or("provider error");
    Some(json!({"error": {"message": message, "type": kind, "param": null, "code": kind}}))
}

/// The state of one translated stream.
struct Stream {
    ctx: ResponseContext,
    id: String,
    model: String,
    counts: Counts,
    /// Anthropic block index → OpenAI tool-call index.
    tools: Vec<(u64, u64)>,
    done: bool,
}

fn new_stream(ctx: ResponseContext) -> Box<dyn StreamTranslate> {
    let model = ctx.model.clone();
    Box::new(Stream { ctx, id: "msg".into(), model, counts: Counts::default(), tools: Vec::new(), done: false })
}

impl Stream {
    fn chunk(&self, delta: Value, finish: Value) -> StreamOut {
        StreamOut::Data(json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.ctx.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }))
    }

    fn tool_index(&self, block: u64) -> Option<u64> {
        self.tools.iter().find(|(b, _)| *b == block).map(|(_, t)| *t)
    }

    fn end(&mut self) -> Vec<StreamOut> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut out = Vec::with_capacity(2);
        if self.ctx.include_usage {
            out.push(StreamOut::Data(json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.ctx.created, "model": self.model,
                "choices": [], "usage": self.counts.openai(),
            })));
        }
        out.push(StreamOut::Done);
        out
    }
}

impl StreamTranslate for Stream {
    fn event(&mut self, name: Option<&str>, data: &Value) -> Vec<StreamOut> {
        let kind = data.get("type").and_then(Value::as_str).or(name).unwrap_or_default();
        let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            "message_start" => {
                let m = data.get("message");
                if let Some(id) = m.and_then(|m| m.get("id")).and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                if let Some(model) = m.and_then(|m| m.get("model")).and_then(Value::as_str) {
                    self.model = model.to_string();
                }
                self.counts.update(m.and_then(|m| m.get("usage")));
                vec![self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)]
            }
            "content_block_start" => {
                let block = data.get("content_block");
                match block.and_then(|b| b.get("type")).and_then(Value::as_str) {
                    Some("tool_use") => {
                        let t = u64::try_from(self.tools.len()).unwrap_or(u64::MAX);
                        self.tools.push((index, t));
                        let id = block.and_then(|b| b.get("id")).cloned().unwrap_or(Value::Null);
                        let name = block.and_then(|b| b.get("name")).cloned().unwrap_or(Value::Null);
                        let call = json!({"index": t, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}});
                        vec![self.chunk(json!({"tool_calls": [call]}), Value::Null)]
                    }
                    Some("text") => match block.and_then(|b| b.get("text")).and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => vec![self.chunk(json!({"content": t}), Value::Null)],
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let delta = data.get("delta");
                let get = |k: &str| delta.and_then(|d| d.get(k)).and_then(Value::as_str);
                match delta.and_then(|d| d.get("type")).and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": get("text")}), Value::Null)],
                    Some("thinking_delta") => {
                        vec![self.chunk(json!({"reasoning_content": get("thinking")}), Value::Null)]
                    }
                    Some("input_json_delta") => match self.tool_index(index) {
                        Some(t) => vec![self.chunk(
                            json!({"tool_calls": [{"index": t, "function": {"arguments": get("partial_json")}}]}),
                            Value::Null,
                        )],
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                self.counts.update(data.get("usage"));
                let stop = data.pointer("/delta/stop_reason").and_then(Value::as_str);
                if stop.is_some() {
                    vec![self.chunk(json!({}), finish_reason(stop))]
                } else {
                    Vec::new()
                }
            }
            "message_stop" => self.end(),
            "error" => {
                let mut out = Vec::with_capacity(2);
                if let Some(e) = error(data) {
                    out.push(StreamOut::Data(e));
                }
                self.done = true;
                out.push(StreamOut::Done);
                out
            }
            _ => Vec::new(),
        }
    }

    fn finish(&mut self) -> Vec<StreamOut> {
        if self.done {
            return Vec::new();
        }
        // A cut stream: end it for the client without a usage chunk (the counts are partial).
        self.done = true;
        vec![StreamOut::Done]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn opts() -> RequestOptions {
        RequestOptions { default_max_tokens: 4096 }
    }

    #[test]
    fn messages_system_tools_and_caps() {
        let chat = json!({
            "model": "claude-x", "max_completion_tokens": 99, "temperature": 1.5, "top_p": 0.9,
            "stream": true, "stream_options": {"include_usage": true}, "stop": "END", "user": "u1",
            "seed": 7, "presence_penalty": 0.1,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]},
                {"role": "user", "content": [{"type": "text", "text": "Look up x"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUFB"}}]},
                {"role": "assistant", "content": "Sure.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "r1"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "r2"}]},
                {"role": "user", "content": "thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "Find",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        });
        let a = request(&chat, &opts()).unwrap();
        assert_eq!(a["model"], "claude-x");
        assert_eq!(a["max_tokens"], 99);
        assert_eq!(a["temperature"], 1.0);
        assert_eq!(a["top_p"], 0.9);
        assert_eq!(a["stream"], true);
        assert_eq!(a["stop_sequences"], json!(["END"]));
        assert_eq!(a["metadata"], json!({"user_id": "u1"}));
        assert_eq!(a["system"], json!([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No jokes."}]));
        let m = a["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0]["role"], "user");
        assert_eq!(m[0]["content"][1]["source"], json!({"type": "base64", "media_type": "image/png", "data": "QUFB"}));
        assert_eq!(m[1]["content"][0], json!({"type": "text", "text": "Sure."}));
        assert_eq!(
            m[1]["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "x"}})
        );
        assert_eq!(m[1]["content"][2]["input"], json!({}));
        assert_eq!(m[2]["role"], "user");
        assert_eq!(m[2]["content"][0], json!({"type": "tool_result", "tool_use_id": "call_1", "content": "r1"}));
        assert_eq!(m[2]["content"][1]["content"], "r2");
        assert_eq!(m[2]["content"][2], json!({"type": "text", "text": "thanks"}));
        assert_eq!(
            a["tools"],
            json!([{"name": "lookup", "description": "Find",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}])
        );
        assert_eq!(a["tool_choice"], json!({"type": "any", "disable_parallel_tool_use": true}));
        for dropped in ["seed", "presence_penalty", "stream_options", "user", "stop", "n"] {
            assert!(a.get(dropped).is_none(), "{dropped}");
        }
    }

    #[test]
    fn defaults_and_refusals() {
        let a =
            request(&json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}), &opts())
                .unwrap();
        assert_eq!(a["max_tokens"], 5);
        assert_eq!(a["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]));
        let a = request(&json!({"messages": [{"role": "user", "content": "hi"}]}), &opts()).unwrap();
        assert_eq!(a["max_tokens"], 4096);
        assert!(a.get("system").is_none() && a.get("tools").is_none());
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(tool_choice(Some(&named), None).unwrap(), Some(json!({"type": "tool", "name": "f"})));
        assert_eq!(tool_choice(Some(&json!("none")), None).unwrap(), Some(json!({"type": "none"})));
        assert_eq!(tool_choice(None, None).unwrap(), None);
        for body in [
            json!({"n": 2, "messages": []}),
            json!({"messages": [{"role": "function", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1"}}]}]}),
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            json!({"messages": "hi"}),
        ] {
            assert!(request(&body, &opts()).is_err(), "{body}");
        }
    }

    #[test]
    fn answers_errors_and_usage() {
        let msg = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hi "},
                {"type": "text", "text": "there"},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}});
        let ctx = ResponseContext { created: 7, include_usage: false, model: "sent".into() };
        let c = response(&msg, &ctx);
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["id"], "msg_1");
        assert_eq!(c["created"], 7);
        assert_eq!(c["model"], "claude-x");
        let choice = &c["choices"][0];
        assert_eq!(choice["message"]["content"], "Hi there");
        assert_eq!(choice["message"]["reasoning_content"], "hmm");
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(choice["message"]["tool_calls"][0]["function"]["arguments"], "{\"q\":\"x\"}");
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 3}})
        );
        let u = crate::usage::usage_from_body(&c).unwrap();
        assert_eq!((u.input, u.output, u.cached_input), (15, 5, 3));
        for (stop, finish) in
            [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("refusal", "content_filter")]
        {
            assert_eq!(finish_reason(Some(stop)), finish);
        }
        let e =
            error(&json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})).unwrap();
        assert_eq!(
            e,
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": "rate_limit_error"}})
        );
        assert!(error(&json!({"error": {"message": "openai"}})).is_none());
    }

    fn run(events: &[Value], include_usage: bool) -> Vec<StreamOut> {
        let mut s = new_stream(ResponseContext { created: 1, include_usage, model: "m".into() });
        let mut out = Vec::new();
        for e in events {
            out.extend(s.event(None, e));
        }
        out.extend(s.finish());
        out
    }

    fn datas(out: &[StreamOut]) -> Vec<Value> {
        out.iter().filter_map(|o| if let StreamOut::Data(v) = o { Some(v.clone()) } else { None }).collect()
    }

    #[test]
    fn streams_translate_event_by_event() {
        let events = [
            json!({"type": "message_start", "message": {"id": "msg_9", "model": "claude-x", "content": [],
                "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 4}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"x\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ];
        let out = run(&events, true);
        assert_eq!(out.last(), Some(&StreamOut::Done));
        assert_eq!(out.iter().filter(|o| **o == StreamOut::Done).count(), 1);
        let d = datas(&out);
        assert!(d
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_9" && c["model"] == "claude-x"));
        assert_eq!(d[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = d.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, "Hello");
        let calls: Vec<&Value> = d.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
        assert_eq!(calls[0][0]["id"], "toolu_1");
        assert_eq!(calls[0][0]["function"]["name"], "lookup");
        let args: String = calls.iter().filter_map(|c| c[0]["function"]["arguments"].as_str()).collect();
        assert_eq!(args, "{\"q\":\"x\"}");
        assert!(calls.iter().all(|c| c[0]["index"] == 0));
        let finish: Vec<&Value> = d
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
        let usage = d.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 16);
        assert_eq!(usage["usage"]["completion_tokens"], 9);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        // Without include_usage: no usage chunk.
        assert!(datas(&run(&events, false)).iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn stream_errors_and_cuts_end_with_done() {
        let out = run(&[json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})], true);
        assert_eq!(out.len(), 2);
        assert_eq!(datas(&out)[0]["error"]["type"], "overloaded_error");
        assert_eq!(out[1], StreamOut::Done);
        let out = run(&[json!({"type": "message_start", "message": {"id": "m"}})], true);
        assert_eq!(out.last(), Some(&StreamOut::Done));
        assert!(datas(&out).iter().all(|c| c.get("usage").is_none()));
    }
}
