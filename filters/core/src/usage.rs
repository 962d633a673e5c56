//! Token usage: read from a response body or a stream's chunks, or estimated from sizes.
//!
//! Providers name the counts differently: OpenAI chat uses `prompt_tokens` /
//! `completion_tokens` / `total_tokens`; the Responses API and Anthropic use `input_tokens` /
//! `output_tokens`. Both are accepted. A usage object with a count that is not a non-negative
//! integer is treated as absent rather than trusted partially.

use crate::sse::SseEvent;
use serde_json::Value;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
    /// Total: as reported, or `input + output`.
    pub total: u64,
    /// `true` when the counts are an estimate from byte sizes, not the provider's.
    pub estimated: bool,
}

/// Usage from a complete (non-streaming) response body's top-level `usage` object.
/// `None` when the body is not JSON, has no usage, or the usage is malformed.
pub fn usage_from_json(body: &[u8]) -> Option<TokenUsage> {
    let value: Value = serde_json::from_slice(body).ok()?;
    usage_from_value(value.get("usage")?)
}

/// Usage from the `usage` object itself. At least one of the input or output counts must be
/// present; a missing one counts as 0, and a `null` count as missing. Any count that is not a
/// non-negative integer makes the whole object malformed (`None`).
pub fn usage_from_value(v: &Value) -> Option<TokenUsage> {
    let usage = v.as_object()?;
    let count = |names: &[&str]| -> Result<Option<u64>, ()> {
        match names.iter().find_map(|name| usage.get(*name).filter(|v| !v.is_null())) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(()),
        }
    };
    let input = count(&["prompt_tokens", "input_tokens"]).ok()?;
    let output = count(&["completion_tokens", "output_tokens"]).ok()?;
    let total = count(&["total_tokens"]).ok()?;
    if input.is_none() && output.is_none() {
        return None;
    }
    let input = input.unwrap_or(0);
    let output = output.unwrap_or(0);
    Some(TokenUsage { input, output, total: total.unwrap_or_else(|| input.saturating_add(output)), estimated: false })
}

/// What one stream event was, as far as usage accounting cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A chunk with at least one choice (content, tool-call or finish delta).
    Content,
    /// A chunk whose choices are empty and whose usage is set: the `include_usage` chunk.
    UsageOnly,
    /// The `[DONE]` sentinel.
    Done,
    /// Anything else (not JSON, an error event, a chunk without choices or usage, ...).
    Other,
}

/// Usage accounting for one streaming (SSE) chat-completion response.
#[derive(Debug, Clone, Default)]
pub struct StreamUsage {
    usage: Option<TokenUsage>,
    model: Option<String>,
    output_bytes: usize,
    done: bool,
}

impl StreamUsage {
    /// Nothing observed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Account for one event. The last valid `usage` seen wins; a `null` or malformed one is
    /// ignored.
    pub fn observe(&mut self, event: &SseEvent) -> Observed {
        if event.is_done() {
            self.done = true;
            return Observed::Done;
        }
        let Ok(Value::Object(chunk)) = serde_json::from_str::<Value>(&event.data) else {
            return Observed::Other;
        };
        if self.model.is_none() {
            if let Some(model) = chunk.get("model").and_then(Value::as_str) {
                self.model = Some(model.to_string());
            }
        }
        let usage = chunk.get("usage").and_then(usage_from_value);
        if usage.is_some() {
            self.usage = usage;
        }
        let choices = chunk.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            self.output_bytes = self.output_bytes.saturating_add(delta_text_len(choice.get("delta")));
        }
        match choices {
            Some(choices) if !choices.is_empty() => Observed::Content,
            _ if usage.is_some() => Observed::UsageOnly,
            _ => Observed::Other,
        }
    }

    /// The last valid usage seen, if any.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage
    }

    /// The provider's usage if seen, else an estimate from `prompt_bytes` and the output seen.
    pub fn usage_or_estimate(&self, prompt_bytes: usize) -> TokenUsage {
        self.usage.unwrap_or_else(|| estimate_usage(prompt_bytes, self.output_bytes))
    }

    /// The `model` of the first chunk that named one.
    pub fn response_model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// UTF-8 bytes (not characters) of generated text seen so far: delta `content`,
    /// `refusal`, `reasoning_content` and tool-call `arguments`. Input to
    /// [`estimate_usage`].
    pub fn output_chars(&self) -> usize {
        self.output_bytes
    }

    /// `true` once `[DONE]` was seen.
    pub fn saw_done(&self) -> bool {
        self.done
    }
}

/// Bytes of generated text in one choice's `delta`.
fn delta_text_len(delta: Option<&Value>) -> usize {
    let Some(delta) = delta else {
        return 0;
    };
    let text = ["content", "refusal", "reasoning_content"]
        .iter()
        .filter_map(|k| delta.get(*k).and_then(Value::as_str))
        .map(str::len)
        .fold(0, usize::saturating_add);
    let args = delta
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|call| call.get("function")?.get("arguments")?.as_str())
        .map(str::len)
        .fold(0, usize::saturating_add);
    text.saturating_add(args)
}

/// AN ESTIMATE of tokens for `bytes` of UTF-8 text: `ceil(bytes / 4)`, the usual rule of
/// thumb for English with GPT tokenizers. It can be far off for other languages, code or
/// binary-ish text; use it only when the provider reports no usage.
pub fn estimate_tokens_from_bytes(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX).div_ceil(4)
}

/// Estimated usage from prompt and output sizes in bytes (`estimated = true`).
pub fn estimate_usage(prompt_bytes: usize, output_bytes: usize) -> TokenUsage {
    let input = estimate_tokens_from_bytes(prompt_bytes);
    let output = estimate_tokens_from_bytes(output_bytes);
    TokenUsage { input, output, total: input.saturating_add(output), estimated: true }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    fn real(input: u64, output: u64, total: u64) -> Option<TokenUsage> {
        Some(TokenUsage { input, output, total, estimated: false })
    }

    fn chunk(v: Value) -> SseEvent {
        SseEvent::data_event(&v.to_string())
    }

    #[test]
    fn usage_from_value_table() {
        let cases = [
            (json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}), real(9, 12, 21)),
            (json!({"prompt_tokens": 9, "completion_tokens": 12}), real(9, 12, 21)),
            (json!({"input_tokens": 5, "output_tokens": 7}), real(5, 7, 12)),
            (
                json!({"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                    "input_tokens_details": {"cached_tokens": 0}}),
                real(5, 7, 12),
            ),
            (json!({"prompt_tokens": 4, "total_tokens": 4}), real(4, 0, 4)),
            (json!({"output_tokens": 3}), real(0, 3, 3)),
            (json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 10}), real(1, 2, 10)),
            (json!({"prompt_tokens": null, "input_tokens": 2, "output_tokens": 1}), real(2, 1, 3)),
            (json!({"prompt_tokens": 1, "completion_tokens": null}), real(1, 0, 1)),
            (json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}), real(0, 0, 0)),
            (json!({"prompt_tokens": u64::MAX, "completion_tokens": 1}), real(u64::MAX, 1, u64::MAX)),
            (json!({}), None),
            (json!({"total_tokens": 5}), None),
            (json!({"prompt_tokens": null, "completion_tokens": null}), None),
            (json!({"prompt_tokens": -1, "completion_tokens": 2}), None),
            (json!({"prompt_tokens": 1.5, "completion_tokens": 2}), None),
            (json!({"prompt_tokens": "1", "completion_tokens": 2}), None),
            (json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": -3}), None),
            (json!({"prompt_tokens": 1, "completion_tokens": [2]}), None),
            (json!(null), None),
            (json!(7), None),
            (json!([{"prompt_tokens": 1}]), None),
        ];
        for (value, want) in cases {
            assert_eq!(usage_from_value(&value), want, "{value}");
        }
    }

    #[test]
    fn usage_from_json_table() {
        let cases: &[(&[u8], Option<TokenUsage>)] = &[
            (
                br#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
                real(3, 4, 7),
            ),
            (br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}"#, real(10, 20, 30)),
            (br#"{"object":"response","usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}"#, real(1, 2, 3)),
            (br#"{"choices":[]}"#, None),
            (br#"{"usage":null}"#, None),
            (br#"{"usage":{"prompt_tokens":"many"}}"#, None),
            (br#"{"usage":{"prompt_tokens":3}"#, None),
            (b"", None),
            (b"\xff", None),
            (b"[1,2]", None),
            (br#"{"nested":{"usage":{"prompt_tokens":3}}}"#, None),
        ];
        for (body, want) in cases {
            assert_eq!(usage_from_json(body), *want, "{}", String::from_utf8_lossy(body));
        }
        let deep = "[".repeat(100_000);
        assert_eq!(usage_from_json(deep.as_bytes()), None);
    }

    #[test]
    fn stream_with_include_usage() {
        let mut s = StreamUsage::new();
        let events = [
            (
                chunk(
                    json!({"model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}], "usage": null}),
                ),
                Observed::Content,
            ),
            (
                chunk(
                    json!({"model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "delta": {"content": "Héllo"}, "finish_reason": null}], "usage": null}),
                ),
                Observed::Content,
            ),
            (
                chunk(
                    json!({"model": "other", "choices": [{"index": 0, "delta": {"content": " 世界"}, "finish_reason": null}]}),
                ),
                Observed::Content,
            ),
            (
                chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null})),
                Observed::Content,
            ),
            (
                chunk(
                    json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}),
                ),
                Observed::UsageOnly,
            ),
            (SseEvent::data_event("[DONE]"), Observed::Done),
        ];
        for (i, (event, want)) in events.iter().enumerate() {
            assert!(!s.saw_done());
            assert_eq!(s.observe(event), *want, "event {i}");
        }
        assert!(s.saw_done());
        assert_eq!(s.usage(), real(9, 3, 12));
        assert_eq!(s.response_model(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(s.output_chars(), "Héllo 世界".len());
        assert_eq!(s.usage_or_estimate(1000), real(9, 3, 12).unwrap());
    }

    #[test]
    fn stream_without_usage_estimates() {
        let mut s = StreamUsage::new();
        s.observe(&chunk(json!({"choices": [{"delta": {"content": "abcdefgh"}}]})));
        s.observe(&chunk(
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}}]}),
        ));
        s.observe(&chunk(json!({"choices": [{"delta": {"reasoning_content": "hm", "refusal": null}}]})));
        assert_eq!(s.usage(), None);
        assert_eq!(s.output_chars(), 8 + 4 + 2);
        assert!(!s.saw_done());
        assert_eq!(s.response_model(), None);
        assert_eq!(s.usage_or_estimate(10), TokenUsage { input: 3, output: 4, total: 7, estimated: true });
    }

    #[test]
    fn last_valid_usage_wins_and_malformed_is_ignored() {
        let mut s = StreamUsage::new();
        let cases = [
            (
                json!({"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
                Observed::Content,
                real(1, 1, 2),
            ),
            (
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}),
                Observed::UsageOnly,
                real(5, 6, 11),
            ),
            (
                json!({"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 6}}),
                Observed::Other,
                real(5, 6, 11),
            ),
            (json!({"choices": [], "usage": null}), Observed::Other, real(5, 6, 11)),
            (json!({"usage": {"input_tokens": 7, "output_tokens": 8}}), Observed::UsageOnly, real(7, 8, 15)),
            (json!({"choices": [], "usage": "lots"}), Observed::Other, real(7, 8, 15)),
        ];
        for (i, (v, observed, usage)) in cases.into_iter().enumerate() {
            assert_eq!(s.observe(&chunk(v)), observed, "case {i}");
            assert_eq!(s.usage(), usage, "case {i}");
        }
    }

    #[test]
    fn other_events() {
        let mut s = StreamUsage::new();
        for data in ["", "not json", "[1]", "{}", "{\"error\":{\"message\":\"x\"}}", "{\"choices\":\"x\"}", "[DONE"] {
            assert_eq!(s.observe(&SseEvent::data_event(data)), Observed::Other, "{data:?}");
        }
        assert_eq!(s.observe(&SseEvent::data_event("[DONE]")), Observed::Done);
        assert_eq!(s.usage(), None);
        assert_eq!(s.output_chars(), 0);
    }

    #[test]
    fn estimates() {
        for (bytes, want) in [
            (0, 0),
            (1, 1),
            (3, 1),
            (4, 1),
            (5, 2),
            (8, 2),
            (4001, 1001),
            (usize::MAX, u64::try_from(usize::MAX).unwrap().div_ceil(4)),
        ] {
            assert_eq!(estimate_tokens_from_bytes(bytes), want, "{bytes}");
        }
        assert_eq!(estimate_usage(0, 0), TokenUsage { input: 0, output: 0, total: 0, estimated: true });
        assert_eq!(estimate_usage(10, 9), TokenUsage { input: 3, output: 3, total: 6, estimated: true });
        let huge = estimate_usage(usize::MAX, usize::MAX);
        assert_eq!(huge.total, huge.input + huge.output);
    }
}
