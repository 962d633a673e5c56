//! What the mock provider answers: OpenAI-shaped completion and stream
//! bodies, the deterministic usage formula, error bodies and the
//! deterministic failure schedule. No I/O here.

use serde_json::{json, Map, Value};

/// `created` timestamp used in every object (fixed so outputs are stable).
pub const CREATED: u64 = 1_730_000_000;

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
}

impl Failure {
    /// The order in which the rate-based failures are checked.
    pub const CHECK_ORDER: [Failure; 5] =
        [Failure::Reset, Failure::Unavailable, Failure::RateLimited, Failure::Malformed, Failure::Truncate];

    /// Name used in `x-mock-fail`, in the log's `failure` field and in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Reset => "reset",
            Failure::Unavailable => "503",
            Failure::RateLimited => "429",
            Failure::Malformed => "malformed",
            Failure::Truncate => "truncate",
        }
    }

    /// Parses an `x-mock-fail` header value; empty or `none` means no failure.
    pub fn from_header(value: &str) -> Result<Option<Failure>, String> {
        let value = value.trim().to_ascii_lowercase();
        if value.is_empty() || value == "none" {
            return Ok(None);
        }
        Failure::CHECK_ORDER.into_iter().find(|f| f.as_str() == value).map(Some).ok_or_else(|| {
            format!("unknown x-mock-fail value `{value}` (expected 429, 503, reset, malformed or truncate)")
        })
    }

    /// The settings key holding this failure's rate.
    pub fn rate_key(self) -> &'static str {
        match self {
            Failure::Reset => "rate_reset",
            Failure::Unavailable => "rate_503",
            Failure::RateLimited => "rate_429",
            Failure::Malformed => "rate_malformed",
            Failure::Truncate => "rate_truncate",
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
    counts: [u64; 5],
}

impl FailureCounters {
    /// Counts one chat-completions request against every kind and returns the
    /// first kind (in check order) whose schedule fires. `rates` is in
    /// [`Failure::CHECK_ORDER`].
    pub fn decide(&mut self, rates: [u32; 5]) -> Option<Failure> {
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
}

impl ChatRequest {
    pub fn from_json(body: &Value) -> Self {
        ChatRequest {
            model: body.get("model").and_then(Value::as_str).map(str::to_string),
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: body.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool)
                == Some(true),
            prompt_bytes: prompt_bytes(body),
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
        .map(|messages| {
            messages
                .iter()
                .map(|m| match m.get("content") {
                    Some(Value::String(s)) => s.len(),
                    Some(Value::Array(parts)) => {
                        parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(str::len).sum()
                    }
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0);
    let prompt: usize = match body.get("prompt") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    messages + prompt
}

/// `ceil(bytes / 4)`.
pub fn prompt_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Number of whitespace-separated words.
pub fn completion_tokens(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
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
    },
}

impl UsageReport {
    pub fn to_json(self) -> Option<Value> {
        match self {
            UsageReport::Omitted => None,
            UsageReport::Garbage => Some(json!({
                "prompt_tokens": "x",
                "completion_tokens": -3,
                "total_tokens": "lots",
            })),
            UsageReport::Counts { prompt, completion } => Some(json!({
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt.saturating_add(completion),
            })),
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
}

/// Non-streaming `chat.completion` object.
pub fn completion_body(reply: &Reply) -> Value {
    let mut body = json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": CREATED,
        "model": reply.model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "logprobs": null,
            "finish_reason": "stop",
        }],
    });
    if let (Some(usage), Some(obj)) = (reply.usage.to_json(), body.as_object_mut()) {
        obj.insert("usage".into(), usage);
    }
    body
}

fn chunk(reply: &Reply, delta: Value, finish_reason: Value, include_usage: bool) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(reply.id));
    obj.insert("object".into(), json!("chat.completion.chunk"));
    obj.insert("created".into(), json!(CREATED));
    obj.insert("model".into(), json!(reply.model));
    obj.insert("choices".into(), json!([{"index": 0, "delta": delta, "finish_reason": finish_reason}]));
    if include_usage {
        obj.insert("usage".into(), Value::Null);
    }
    Value::Object(obj)
}

/// One SSE event carrying `data`.
pub fn sse(data: &str) -> String {
    format!("data: {data}\n\n")
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

/// The SSE events of a streamed answer, `[DONE]` included: a role chunk, the
/// content chunks, a finish chunk, then (only with `include_usage` and when
/// usage is not omitted) a usage chunk with empty `choices`.
pub fn stream_events(reply: &Reply, pieces: usize, include_usage: bool) -> Vec<String> {
    let mut events =
        vec![sse(&chunk(reply, json!({"role": "assistant", "content": ""}), Value::Null, include_usage).to_string())];
    for piece in split_text(&reply.text, pieces) {
        events.push(sse(&chunk(reply, json!({"content": piece}), Value::Null, include_usage).to_string()));
    }
    events.push(sse(&chunk(reply, json!({}), json!("stop"), include_usage).to_string()));
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
    let role = chunk(reply, json!({"role": "assistant", "content": ""}), Value::Null, false);
    vec![
        sse(&role.to_string()),
        sse(&format!(
            r#"{{"id":"{}","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"cont"#,
            reply.id
        )),
        DONE_EVENT.to_string(),
    ]
}

/// OpenAI-style error object.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
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

/// `GET /v1/models` body.
pub fn models_body(models: &[String], owner: &str) -> Value {
    let data: Vec<Value> =
        models.iter().map(|m| json!({"id": m, "object": "model", "created": CREATED, "owned_by": owner})).collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn reply(usage: UsageReport) -> Reply {
        Reply { id: "chatcmpl-mock-1".into(), model: "m1".into(), text: "Hello from mock.".into(), usage }
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
        // reset 0, 503 50, 429 100, malformed 0, truncate 0
        let rates = [0, 50, 100, 0, 0];
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        assert_eq!(c.decide(rates), Some(Failure::Unavailable));
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        c.reset(Failure::Unavailable);
        assert_eq!(c.decide(rates), Some(Failure::RateLimited));
        assert_eq!(c.decide(rates), Some(Failure::Unavailable));
        assert_eq!(c.decide([0; 5]), None);
        assert_eq!(c.decide([0, 0, 0, 0, 100]), Some(Failure::Truncate));
        assert_eq!(c.decide([100; 5]), Some(Failure::Reset));
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
        let body = completion_body(&reply(UsageReport::Counts { prompt: 3, completion: 3 }));
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
        let r = reply(UsageReport::Counts { prompt: 2, completion: 3 });
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
        let events = stream_events(&reply(UsageReport::Counts { prompt: 1, completion: 1 }), 2, false);
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
}
