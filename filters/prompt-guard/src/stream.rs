//! Masking an SSE chat stream without buffering it.
//!
//! Network chunks go through core's `SseParser`, so a partial event waits for its end.
//! For each choice, `delta.content` is appended to a pending text; everything except the
//! last `hold` bytes (the longest possible match) is masked and emitted in the same event,
//! so a match split across events or chunks is always seen whole. A match that straddles
//! the cut keeps the cut before it. Held text goes out with the choice's finish event, or
//! in an extra chunk before `[DONE]` / at the end of the stream. Events this filter does not
//! change are forwarded byte for byte.

use crate::rules::RuleSet;
use serde_json::{Map, Value};
use sluice_core::sse::{SseEvent, SseParser};
use std::collections::BTreeMap;

/// Per-stream masking state.
#[derive(Debug, Default)]
pub struct StreamMasker {
    parser: SseParser,
    /// Not-yet-emitted text per choice index.
    pending: BTreeMap<u64, String>,
    /// `id`, `object`, `created`, `model`… of the last chunk, for extra chunks.
    template: Map<String, Value>,
    hold: usize,
    /// Rules that masked something, sorted.
    pub applied: Vec<usize>,
    /// Rules that matched (even in shadow mode), sorted.
    pub matched: Vec<usize>,
    apply: bool,
}

fn add_sorted(v: &mut Vec<usize>, items: &[usize]) {
    for i in items {
        if let Err(pos) = v.binary_search(i) {
            v.insert(pos, *i);
        }
    }
}

fn floor_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl StreamMasker {
    /// A masker holding back `hold` bytes; `apply = false` only counts (shadow mode).
    pub fn new(hold: usize, apply: bool) -> Self {
        Self { hold, apply, ..Self::default() }
    }

    /// Feed one network chunk; returns the bytes to forward now.
    pub fn feed(&mut self, rules: &RuleSet, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        for ev in self.parser.feed(chunk) {
            self.event(rules, ev, &mut out);
        }
        out
    }

    /// End of stream: the rest, with held text in an extra chunk.
    pub fn finish(&mut self, rules: &RuleSet) -> Vec<u8> {
        let mut out = Vec::new();
        for ev in self.parser.finish() {
            self.event(rules, ev, &mut out);
        }
        self.flush_all(rules, &mut out);
        out.extend(self.parser.take_pending());
        out
    }

    /// Bytes of text currently held back.
    pub fn held_bytes(&self) -> usize {
        self.pending.values().map(String::len).sum()
    }

    fn event(&mut self, rules: &RuleSet, ev: SseEvent, out: &mut Vec<u8>) {
        if ev.is_done() {
            self.flush_all(rules, out);
            out.extend_from_slice(&ev.raw);
            return;
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(&ev.data) else {
            out.extend_from_slice(&ev.raw);
            return;
        };
        let changed = self.rewrite_chunk(rules, &mut obj);
        if !changed {
            out.extend_from_slice(&ev.raw);
            return;
        }
        let data = serde_json::to_string(&Value::Object(obj)).unwrap_or_default();
        let rewritten = SseEvent { data, event: ev.event, id: ev.id, retry: ev.retry, raw: Vec::new() };
        out.extend(rewritten.to_bytes());
    }

    /// Returns true when the chunk was changed.
    fn rewrite_chunk(&mut self, rules: &RuleSet, obj: &mut Map<String, Value>) -> bool {
        for key in ["id", "object", "created", "model", "system_fingerprint", "service_tier"] {
            if let Some(v) = obj.get(key) {
                self.template.insert(key.to_string(), v.clone());
            }
        }
        let Some(Value::Array(choices)) = obj.get_mut("choices") else { return false };
        let mut changed = false;
        for (pos, choice) in choices.iter_mut().enumerate() {
            let Value::Object(c) = choice else { continue };
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let finished = c.get("finish_reason").is_some_and(|f| !f.is_null());
            let Some(Value::Object(delta)) = c.get_mut("delta") else { continue };
            let incoming = match delta.get("content") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            let has_pending = self.pending.get(&index).is_some_and(|p| !p.is_empty());
            if incoming.is_none() && !(finished && has_pending) {
                continue;
            }
            let pending = self.pending.entry(index).or_default();
            if let Some(s) = &incoming {
                pending.push_str(s);
            }
            let text = std::mem::take(pending);
            let (emit, keep) = self.split(rules, text, finished);
            if let Some(p) = self.pending.get_mut(&index) {
                *p = keep;
            }
            if incoming.as_deref() != Some(emit.as_str()) {
                changed = true;
            }
            delta.insert("content".to_string(), Value::String(emit));
        }
        changed
    }

    /// Split pending text into (masked text to emit now, text to keep).
    fn split(&mut self, rules: &RuleSet, text: String, all: bool) -> (String, String) {
        let found = rules.scan(&text);
        add_sorted(&mut self.matched, &found.matched);
        let spans = if found.matched.is_empty() { Vec::new() } else { rules.mask_spans(&text, &found.matched) };
        let mut cut = if all { text.len() } else { floor_boundary(&text, text.len().saturating_sub(self.hold)) };
        for s in &spans {
            if s.start < cut && s.end > cut && !all {
                cut = s.start;
            }
        }
        let emit_spans: Vec<_> = spans.into_iter().filter(|s| s.end <= cut).collect();
        let (head, tail) = text.split_at(cut);
        let emitted = if self.apply && !emit_spans.is_empty() {
            let rs: Vec<usize> = emit_spans.iter().map(|s| s.rule).collect();
            add_sorted(&mut self.applied, &rs);
            rules.apply_spans(head, &emit_spans)
        } else {
            head.to_string()
        };
        (emitted, tail.to_string())
    }

    fn flush_all(&mut self, rules: &RuleSet, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut self.pending);
        for (index, text) in pending {
            if text.is_empty() {
                continue;
            }
            let (emit, _) = self.split(rules, text, true);
            let mut chunk = self.template.clone();
            chunk.entry("object").or_insert_with(|| Value::String("chat.completion.chunk".into()));
            chunk.insert(
                "choices".to_string(),
                serde_json::json!([{ "index": index, "delta": { "content": emit }, "finish_reason": null }]),
            );
            let data = serde_json::to_string(&Value::Object(chunk)).unwrap_or_default();
            out.extend(SseEvent::data_event(&data).raw);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rules() -> RuleSet {
        let c = Config::from_json(
            br#"{"policies":{"p":{"response_rules":[
                {"name":"mastercard","regex":"5[1-5][0-9]{2}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}","action":"mask"},
                {"builtin":"email","action":"mask","replacement":"[email]"}]}}}"#,
        )
        .unwrap();
        c.policies["p"].response.clone()
    }

    fn sse_stream(pieces: &[&str]) -> Vec<u8> {
        let mut s = String::new();
        let head = r#""id":"c1","object":"chat.completion.chunk","created":1,"model":"m""#;
        s.push_str(&format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"));
        for p in pieces {
            let c = serde_json::to_string(p).unwrap();
            s.push_str(&format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{c}}},\"finish_reason\":null}}]}}\n\n"));
        }
        s.push_str(&format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
        ));
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    /// Content of every event, in order, and whether [DONE] came last.
    fn contents(bytes: &[u8]) -> (Vec<String>, bool) {
        let mut p = SseParser::new();
        let evs = p.feed(bytes);
        let done_last = evs.last().is_some_and(SseEvent::is_done);
        let mut out = Vec::new();
        for e in evs {
            if e.is_done() {
                continue;
            }
            let v: Value = serde_json::from_str(&e.data).unwrap();
            for c in v["choices"].as_array().unwrap() {
                if let Some(s) = c["delta"]["content"].as_str() {
                    out.push(s.to_string());
                }
            }
        }
        (out, done_last)
    }

    fn run(stream: &[u8], chunk: usize) -> Vec<u8> {
        let rules = rules();
        let mut m = StreamMasker::new(rules.max_mask_len(), true);
        let mut out = Vec::new();
        for c in stream.chunks(chunk.max(1)) {
            out.extend(m.feed(&rules, c));
        }
        out.extend(m.finish(&rules));
        out
    }

    #[test]
    fn card_split_across_events_and_chunks_is_masked() {
        let text = "Try 5555 5555 5555 4444 or mail a@b.example now.";
        let pieces = ["Try 5555 55", "55 5555 44", "44 or mail a@b", ".example now."];
        let stream = sse_stream(&pieces);
        for chunk in [1, 2, 3, 7, 13, 64, 100_000] {
            let out = run(&stream, chunk);
            let (parts, done_last) = contents(&out);
            assert!(done_last, "chunk {chunk}");
            let joined: String = parts.concat();
            assert_eq!(joined, "Try XXXXXXXXXXXXXXXXXXX or mail [email] now.", "chunk {chunk}");
            for p in &parts {
                assert!(!p.chars().any(|c| c.is_ascii_digit()), "digit leaked in {p:?} (chunk {chunk})");
            }
            assert_ne!(text, joined);
        }
    }

    #[test]
    fn clean_stream_passes_byte_for_byte_except_hold_back() {
        let stream = sse_stream(&["Hello", " world"]);
        let out = run(&stream, 5);
        let (parts, _) = contents(&out);
        assert_eq!(parts.concat(), "Hello world");
        // Text longer than the hold-back flows without waiting for the end.
        let rules = rules();
        let mut m = StreamMasker::new(rules.max_mask_len(), true);
        let long = "a".repeat(500);
        let out = m.feed(&rules, &sse_stream(&[&long])[..]);
        let (parts, _) = contents(&out);
        assert!(parts.concat().len() >= 500 - rules.max_mask_len());
    }

    #[test]
    fn held_text_is_flushed_before_done_without_finish_event() {
        let s = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"card 5555555555554444\"}}]}\n\ndata: [DONE]\n\n";
        let out = run(s.as_bytes(), 4);
        let (parts, done_last) = contents(&out);
        assert!(done_last);
        assert_eq!(parts.concat(), "card XXXXXXXXXXXXXXXX");
    }

    #[test]
    fn non_json_and_usage_events_pass_unchanged() {
        let s = ": ping\n\ndata: not json\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let out = run(s.as_bytes(), 3);
        assert_eq!(out, s.as_bytes());
    }

    #[test]
    fn unterminated_stream_still_flushes() {
        let s =
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x 5555 5555 5555 4444\"}}]}\n\ndata: {\"partial";
        let out = run(s.as_bytes(), 5);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("x XXXXXXXXXXXXXXXXXXX"), "{text}");
        assert!(text.ends_with("data: {\"partial"));
        assert!(!text.contains("4444"));
    }

    #[test]
    fn shadow_counts_without_masking() {
        let rules = rules();
        let mut m = StreamMasker::new(rules.max_mask_len(), false);
        let stream = sse_stream(&["5555 5555 5555 4444"]);
        let mut out = m.feed(&rules, &stream);
        out.extend(m.finish(&rules));
        let (parts, _) = contents(&out);
        assert_eq!(parts.concat(), "5555 5555 5555 4444");
        assert_eq!(m.matched, vec![0]);
        assert!(m.applied.is_empty());
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let pieces = ["héllo wörld 🎉 ", "5555 5555 5555 4444 ", "ünïcödé"];
        let out = run(&sse_stream(&pieces), 1);
        let (parts, _) = contents(&out);
        assert_eq!(parts.concat(), "héllo wörld 🎉 XXXXXXXXXXXXXXXXXXX ünïcödé");
    }
}
