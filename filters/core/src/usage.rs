//! Token usage: one normalized record, read from a response body or a stream in any format
//! `crate::api` knows, or estimated from sizes.
//!
//! Names differ per API: chat uses `prompt_tokens` / `completion_tokens` with
//! `prompt_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens`;
//! the Responses API `input_tokens` / `output_tokens` with `input_tokens_details` /
//! `output_tokens_details`; Anthropic reports `input_tokens` *without* cached tokens, which
//! come separately as `cache_read_input_tokens` and `cache_creation_input_tokens`, and in a
//! stream splits usage across `message_start` (input) and `message_delta` (cumulative
//! output). The record normalizes all of them: `input` is every input token (cached ones
//! included), `cached_input` the part read from a cache.
//!
//! A usage object with a count that is not a non-negative integer is treated as absent
//! rather than trusted partially.

use crate::api::Api;
use serde_json::Value;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// Input (prompt) tokens, cached and cache-write tokens included.
    pub input: u64,
    /// Output (completion) tokens, reasoning tokens included.
    pub output: u64,
    /// Total: as reported, or `input + output`.
    pub total: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic).
    pub cache_write_input: u64,
    /// Output tokens spent on reasoning.
    pub reasoning: u64,
    /// Audio input tokens.
    pub audio_input: u64,
    /// Audio output tokens.
    pub audio_output: u64,
    /// `true` when the counts are an estimate from byte sizes, not the provider's.
    pub estimated: bool,
}

impl TokenUsage {
    /// Reported counts (details zero).
    pub fn reported(input: u64, output: u64) -> Self {
        Self { input, output, total: input.saturating_add(output), ..Self::default() }
    }

    /// Compact text for filter state (`sluice.usage`): `in,out,total,cached,cache_write,reasoning,audio_in,audio_out,est`.
    pub fn encode(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{}",
            self.input,
            self.output,
            self.total,
            self.cached_input,
            self.cache_write_input,
            self.reasoning,
            self.audio_input,
            self.audio_output,
            u8::from(self.estimated)
        )
    }

    /// Parse [`TokenUsage::encode`].
    pub fn decode(s: &str) -> Option<Self> {
        let n: Vec<u64> = s.split(',').map(|x| x.trim().parse().ok()).collect::<Option<Vec<u64>>>()?;
        let [input, output, total, cached_input, cache_write_input, reasoning, audio_input, audio_output, est] =
            n.as_slice()
        else {
            return None;
        };
        Some(Self {
            input: *input,
            output: *output,
            total: *total,
            cached_input: *cached_input,
            cache_write_input: *cache_write_input,
            reasoning: *reasoning,
            audio_input: *audio_input,
            audio_output: *audio_output,
            estimated: *est != 0,
        })
    }
}

/// A count: absent/null → `Ok(None)`; not a non-negative integer → `Err`.
fn count(obj: &serde_json::Map<String, Value>, names: &[&str]) -> Result<Option<u64>, ()> {
    match names.iter().find_map(|name| obj.get(*name).filter(|v| !v.is_null())) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(()),
    }
}

fn detail(obj: &serde_json::Map<String, Value>, parent: &[&str], name: &str) -> u64 {
    parent.iter().find_map(|p| obj.get(*p)).and_then(|d| d.get(name)).and_then(Value::as_u64).unwrap_or(0)
}

/// Usage from a `usage` object of any format. At least one of input or output must be
/// present; a missing one counts 0; a malformed count makes the whole object `None`.
pub fn usage_from_value(v: &Value) -> Option<TokenUsage> {
    let u = v.as_object()?;
    let input = count(u, &["prompt_tokens", "input_tokens"]).ok()?;
    let output = count(u, &["completion_tokens", "output_tokens"]).ok()?;
    let total = count(u, &["total_tokens"]).ok()?;
    let cache_read = count(u, &["cache_read_input_tokens"]).ok()?;
    let cache_write = count(u, &["cache_creation_input_tokens"]).ok()?;
    if input.is_none() && output.is_none() {
        return None;
    }
    let anthropic = cache_read.is_some() || cache_write.is_some();
    let base_input = input.unwrap_or(0);
    let output = output.unwrap_or(0);
    let (input, cached) = if anthropic {
        let read = cache_read.unwrap_or(0);
        let write = cache_write.unwrap_or(0);
        (base_input.saturating_add(read).saturating_add(write), read)
    } else {
        (base_input, detail(u, &["prompt_tokens_details", "input_tokens_details"], "cached_tokens"))
    };
    Some(TokenUsage {
        input,
        output,
        total: total.filter(|_| !anthropic).unwrap_or_else(|| input.saturating_add(output)),
        cached_input: cached,
        cache_write_input: cache_write.unwrap_or(0),
        reasoning: detail(u, &["completion_tokens_details", "output_tokens_details"], "reasoning_tokens"),
        audio_input: detail(u, &["prompt_tokens_details", "input_tokens_details"], "audio_tokens"),
        audio_output: detail(u, &["completion_tokens_details", "output_tokens_details"], "audio_tokens"),
        estimated: false,
    })
}

/// Usage of a complete JSON response body (`usage`, or Responses' `response.usage`).
pub fn usage_from_body(body: &Value) -> Option<TokenUsage> {
    body.get("usage").or_else(|| body.pointer("/response/usage")).and_then(usage_from_value)
}

/// Usage of a complete response body's bytes.
pub fn usage_from_json(body: &[u8]) -> Option<TokenUsage> {
    usage_from_body(&serde_json::from_slice::<Value>(body).ok()?)
}

/// What one stream event was, as far as usage accounting cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// An event carrying generated output.
    Content,
    /// A chat chunk whose choices are empty and whose usage is set: the `include_usage` chunk.
    UsageOnly,
    /// The end of the stream (`[DONE]`, `response.completed`, `message_stop`).
    Done,
    /// Anything else.
    Other,
}

/// Usage accounting for one streaming response, in the stream's format.
#[derive(Debug, Clone)]
pub struct StreamUsage {
    api: Api,
    usage: Option<TokenUsage>,
    /// Messages: input from `message_start`, output from `message_delta`.
    split: Option<(TokenUsage, Option<u64>)>,
    model: Option<String>,
    output_bytes: usize,
    done: bool,
    saw_invalid: bool,
    /// When set, generated text is collected (cache store), up to this many bytes.
    collect: Option<usize>,
    text: String,
}

impl Default for StreamUsage {
    fn default() -> Self {
        Self::new(Api::Chat)
    }
}

fn delta_text_bytes(api: Api, data: &Value, text: Option<&mut String>) -> usize {
    let mut copy = data.clone();
    let mut n: usize = 0;
    let mut out = text;
    crate::api::visit_stream_event(api, None, &mut copy, &mut |p| {
        if let crate::api::Piece::Delta(ch, t) = p {
            n = n.saturating_add(t.len());
            if let Some(o) = out.as_deref_mut() {
                if ch.field == "content" || ch.field == "text" || ch.field.starts_with("response.output_text") {
                    o.push_str(t);
                }
            }
        }
    });
    n
}

impl StreamUsage {
    /// Nothing observed yet, for a stream of `api`.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            usage: None,
            split: None,
            model: None,
            output_bytes: 0,
            done: false,
            saw_invalid: false,
            collect: None,
            text: String::new(),
        }
    }

    /// Also collect the generated text (up to `max` bytes).
    pub fn collect_text(&mut self, max: usize) {
        self.collect = Some(max);
    }

    /// The collected text, when it was collected and fits.
    pub fn text(&self) -> Option<&str> {
        match self.collect {
            Some(max) if self.text.len() <= max => Some(&self.text),
            _ => None,
        }
    }

    /// Account for one event: `data` is its parsed JSON (`None`: not JSON), `raw_done` the
    /// `[DONE]` sentinel. The last valid usage wins; a malformed one is ignored.
    pub fn observe(&mut self, data: Option<&Value>, raw_done: bool) -> Observed {
        if raw_done {
            self.done = true;
            return Observed::Done;
        }
        let Some(data) = data.filter(|d| d.is_object()) else { return Observed::Other };
        if self.model.is_none() {
            self.model = crate::api::response_model(data).map(str::to_string);
        }
        let collecting = self.collect.is_some_and(|max| self.text.len() <= max);
        let n = delta_text_bytes(self.api, data, if collecting { Some(&mut self.text) } else { None });
        self.output_bytes = self.output_bytes.saturating_add(n);
        match self.api {
            Api::Messages => self.observe_messages(data, n),
            Api::Responses => self.observe_responses(data, n),
            _ => self.observe_chat(data, n),
        }
    }

    fn note_usage(&mut self, v: Option<&Value>) -> bool {
        let Some(v) = v.filter(|v| !v.is_null()) else { return false };
        match usage_from_value(v) {
            Some(u) => {
                self.usage = Some(u);
                true
            }
            None => {
                self.saw_invalid = true;
                false
            }
        }
    }

    fn observe_chat(&mut self, data: &Value, n: usize) -> Observed {
        let has_usage = self.note_usage(data.get("usage"));
        let choices = data.get("choices").and_then(Value::as_array);
        match choices {
            Some(c) if !c.is_empty() => Observed::Content,
            _ if has_usage || data.get("usage").is_some_and(|u| !u.is_null()) => Observed::UsageOnly,
            _ if n > 0 => Observed::Content,
            _ => Observed::Other,
        }
    }

    fn observe_responses(&mut self, data: &Value, n: usize) -> Observed {
        let kind = data.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.note_usage(data.pointer("/response/usage"));
                self.done = true;
                Observed::Done
            }
            _ if n > 0 => Observed::Content,
            _ => Observed::Other,
        }
    }

    fn observe_messages(&mut self, data: &Value, n: usize) -> Observed {
        let kind = data.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "message_start" => {
                if let Some(u) = data.pointer("/message/usage").and_then(usage_from_value) {
                    self.split = Some((u, None));
                }
                Observed::Other
            }
            "message_delta" => {
                let usage = data.get("usage");
                let out = usage.and_then(|u| u.get("output_tokens")).and_then(Value::as_u64);
                let (mut base, _) = self.split.unwrap_or_default();
                // message_delta may repeat input counts (newer API versions): take them.
                if let Some(u) = usage.and_then(usage_from_value) {
                    if u.input > 0 {
                        base.input = u.input;
                        base.cached_input = u.cached_input;
                        base.cache_write_input = u.cache_write_input;
                    }
                }
                self.split = Some((base, out.or(self.split.and_then(|s| s.1))));
                if let Some((b, o)) = self.split {
                    let output = o.unwrap_or(b.output);
                    self.usage = Some(TokenUsage { output, total: b.input.saturating_add(output), ..b });
                }
                Observed::Other
            }
            "message_stop" => {
                self.done = true;
                Observed::Done
            }
            _ if n > 0 => Observed::Content,
            _ => Observed::Other,
        }
    }

    /// The provider's usage, if seen.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage.or_else(|| {
            // Messages stream cut before message_delta: input is known, output estimated later.
            self.split.map(|(b, _)| b)
        })
    }

    /// Whether the provider reported complete usage (not just Messages' input half).
    pub fn complete_usage(&self) -> bool {
        self.usage.is_some()
    }

    /// The provider's usage if seen, else an estimate from `prompt_bytes` and the output seen.
    pub fn usage_or_estimate(&self, prompt_bytes: usize) -> TokenUsage {
        match (self.usage, self.split) {
            (Some(u), _) => u,
            (None, Some((b, _))) => {
                let out = estimate_tokens_from_bytes(self.output_bytes);
                TokenUsage { output: out, total: b.input.saturating_add(out), estimated: true, ..b }
            }
            (None, None) => estimate_usage(prompt_bytes, self.output_bytes),
        }
    }

    /// The model named by the stream.
    pub fn response_model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// UTF-8 bytes of generated text seen so far.
    pub fn output_bytes(&self) -> usize {
        self.output_bytes
    }

    /// True once the end of the stream was seen.
    pub fn saw_done(&self) -> bool {
        self.done
    }

    /// True when a usage object was present but malformed.
    pub fn saw_invalid_usage(&self) -> bool {
        self.saw_invalid
    }
}

/// AN ESTIMATE of tokens for `bytes` of UTF-8 text: `ceil(bytes / 4)`, the usual rule of
/// thumb for English with GPT tokenizers. Use it only when the provider reports no usage.
pub fn estimate_tokens_from_bytes(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX).div_ceil(4)
}

/// Estimated usage from prompt and output sizes in bytes (`estimated = true`).
pub fn estimate_usage(prompt_bytes: usize, output_bytes: usize) -> TokenUsage {
    let input = estimate_tokens_from_bytes(prompt_bytes);
    let output = estimate_tokens_from_bytes(output_bytes);
    TokenUsage { input, output, total: input.saturating_add(output), estimated: true, ..TokenUsage::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn real(input: u64, output: u64, total: u64) -> Option<TokenUsage> {
        Some(TokenUsage { input, output, total, ..TokenUsage::default() })
    }

    #[test]
    fn usage_from_value_table() {
        let cases = [
            (json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}), real(9, 12, 21)),
            (json!({"prompt_tokens": 9, "completion_tokens": 12}), real(9, 12, 21)),
            (json!({"input_tokens": 5, "output_tokens": 7}), real(5, 7, 12)),
            (json!({"prompt_tokens": 4, "total_tokens": 4}), real(4, 0, 4)),
            (json!({"output_tokens": 3}), real(0, 3, 3)),
            (json!({"prompt_tokens": null, "input_tokens": 2, "output_tokens": 1}), real(2, 1, 3)),
            (json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}), real(0, 0, 0)),
            (json!({"prompt_tokens": u64::MAX, "completion_tokens": 1}), real(u64::MAX, 1, u64::MAX)),
            (json!({}), None),
            (json!({"total_tokens": 5}), None),
            (json!({"prompt_tokens": -1, "completion_tokens": 2}), None),
            (json!({"prompt_tokens": 1.5, "completion_tokens": 2}), None),
            (json!({"prompt_tokens": "1", "completion_tokens": 2}), None),
            (json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": -3}), None),
            (json!(null), None),
            (json!([{"prompt_tokens": 1}]), None),
        ];
        for (value, want) in cases {
            assert_eq!(usage_from_value(&value), want, "{value}");
        }
    }

    #[test]
    fn details_in_every_format() {
        let chat = json!({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 40, "audio_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 20, "audio_tokens": 2}});
        let u = usage_from_value(&chat).unwrap();
        assert_eq!(
            (u.input, u.output, u.cached_input, u.reasoning, u.audio_input, u.audio_output),
            (100, 50, 40, 20, 3, 2)
        );
        let resp = json!({"input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
            "input_tokens_details": {"cached_tokens": 4}, "output_tokens_details": {"reasoning_tokens": 2}});
        let u = usage_from_value(&resp).unwrap();
        assert_eq!((u.input, u.cached_input, u.reasoning, u.total), (10, 4, 2, 15));
        let anth = json!({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 2});
        let u = usage_from_value(&anth).unwrap();
        assert_eq!((u.input, u.cached_input, u.cache_write_input, u.total), (42, 30, 2, 47));
        assert_eq!(TokenUsage::decode(&u.encode()), Some(u));
        assert_eq!(TokenUsage::decode("1,2"), None);
    }

    fn feed(s: &mut StreamUsage, events: &[Value]) {
        for e in events {
            s.observe(Some(e), false);
        }
    }

    #[test]
    fn chat_stream_with_include_usage() {
        let mut s = StreamUsage::new(Api::Chat);
        s.collect_text(100);
        assert_eq!(
            s.observe(Some(&json!({"model": "gpt-4o-mini", "choices": [{"delta": {"content": "Héllo"}}]})), false),
            Observed::Content
        );
        s.observe(Some(&json!({"choices": [{"delta": {"reasoning_content": "hm"}}]})), false);
        assert_eq!(
            s.observe(Some(&json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})), false),
            Observed::UsageOnly
        );
        assert_eq!(s.observe(None, true), Observed::Done);
        assert_eq!(s.usage(), real(9, 3, 12));
        assert_eq!(s.response_model(), Some("gpt-4o-mini"));
        assert_eq!(s.output_bytes(), "Héllo".len() + 2);
        assert_eq!(s.text(), Some("Héllo"));
    }

    #[test]
    fn stream_without_usage_estimates_from_output() {
        let mut s = StreamUsage::new(Api::Chat);
        feed(&mut s, &[json!({"choices": [{"delta": {"content": "abcdefgh"}}]})]);
        assert_eq!(s.usage(), None);
        assert_eq!(
            s.usage_or_estimate(10),
            TokenUsage { input: 3, output: 2, total: 5, estimated: true, ..TokenUsage::default() }
        );
    }

    #[test]
    fn responses_stream_usage() {
        let mut s = StreamUsage::new(Api::Responses);
        feed(
            &mut s,
            &[
                json!({"type": "response.created", "response": {"model": "gpt-5", "usage": null}}),
                json!({"type": "response.output_text.delta", "delta": "abcd"}),
            ],
        );
        let done = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}}});
        assert_eq!(s.observe(Some(&done), false), Observed::Done);
        assert_eq!(s.usage(), real(7, 2, 9));
        assert_eq!(s.response_model(), Some("gpt-5"));
        assert_eq!(s.output_bytes(), 4);
    }

    #[test]
    fn messages_stream_usage_is_split() {
        let mut s = StreamUsage::new(Api::Messages);
        feed(
            &mut s,
            &[
                json!({"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 5}}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}}),
            ],
        );
        // Cut before message_delta: input known, output estimated.
        let est = s.usage_or_estimate(0);
        assert_eq!((est.input, est.output, est.estimated), (25, 2, true));
        feed(
            &mut s,
            &[json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}})],
        );
        assert_eq!(s.observe(Some(&json!({"type": "message_stop"})), false), Observed::Done);
        let u = s.usage().unwrap();
        assert_eq!((u.input, u.output, u.total, u.cached_input, u.estimated), (25, 15, 40, 5, false));
    }

    #[test]
    fn malformed_usage_is_ignored() {
        let mut s = StreamUsage::new(Api::Chat);
        feed(&mut s, &[json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}})]);
        feed(&mut s, &[json!({"choices": [], "usage": {"prompt_tokens": -5}})]);
        assert_eq!(s.usage(), real(5, 6, 11));
        assert!(s.saw_invalid_usage());
    }

    #[test]
    fn estimates() {
        for (bytes, want) in [(0, 0), (1, 1), (4, 1), (5, 2), (4001, 1001)] {
            assert_eq!(estimate_tokens_from_bytes(bytes), want, "{bytes}");
        }
        let huge = estimate_usage(usize::MAX, usize::MAX);
        assert_eq!(huge.total, huge.input + huge.output);
    }
}
