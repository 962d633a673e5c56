//! What the mock provider answers on the OpenAI endpoints: chat completion
//! and legacy text completion bodies and streams (with the optional extra
//! output channels and logprobs), the deterministic usage formula, error
//! bodies and the deterministic failure schedule. No I/O here.

use serde_json::{json, Map, Value};

/// `created` timestamp used in every object (fixed so outputs are stable).
pub const CREATED: u64 = 1_730_000_000;
/// `expires_at` of the mock `message.audio` object.
pub const AUDIO_EXPIRES_AT: u64 = 1_730_003_600;
/// Largest word count of a generated `w1 w2 … wN` text (larger values are
/// clamped).
pub const MAX_WORDS: u64 = 1_000_000;
/// Largest number of `top_logprobs` alternatives (larger values are clamped).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// An injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Close the connection without any response.
    Reset,
    /// 503 with an OpenAI-style `server_error`.
    Unavailable,
    /// 429 with an OpenAI-style `rate_limit_error` and `retry-after`.
    RateLimited,
    /// 200 with a cut-off JSON body (or a broken SSE event when streaming).
    Malformed,
    /// Connection closed mid-body.
    Truncate,
    /// Nothing is sent; the connection is held open.
    Stall,
    /// Part of the answer is sent, then the connection is held open.
    StallMidStream,
    /// 400 "maximum context length" (forced only).
    ContextLength,
}

impl Failure {
    /// The order in which the rate-based failures are checked.
    pub const CHECK_ORDER: [Failure; 6] = [
        Failure::Reset,
        Failure::Unavailable,
        Failure::RateLimited,
        Failure::Malformed,
        Failure::Truncate,
        Failure::Stall,
    ];

    /// Every kind that `x-mock-fail` accepts.
    pub const ALL: [Failure; 8] = [
        Failure::Reset,
        Failure::Unavailable,
        Failure::RateLimited,
        Failure::Malformed,
        Failure::Truncate,
        Failure::Stall,
        Failure::StallMidStream,
        Failure::ContextLength,
    ];

    /// Name used in `x-mock-fail`, in the log's `failure` field and in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Reset => "reset",
            Failure::Unavailable => "503",
            Failure::RateLimited => "429",
            Failure::Malformed => "malformed",
            Failure::Truncate => "truncate",
            Failure::Stall => "stall",
            Failure::StallMidStream => "stall_mid_stream",
            Failure::ContextLength => "context_length",
        }
    }

    /// Parses an `x-mock-fail` header value; empty or `none` means no failure.
    pub fn from_header(value: &str) -> Result<Option<Failure>, String> {
        let value = value.trim().to_ascii_lowercase();
        if value.is_empty() || value == "none" {
            return Ok(None);
        }
        Failure::ALL.into_iter().find(|f| f.as_str() == value).map(Some).ok_or_else(|| {
            format!(
                "unknown x-mock-fail value `{value}` (expected 429, 503, reset, malformed, truncate, stall, \
                 stall_mid_stream or context_length)"
            )
        })
    }

    /// The settings key holding this failure's rate (`None` for the kinds
    /// that can only be forced).
    pub fn rate_key(self) -> Option<&'static str> {
        match self {
            Failure::Reset => Some("rate_reset"),
            Failure::Unavailable => Some("rate_503"),
            Failure::RateLimited => Some("rate_429"),
            Failure::Malformed => Some("rate_malformed"),
            Failure::Truncate => Some("rate_truncate"),
            Failure::Stall => Some("rate_stall"),
            Failure::StallMidStream | Failure::ContextLength => None,
        }
    }
}

/// Whether request number `n` (1-based) fails at `pct` percent:
/// `floor(n*pct/100) != floor((n-1)*pct/100)`.
pub fn fires(n: u64, pct: u32) -> bool {
    let pct = u64::from(pct.min(100));
    let now = n.saturating_mul(pct) / 100;
    let before = n.saturating_sub(1).saturating_mul(pct) / 100;
    n > 0 && now != before
}

/// One counter per failure kind, in [`Failure::CHECK_ORDER`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FailureCounters {
    counts: [u64; 6],
}

impl FailureCounters {
    /// Counts one model request against every kind and returns the first
    /// kind (in check order) whose schedule fires. `rates` is in
    /// [`Failure::CHECK_ORDER`].
    pub fn decide(&mut self, rates: [u32; 6]) -> Option<Failure> {
        let mut chosen = None;
        for ((kind, count), pct) in Failure::CHECK_ORDER.into_iter().zip(self.counts.iter_mut()).zip(rates) {
            *count = count.saturating_add(1);
            if chosen.is_none() && fires(*count, pct) {
                chosen = Some(kind);
            }
        }
        chosen
    }

    /// Restarts the schedule of one kind (used when its rate is changed).
    pub fn reset(&mut self, kind: Failure) {
        for (k, count) in Failure::CHECK_ORDER.into_iter().zip(self.counts.iter_mut()) {
            if k == kind {
                *count = 0;
            }
        }
    }
}

/// What the usage formula needs from a chat request, plus the request flags.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// `model` if it is a string (possibly empty).
    pub model: Option<String>,
    /// `stream == true`.
    pub stream: bool,
    /// `stream_options.include_usage == true`.
    pub include_usage: bool,
    /// UTF-8 bytes of all prompt text (see [`prompt_bytes`]).
    pub prompt_bytes: usize,
    /// `Some(alternatives)` when logprobs were asked for: chat
    /// `"logprobs": true` (alternatives from `top_logprobs`), or the legacy
    /// integer `"logprobs": n`.
    pub logprobs: Option<usize>,
}

impl ChatRequest {
    pub fn from_json(body: &Value) -> Self {
        let top = |v: Option<&Value>| {
            v.and_then(Value::as_u64).map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX).min(MAX_TOP_LOGPROBS))
        };
        let logprobs = match body.get("logprobs") {
            Some(Value::Bool(true)) => Some(top(body.get("top_logprobs"))),
            Some(n @ Value::Number(_)) if n.is_u64() => Some(top(Some(n))),
            _ => None,
        };
        ChatRequest {
            model: body.get("model").and_then(Value::as_str).map(str::to_string),
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: body.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool)
                == Some(true),
            prompt_bytes: prompt_bytes(body),
            logprobs,
        }
    }
}

/// Total UTF-8 bytes of the prompt text: every `messages[].content` that is a
/// string, the `text` of every part when `content` is an array of parts, and
/// the legacy `prompt` (a string, or an array of strings).
pub fn prompt_bytes(body: &Value) -> usize {
    let messages: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| messages.iter().map(|m| content_bytes(m.get("content"))).sum())
        .unwrap_or(0);
    let prompt: usize = match body.get("prompt") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    messages + prompt
}

/// Bytes of a `content` value: a string, or the string `text` of every part.
pub fn content_bytes(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(str::len).sum()
        }
        _ => 0,
    }
}

/// `ceil(bytes / 4)`.
pub fn prompt_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Number of whitespace-separated words.
pub fn completion_tokens(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
}

/// `w1 w2 … wN` (N clamped to [`MAX_WORDS`]).
pub fn words_text(n: u64) -> String {
    let n = n.min(MAX_WORDS);
    let mut out = String::new();
    for i in 1..=n {
        if i > 1 {
            out.push(' ');
        }
        out.push('w');
        out.push_str(&i.to_string());
    }
    out
}

/// How usage is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageReport {
    /// Never reported (`--no-usage`).
    Omitted,
    /// Present but with garbage values (`--malformed-usage`).
    Garbage,
    Counts {
        prompt: u64,
        completion: u64,
        /// `--cached-tokens` / `x-mock-cached-tokens`.
        cached: Option<u64>,
        /// `--reasoning-tokens` / `x-mock-reasoning-tokens`.
        reasoning: Option<u64>,
    },
}

impl UsageReport {
    /// The chat / text completion `usage` object. The `*_details` objects
    /// appear only when cached or reasoning tokens are configured.
    pub fn to_json(self) -> Option<Value> {
        match self {
            UsageReport::Omitted => None,
            UsageReport::Garbage => Some(json!({
                "prompt_tokens": "x",
                "completion_tokens": -3,
                "total_tokens": "lots",
            })),
            UsageReport::Counts { prompt, completion, cached, reasoning } => {
                let mut usage = json!({
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt.saturating_add(completion),
                });
                if cached.is_some() || reasoning.is_some() {
                    if let Some(obj) = usage.as_object_mut() {
                        obj.insert(
                            "prompt_tokens_details".into(),
                            json!({"cached_tokens": cached.unwrap_or(0), "audio_tokens": 0}),
                        );
                        obj.insert(
                            "completion_tokens_details".into(),
                            json!({
                                "reasoning_tokens": reasoning.unwrap_or(0),
                                "audio_tokens": 0,
                                "accepted_prediction_tokens": 0,
                                "rejected_prediction_tokens": 0,
                            }),
                        );
                    }
                }
                Some(usage)
            }
        }
    }
}

/// Extra output channels of a chat completion (from `x-mock-*` headers) and
/// whether logprobs were requested.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extras {
    /// `message.reasoning_content`.
    pub reasoning: Option<String>,
    /// `message.refusal`; `content` is then `null`.
    pub refusal: Option<String>,
    /// Arguments of one `lookup` tool call.
    pub tool_args: Option<String>,
    /// `message.audio.transcript`.
    pub audio_transcript: Option<String>,
    /// `Some(alternatives)` when logprobs were requested.
    pub logprobs: Option<usize>,
}

impl Extras {
    /// `C` for a chat completion: words over every output channel that is
    /// sent (content unless refused, reasoning, refusal, tool arguments,
    /// audio transcript).
    pub fn output_words(&self, text: &str) -> u64 {
        let content = if self.refusal.is_some() { 0 } else { completion_tokens(text) };
        [&self.reasoning, &self.refusal, &self.tool_args, &self.audio_transcript]
            .into_iter()
            .flatten()
            .map(|t| completion_tokens(t))
            .fold(content, u64::saturating_add)
    }

    fn finish_reason(&self) -> &'static str {
        if self.tool_args.is_some() {
            "tool_calls"
        } else {
            "stop"
        }
    }
}

/// Everything needed to render a successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: String,
    pub model: String,
    pub text: String,
    pub usage: UsageReport,
    pub extras: Extras,
}

/// Splits `text` into tokens for logprobs: each word together with the
/// whitespace before it (`"Hello from mock."` → `"Hello"`, `" from"`,
/// `" mock."`). The tokens concatenate back to `text`.
pub fn word_pieces(text: &str) -> Vec<&str> {
    let mut bounds = vec![0];
    let mut previous_was_space: Option<bool> = None;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if space && previous_was_space == Some(false) {
            bounds.push(i);
        }
        previous_was_space = Some(space);
    }
    bounds.push(text.len());
    bounds.windows(2).filter_map(|w| text.get(*w.first()?..*w.get(1)?)).filter(|t| !t.is_empty()).collect()
}

/// `-(10*i + 1)/10`: -0.1 for the token itself, -1.1, -2.1, … for the
/// alternatives after it.
fn rank_logprob(i: usize) -> f64 {
    let tenths = u32::try_from(i.saturating_mul(10).saturating_add(1)).unwrap_or(u32::MAX);
    -f64::from(tenths) / 10.0
}

/// The `top` alternatives of a token: the token, its uppercase form, the
/// token, … (alternating).
fn alternatives(token: &str, top: usize) -> Vec<(String, f64)> {
    (0..top).map(|i| (if i % 2 == 0 { token.to_string() } else { token.to_uppercase() }, rank_logprob(i))).collect()
}

/// Chat-style `logprobs.content` entries for `text`.
pub fn token_logprobs(text: &str, top: usize) -> Vec<Value> {
    word_pieces(text)
        .into_iter()
        .map(|t| {
            let alts: Vec<Value> = alternatives(t, top)
                .into_iter()
                .map(|(tok, lp)| json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes()}))
                .collect();
            json!({"token": t, "logprob": rank_logprob(0), "bytes": t.as_bytes(), "top_logprobs": alts})
        })
        .collect()
}

/// The chat `choices[].logprobs` object for `text` (content or refusal).
fn chat_logprobs(extras: &Extras, text: &str, top: usize) -> Value {
    if extras.refusal.is_some() {
        json!({"content": null, "refusal": token_logprobs(text, top)})
    } else {
        json!({"content": token_logprobs(text, top), "refusal": null})
    }
}

fn tool_call(arguments: &str) -> Value {
    json!({"id": "call_mock_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}})
}

/// Non-streaming `chat.completion` object.
pub fn completion_body(reply: &Reply) -> Value {
    let x = &reply.extras;
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert("content".into(), if x.refusal.is_some() { Value::Null } else { json!(reply.text) });
    if let Some(reasoning) = &x.reasoning {
        message.insert("reasoning_content".into(), json!(reasoning));
    }
    if let Some(refusal) = &x.refusal {
        message.insert("refusal".into(), json!(refusal));
    }
    if let Some(arguments) = &x.tool_args {
        message.insert("tool_calls".into(), json!([tool_call(arguments)]));
    }
    if let Some(transcript) = &x.audio_transcript {
        message.insert(
            "audio".into(),
            json!({"id": "audio_mock_1", "data": "", "expires_at": AUDIO_EXPIRES_AT, "transcript": transcript}),
        );
    }
    let logprobs = match x.logprobs {
        None => Value::Null,
        Some(top) => chat_logprobs(x, x.refusal.as_deref().unwrap_or(&reply.text), top),
    };
    let mut body = json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": CREATED,
        "model": reply.model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": x.finish_reason(),
        }],
    });
    if let (Some(usage), Some(obj)) = (reply.usage.to_json(), body.as_object_mut()) {
        obj.insert("usage".into(), usage);
    }
    body
}

/// One `chat.completion.chunk`. `logprobs` is only inserted when logprobs
/// were requested (then `Some(Value::Null)` for chunks without tokens).
fn chunk(reply: &Reply, delta: Value, finish_reason: Value, include_usage: bool, logprobs: Option<Value>) -> Value {
    let mut choice = Map::new();
    choice.insert("index".into(), json!(0));
    choice.insert("delta".into(), delta);
    if let Some(logprobs) = logprobs {
        choice.insert("logprobs".into(), logprobs);
    }
    choice.insert("finish_reason".into(), finish_reason);
    let mut obj = Map::new();
    obj.insert("id".into(), json!(reply.id));
    obj.insert("object".into(), json!("chat.completion.chunk"));
    obj.insert("created".into(), json!(CREATED));
    obj.insert("model".into(), json!(reply.model));
    obj.insert("choices".into(), json!([Value::Object(choice)]));
    if include_usage {
        obj.insert("usage".into(), Value::Null);
    }
    Value::Object(obj)
}

/// One SSE event carrying `data`.
pub fn sse(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// One SSE event with an `event:` line (Responses and Anthropic streams).
pub fn sse_named(event: &str, data: &str) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The terminating SSE event.
pub const DONE_EVENT: &str = "data: [DONE]\n\n";

/// Splits `text` into at most `pieces` roughly equal non-empty pieces on
/// char boundaries (`pieces` 0 is treated as 1; empty text gives nothing).
pub fn split_text(text: &str, pieces: usize) -> Vec<&str> {
    let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let chars = starts.len().saturating_sub(1);
    let pieces = pieces.clamp(1, chars.max(1));
    (0..pieces)
        .filter_map(|i| {
            let from = starts.get(i * chars / pieces)?;
            let to = starts.get((i + 1) * chars / pieces)?;
            text.get(*from..*to)
        })
        .filter(|piece| !piece.is_empty())
        .collect()
}

/// The SSE events of a streamed answer, `[DONE]` included: a role chunk,
/// the reasoning pieces, the content (or refusal) pieces, the audio
/// transcript pieces, the tool call, a finish chunk, then (only with
/// `include_usage` and when usage is not omitted) a usage chunk with empty
/// `choices`.
pub fn stream_events(reply: &Reply, pieces: usize, include_usage: bool) -> Vec<String> {
    let x = &reply.extras;
    let lp = |value: Option<Value>| x.logprobs.map(|_| value.unwrap_or(Value::Null));
    let event = |delta: Value, finish: Value, logprobs: Option<Value>| {
        sse(&chunk(reply, delta, finish, include_usage, logprobs).to_string())
    };
    let mut events = vec![event(json!({"role": "assistant", "content": ""}), Value::Null, lp(None))];
    if let Some(reasoning) = &x.reasoning {
        for piece in split_text(reasoning, pieces) {
            events.push(event(json!({"reasoning_content": piece}), Value::Null, lp(None)));
        }
    }
    let (key, text) = match &x.refusal {
        Some(refusal) => ("refusal", refusal.as_str()),
        None => ("content", reply.text.as_str()),
    };
    for piece in split_text(text, pieces) {
        let logprobs = x.logprobs.map(|top| chat_logprobs(x, piece, top));
        events.push(event(json!({ key: piece }), Value::Null, lp(logprobs)));
    }
    if let Some(transcript) = &x.audio_transcript {
        for piece in split_text(transcript, pieces) {
            events.push(event(json!({"audio": {"transcript": piece}}), Value::Null, lp(None)));
        }
    }
    if let Some(arguments) = &x.tool_args {
        let first = json!({"tool_calls": [{
            "index": 0, "id": "call_mock_1", "type": "function",
            "function": {"name": "lookup", "arguments": ""},
        }]});
        events.push(event(first, Value::Null, lp(None)));
        for piece in split_text(arguments, pieces) {
            let delta = json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]});
            events.push(event(delta, Value::Null, lp(None)));
        }
    }
    events.push(event(json!({}), json!(x.finish_reason()), lp(None)));
    if include_usage {
        if let Some(usage) = reply.usage.to_json() {
            let usage_chunk = json!({
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": reply.model,
                "choices": [],
                "usage": usage,
            });
            events.push(sse(&usage_chunk.to_string()));
        }
    }
    events.push(DONE_EVENT.to_string());
    events
}

/// A `chat.completion` body cut off mid-object.
pub fn malformed_body(id: &str) -> String {
    format!(r#"{{"id":"{id}","object":"chat.completion","choices":[{{"index":0,"mess"#)
}

/// A stream whose second event carries cut-off JSON; it still ends with
/// `[DONE]` so only the JSON is broken, not the framing.
pub fn malformed_stream_events(reply: &Reply) -> Vec<String> {
    let role = chunk(reply, json!({"role": "assistant", "content": ""}), Value::Null, false, None);
    vec![
        sse(&role.to_string()),
        sse(&format!(
            r#"{{"id":"{}","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"cont"#,
            reply.id
        )),
        DONE_EVENT.to_string(),
    ]
}

/// Legacy `logprobs` object of a text completion for `text`, whose first
/// character is at character offset `offset` of the whole answer.
pub fn legacy_logprobs(text: &str, offset: usize, top: usize) -> Value {
    let tokens = word_pieces(text);
    let mut offsets = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in &tokens {
        offsets.push(at);
        at += t.chars().count();
    }
    let top_logprobs: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut alts = Map::new();
            for (tok, lp) in alternatives(t, top) {
                alts.entry(tok).or_insert(json!(lp));
            }
            Value::Object(alts)
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": tokens.iter().map(|_| rank_logprob(0)).collect::<Vec<f64>>(),
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    })
}

/// Non-streaming legacy `text_completion` object.
pub fn text_completion_body(reply: &Reply) -> Value {
    let logprobs = reply.extras.logprobs.map_or(Value::Null, |top| legacy_logprobs(&reply.text, 0, top));
    let mut body = json!({
        "id": reply.id,
        "object": "text_completion",
        "created": CREATED,
        "model": reply.model,
        "choices": [{"index": 0, "text": reply.text, "finish_reason": "stop", "logprobs": logprobs}],
    });
    if let (Some(usage), Some(obj)) = (reply.usage.to_json(), body.as_object_mut()) {
        obj.insert("usage".into(), usage);
    }
    body
}

fn text_chunk(reply: &Reply, text: &str, finish_reason: Value, logprobs: Value, include_usage: bool) -> String {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(reply.id));
    obj.insert("object".into(), json!("text_completion"));
    obj.insert("created".into(), json!(CREATED));
    obj.insert("model".into(), json!(reply.model));
    obj.insert(
        "choices".into(),
        json!([{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]),
    );
    if include_usage {
        obj.insert("usage".into(), Value::Null);
    }
    sse(&Value::Object(obj).to_string())
}

/// The SSE events of a streamed legacy completion: one chunk per text
/// piece, a finish chunk (`text: ""`, `finish_reason: "stop"`), the usage
/// chunk (with `include_usage`), `[DONE]`.
pub fn text_completion_events(reply: &Reply, pieces: usize, include_usage: bool) -> Vec<String> {
    let mut events = Vec::new();
    let mut offset = 0;
    for piece in split_text(&reply.text, pieces) {
        let logprobs = reply.extras.logprobs.map_or(Value::Null, |top| legacy_logprobs(piece, offset, top));
        offset += piece.chars().count();
        events.push(text_chunk(reply, piece, Value::Null, logprobs, include_usage));
    }
    events.push(text_chunk(reply, "", json!("stop"), Value::Null, include_usage));
    if include_usage {
        if let Some(usage) = reply.usage.to_json() {
            let usage_chunk = json!({
                "id": reply.id,
                "object": "text_completion",
                "created": CREATED,
                "model": reply.model,
                "choices": [],
                "usage": usage,
            });
            events.push(sse(&usage_chunk.to_string()));
        }
    }
    events.push(DONE_EVENT.to_string());
    events
}

/// A legacy completion stream: the first event, a cut-off event, `[DONE]`.
pub fn malformed_text_completion_events(reply: &Reply) -> Vec<String> {
    let mut events: Vec<String> = text_completion_events(reply, 1, false).into_iter().take(1).collect();
    events.push(sse(&format!(r#"{{"id":"{}","object":"text_completion","choices":[{{"index":0,"te"#, reply.id)));
    events.push(DONE_EVENT.to_string());
    events
}

/// OpenAI-style error object.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    error_body_param(message, kind, None, code)
}

/// OpenAI-style error object with a `param`.
pub fn error_body_param(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

pub fn rate_limit_error(model: &str, name: &str) -> Value {
    error_body(
        &format!("Rate limit reached for {model} (mock {name})"),
        "rate_limit_error",
        Some("rate_limit_exceeded"),
    )
}

pub fn unavailable_error(name: &str) -> Value {
    error_body(&format!("mock {name} unavailable"), "server_error", Some("service_unavailable"))
}

pub fn invalid_json_error(detail: &str) -> Value {
    error_body(
        &format!("We could not parse the JSON body of your request: {detail}"),
        "invalid_request_error",
        Some("invalid_json"),
    )
}

/// The 400 for a prompt of `prompt` tokens over a window of `window`.
pub fn context_length_error(window: u64, prompt: u64) -> Value {
    error_body_param(
        &format!(
            "This model's maximum context length is {window} tokens. However, your messages resulted in {prompt} \
             tokens. Please reduce the length of the messages."
        ),
        "invalid_request_error",
        Some("messages"),
        Some("context_length_exceeded"),
    )
}

/// `GET /v1/models` body.
pub fn models_body(models: &[String], owner: &str) -> Value {
    let data: Vec<Value> =
        models.iter().map(|m| json!({"id": m, "object": "model", "created": CREATED, "owned_by": owner})).collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {

    use super::*;

    fn reply(usage: UsageReport) -> Reply {
        Reply {
            id: "chatcmpl-mock-1".into(),
            model: "m1".into(),
            text: "Hello from mock.".into(),
            usage,
            extras: Extras::default(),
        }
    }

    fn counts(prompt: u64, completion: u64) -> UsageReport {
        UsageReport::Counts { prompt, completion, cached: None, reasoning: None }
    }

    fn parse_event(e: &str) -> Value {
        let data = e.strip_prefix("data: ").unwrap().strip_suffix("\n\n").unwrap();
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn rate_schedule() {
        let hits = |pct| (1..=20).filter(|&n| fires(n, pct)).collect::<Vec<u64>>();
        assert_eq!(hits(100), (1..=20).collect::<Vec<_>>());
        assert!(hits(0).is_empty());
        assert_eq!(hits(50), vec![2, 4, 6, 8, 10, 12, 14, 16, 18, 20]);
        assert_eq!(hits(25), vec![4, 8, 12, 16, 20]);
        assert_eq!(hits(10), vec![10, 20]);
        assert_eq!(hits(33), vec![4, 7, 10, 13, 16, 19]);
        assert!(!fires(0, 100));
    }

    #[test]
    fn counters_check_in_order_and_reset() {
        let mut c = FailureCounters::default();
        // reset 0, 503 50, 429 100, malformed 0, truncate 0, stall 0
        let rates = [0, 50, 100, 0, 0, 0];
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        assert_eq!(c.decide(rates), Some(Failure::Unavailable));
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        c.reset(Failure::Unavailable);
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        assert_eq!(c.decide(rates), Some(Failure::Unavailable));
        assert_eq!(c.decide([0; 6]), None);
        assert_eq!(c.decide([0, 0, 0, 0, 100, 0]), Some(Failure::Truncate));
        assert_eq!(c.decide([0, 0, 0, 0, 0, 100]), Some(Failure::Stall));
        assert_eq!(c.decide([100; 6]), Some(Failure::Reset));
    }

    #[test]
    fn failure_header() {
        assert_eq!(Failure::from_header("429"), Ok(Some(Failure::RateLimited)));
        assert_eq!(Failure::from_header(" Reset "), Ok(Some(Failure::Reset)));
        assert_eq!(Failure::from_header("503"), Ok(Some(Failure::Unavailable)));
        assert_eq!(Failure::from_header("malformed"), Ok(Some(Failure::Malformed)));
        assert_eq!(Failure::from_header("truncate"), Ok(Some(Failure::Truncate)));
        assert_eq!(Failure::from_header(""), Ok(None));
        assert_eq!(Failure::from_header("none"), Ok(None));
        assert_eq!(Failure::from_header("stall"), Ok(Some(Failure::Stall)));
        assert_eq!(Failure::from_header("STALL_MID_STREAM"), Ok(Some(Failure::StallMidStream)));
        assert_eq!(Failure::from_header("context_length"), Ok(Some(Failure::ContextLength)));
        for f in Failure::ALL {
            assert_eq!(Failure::from_header(f.as_str()), Ok(Some(f)));
        }
        assert_eq!(Failure::Stall.rate_key(), Some("rate_stall"));
        assert_eq!(Failure::ContextLength.rate_key(), None);
        assert!(Failure::from_header("500").unwrap_err().contains("`500`"));
    }

    #[test]
    fn usage_formula() {
        let body = json!({
            "model": "gpt",
            "messages": [
                {"role": "system", "content": "abcd"},                 // 4
                {"role": "user", "content": [
                    {"type": "text", "text": "héllo"},                  // 6
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "!"}                       // 1
                ]},
                {"role": "assistant", "content": null},
                {"role": "tool"}
            ],
            "prompt": "xy"                                               // 2
        });
        assert_eq!(prompt_bytes(&body), 13);
        assert_eq!(prompt_tokens(13), 4);
        assert_eq!(prompt_tokens(12), 3);
        assert_eq!(prompt_tokens(0), 0);
        assert_eq!(prompt_bytes(&json!({"prompt": ["ab", "c", 5]})), 3);
        assert_eq!(prompt_bytes(&json!([1, 2])), 0);
        assert_eq!(completion_tokens("Hello from  mock.\n x"), 4);
        assert_eq!(completion_tokens("   "), 0);
    }

    #[test]
    fn chat_request_fields() {
        let r = ChatRequest::from_json(&json!({
            "model": "", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]
        }));
        assert_eq!(r.model.as_deref(), Some(""));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.prompt_bytes, 2);
        let r = ChatRequest::from_json(&json!({"model": 5, "stream": "yes"}));
        assert_eq!(r, ChatRequest::default());
    }

    #[test]
    fn completion_shape() {
        let body = completion_body(&reply(counts(3, 3)));
        assert_eq!(
            body.to_string(),
            r#"{"id":"chatcmpl-mock-1","object":"chat.completion","created":1730000000,"model":"m1","system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from mock."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}"#
        );
        let body = completion_body(&reply(UsageReport::Omitted));
        assert!(body.get("usage").is_none());
        let body = completion_body(&reply(UsageReport::Garbage));
        assert_eq!(body["usage"]["prompt_tokens"], "x");
        assert_eq!(body["usage"]["completion_tokens"], -3);
    }

    #[test]
    fn split_text_on_char_boundaries() {
        assert_eq!(split_text("abcdefgh", 4), vec!["ab", "cd", "ef", "gh"]);
        assert_eq!(split_text("abcde", 2), vec!["ab", "cde"]);
        assert_eq!(split_text("ab", 5), vec!["a", "b"]);
        assert_eq!(split_text("abc", 0), vec!["abc"]);
        assert!(split_text("", 3).is_empty());
        let text = "héllo wörld 🎉!";
        for n in 1..20 {
            let pieces = split_text(text, n);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.len() <= n);
        }
    }

    #[test]
    fn stream_with_usage() {
        let r = reply(counts(2, 3));
        let events = stream_events(&r, 4, true);
        assert_eq!(events.last().unwrap(), DONE_EVENT);
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| parse_event(e)).collect();
        assert_eq!(chunks.len(), 1 + 4 + 1 + 1);
        assert_eq!(
            events[0],
            "data: {\"id\":\"chatcmpl-mock-1\",\"object\":\"chat.completion.chunk\",\"created\":1730000000,\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n"
        );
        let text: String = chunks[1..5].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
        assert_eq!(text, r.text);
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
        let with_usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
        assert_eq!(with_usage.len(), 1);
        assert_eq!(with_usage[0]["choices"], json!([]));
        assert_eq!(with_usage[0]["usage"]["total_tokens"], 5);
        assert!(chunks.iter().all(|c| c.get("usage").is_some()));
    }

    #[test]
    fn stream_without_usage() {
        let events = stream_events(&reply(counts(1, 1)), 2, false);
        assert_eq!(events.len(), 1 + 2 + 1 + 1);
        for e in &events[..events.len() - 1] {
            assert!(parse_event(e).get("usage").is_none());
        }
        // include_usage asked but usage omitted: chunks keep "usage": null, no usage chunk.
        let events = stream_events(&reply(UsageReport::Omitted), 2, true);
        assert_eq!(events.len(), 5);
        assert!(parse_event(&events[1])["usage"].is_null());
    }

    #[test]
    fn malformed_bodies_do_not_parse() {
        assert!(serde_json::from_str::<Value>(&malformed_body("chatcmpl-mock-1")).is_err());
        let events = malformed_stream_events(&reply(UsageReport::Omitted));
        assert!(serde_json::from_str::<Value>(events[1].strip_prefix("data: ").unwrap().trim_end()).is_err());
        assert_eq!(events[2], DONE_EVENT);
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            rate_limit_error("gpt-4o", "a").to_string(),
            r#"{"error":{"message":"Rate limit reached for gpt-4o (mock a)","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#
        );
        assert_eq!(unavailable_error("a")["error"]["type"], "server_error");
        assert_eq!(invalid_json_error("x")["error"]["code"], "invalid_json");
        let models = models_body(&["a".into(), "b".into()], "p");
        assert_eq!(models["data"][1]["id"], "b");
        assert_eq!(models["data"][0]["owned_by"], "p");
    }
    #[test]
    fn usage_details_only_when_configured() {
        assert_eq!(
            counts(1, 2).to_json().unwrap(),
            json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        );
        let usage = UsageReport::Counts { prompt: 10, completion: 5, cached: Some(4), reasoning: None };
        assert_eq!(
            usage.to_json().unwrap().to_string(),
            r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#
        );
        let usage = UsageReport::Counts { prompt: 1, completion: 5, cached: None, reasoning: Some(3) };
        let usage = usage.to_json().unwrap();
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 3);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn generated_words() {
        assert_eq!(words_text(0), "");
        assert_eq!(words_text(3), "w1 w2 w3");
        let long = words_text(2000);
        assert_eq!(completion_tokens(&long), 2000);
        assert!(long.ends_with(" w2000"));
        assert_eq!(completion_tokens(&words_text(MAX_WORDS + 5)), MAX_WORDS);
    }

    #[test]
    fn word_pieces_keep_leading_space() {
        assert_eq!(word_pieces("Hello from mock."), vec!["Hello", " from", " mock."]);
        assert_eq!(word_pieces("  a  b "), vec!["  a", "  b", " "]);
        assert_eq!(word_pieces("héllo wörld"), vec!["héllo", " wörld"]);
        assert!(word_pieces("").is_empty());
        for text in ["a b c", " x", "x ", "\tq\nr"] {
            assert_eq!(word_pieces(text).concat(), text);
        }
    }

    #[test]
    fn logprobs_entries() {
        let entries = token_logprobs("Hi yo", 3);
        assert_eq!(
            Value::Array(entries).to_string(),
            r#"[{"token":"Hi","logprob":-0.1,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.1,"bytes":[72,105]},{"token":"HI","logprob":-1.1,"bytes":[72,73]},{"token":"Hi","logprob":-2.1,"bytes":[72,105]}]},{"token":" yo","logprob":-0.1,"bytes":[32,121,111],"top_logprobs":[{"token":" yo","logprob":-0.1,"bytes":[32,121,111]},{"token":" YO","logprob":-1.1,"bytes":[32,89,79]},{"token":" yo","logprob":-2.1,"bytes":[32,121,111]}]}]"#
        );
        assert_eq!(token_logprobs("é", 0)[0]["bytes"], json!([195, 169]));
        let r = ChatRequest::from_json(&json!({"logprobs": true, "top_logprobs": 2}));
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(ChatRequest::from_json(&json!({"logprobs": true})).logprobs, Some(0));
        assert_eq!(ChatRequest::from_json(&json!({"logprobs": false, "top_logprobs": 2})).logprobs, None);
        assert_eq!(ChatRequest::from_json(&json!({"logprobs": 3})).logprobs, Some(3));
        assert_eq!(ChatRequest::from_json(&json!({"logprobs": true, "top_logprobs": 99})).logprobs, Some(20));
    }

    fn extras_reply() -> Reply {
        let mut r = reply(counts(1, 1));
        r.extras = Extras {
            reasoning: Some("think hard".into()),
            refusal: None,
            tool_args: Some(r#"{"q":"x"}"#.into()),
            audio_transcript: Some("spoken words".into()),
            logprobs: Some(1),
        };
        r
    }

    #[test]
    fn extra_channels_in_json() {
        let r = extras_reply();
        assert_eq!(r.extras.output_words(&r.text), 3 + 2 + 1 + 2);
        let body = completion_body(&r);
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        let message = &choice["message"];
        assert_eq!(message["content"], "Hello from mock.");
        assert_eq!(message["reasoning_content"], "think hard");
        assert_eq!(
            message["tool_calls"],
            json!([{"id": "call_mock_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}])
        );
        assert_eq!(
            message["audio"],
            json!({"id": "audio_mock_1", "data": "", "expires_at": 1730003600, "transcript": "spoken words"})
        );
        assert!(message.get("refusal").is_none());
        let tokens: Vec<&str> =
            choice["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap()).collect();
        assert_eq!(tokens, vec!["Hello", " from", " mock."]);
        assert!(choice["logprobs"]["refusal"].is_null());

        let mut refused = reply(counts(1, 1));
        refused.extras = Extras { refusal: Some("I can't help".into()), logprobs: Some(0), ..Extras::default() };
        assert_eq!(refused.extras.output_words(&refused.text), 3);
        let body = completion_body(&refused);
        assert!(body["choices"][0]["message"]["content"].is_null());
        assert_eq!(body["choices"][0]["message"]["refusal"], "I can't help");
        assert!(body["choices"][0]["logprobs"]["content"].is_null());
        assert_eq!(body["choices"][0]["logprobs"]["refusal"][1]["token"], " can't");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn extra_channels_in_stream() {
        let r = extras_reply();
        let events = stream_events(&r, 2, false);
        assert_eq!(events.last().unwrap(), DONE_EVENT);
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| parse_event(e)).collect();
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        // role, 2 reasoning, 2 content, 2 transcript, tool head, 2 tool args, finish
        assert_eq!(chunks.len(), 1 + 2 + 2 + 2 + 1 + 2 + 1);
        assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
        let joined = |key: &str| -> String { deltas.iter().filter_map(|d| d[key].as_str()).collect() };
        assert_eq!(joined("reasoning_content"), "think hard");
        assert_eq!(joined("content"), "Hello from mock.");
        assert!(deltas[1].get("reasoning_content").is_some() && deltas[3].get("content").is_some());
        let transcript: String = deltas.iter().filter_map(|d| d["audio"]["transcript"].as_str()).collect();
        assert_eq!(transcript, "spoken words");
        assert_eq!(
            deltas[7],
            &json!({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}]})
        );
        let args: String =
            deltas[8..10].iter().map(|d| d["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).collect();
        assert_eq!(args, r#"{"q":"x"}"#);
        assert_eq!(chunks[10]["choices"][0]["finish_reason"], "tool_calls");
        // logprobs: on content chunks the piece's tokens, null elsewhere.
        for (i, c) in chunks.iter().enumerate() {
            let lp = &c["choices"][0]["logprobs"];
            assert!(c["choices"][0].get("logprobs").is_some());
            if i == 3 || i == 4 {
                let piece = c["choices"][0]["delta"]["content"].as_str().unwrap();
                let tokens: String =
                    lp["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap()).collect();
                assert_eq!(tokens, piece);
            } else {
                assert!(lp.is_null(), "chunk {i}");
            }
        }
        let mut refused = reply(counts(1, 1));
        refused.extras.refusal = Some("no way".into());
        let chunks: Vec<Value> = stream_events(&refused, 3, false).iter().take(4).map(|e| parse_event(e)).collect();
        let text: String = chunks[1..].iter().map(|c| c["choices"][0]["delta"]["refusal"].as_str().unwrap()).collect();
        assert_eq!(text, "no way");
        assert!(chunks[1]["choices"][0].get("logprobs").is_none());
    }

    #[test]
    fn text_completion_shapes() {
        let mut r = reply(counts(2, 3));
        r.id = "cmpl-mock-4".into();
        assert_eq!(
            text_completion_body(&r).to_string(),
            r#"{"id":"cmpl-mock-4","object":"text_completion","created":1730000000,"model":"m1","choices":[{"index":0,"text":"Hello from mock.","finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#
        );
        let events = text_completion_events(&r, 2, true);
        assert_eq!(events.len(), 2 + 1 + 1 + 1);
        let chunks: Vec<Value> = events[..4].iter().map(|e| parse_event(e)).collect();
        let text: String = chunks[..2].iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(text, "Hello from mock.");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[2]["choices"][0]["text"], "");
        assert!(chunks[0]["usage"].is_null() && chunks[0].get("usage").is_some());
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["total_tokens"], 5);
        assert_eq!(events[4], DONE_EVENT);
        assert_eq!(text_completion_events(&r, 2, false).len(), 4);
        let malformed = malformed_text_completion_events(&r);
        assert!(serde_json::from_str::<Value>(malformed[1].strip_prefix("data: ").unwrap().trim_end()).is_err());
        assert_eq!(malformed[2], DONE_EVENT);
    }

    #[test]
    fn legacy_logprobs_shape() {
        let lp = legacy_logprobs("Hi yo", 0, 2);
        assert_eq!(
            lp.to_string(),
            r#"{"tokens":["Hi"," yo"],"token_logprobs":[-0.1,-0.1],"top_logprobs":[{"Hi":-0.1,"HI":-1.1},{" yo":-0.1," YO":-1.1}],"text_offset":[0,2]}"#
        );
        assert_eq!(legacy_logprobs("é b", 7, 0)["text_offset"], json!([7, 8]));
        let mut r = reply(counts(1, 1));
        r.extras.logprobs = Some(1);
        let body = text_completion_body(&r);
        assert_eq!(body["choices"][0]["logprobs"]["tokens"], json!(["Hello", " from", " mock."]));
        let events = text_completion_events(&r, 2, false);
        let second = parse_event(&events[1]);
        let piece = second["choices"][0]["text"].as_str().unwrap();
        assert_eq!(second["choices"][0]["logprobs"]["text_offset"][0], "Hello from mock.".find(piece).unwrap());
    }

    #[test]
    fn context_error_shape() {
        assert_eq!(
            context_length_error(100, 250).to_string(),
            r#"{"error":{"message":"This model's maximum context length is 100 tokens. However, your messages resulted in 250 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
        );
    }
}
