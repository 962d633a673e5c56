//! Token log-probabilities in answers: the generated text again, one token at a time, so a
//! client that sends `"logprobs": true` could read a masked answer back token by token.
//!
//! Found by shape, wherever a `logprobs` key sits (chat `choices[].logprobs.content[]` and
//! `.refusal[]`, Responses `output[].content[].logprobs[]`, legacy completions
//! `choices[].logprobs.tokens[]`): core's text visitors skip `logprobs` on purpose, so this
//! is the only place that reads them.
//!
//! JSON answers are masked **exactly**: the tokens of one list are joined, the mask spans are
//! found in the joined text with the same rules, and mapped back onto the tokens — a token
//! that overlaps a span gets the masked characters (a `replacement` text goes into the token
//! where the span starts; the rest of the span's tokens lose their masked part), `bytes` is
//! rewritten from the new token, and at a masked position every `top_logprobs` alternative
//! shows the masked token. The joined new tokens equal the masked text.
//! Streams cannot be masked exactly (a token list per event): a streaming request asking for
//! log-probabilities is refused up front (`logprobs_unavailable`), and any log-probabilities
//! a stream carries anyway are removed ([`strip`]).

use crate::inspect::Verdict;
use crate::rules::{RuleSet, Span};
use serde_json::{Map, Value};

/// Mask every log-probability list in `body` (when `apply`); matches go into `v`.
pub fn mask(body: &mut Value, rules: &RuleSet, apply: bool, v: &mut Verdict) {
    match body {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "logprobs" {
                    mask_logprobs(child, rules, apply, v);
                } else {
                    mask(child, rules, apply, v);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                mask(item, rules, apply, v);
            }
        }
        _ => {}
    }
}

fn mask_logprobs(lp: &mut Value, rules: &RuleSet, apply: bool, v: &mut Verdict) {
    match lp {
        Value::Array(entries) => mask_entries(entries, rules, apply, v),
        Value::Object(obj) => {
            for key in ["content", "refusal"] {
                if let Some(Value::Array(entries)) = obj.get_mut(key) {
                    mask_entries(entries, rules, apply, v);
                }
            }
            if obj.get("tokens").is_some_and(Value::is_array) {
                mask_legacy(obj, rules, apply, v);
            }
        }
        _ => {}
    }
}

/// The tokens' texts joined, with each token's byte range.
fn join(tokens: &[String]) -> (String, Vec<(usize, usize)>) {
    let mut joined = String::new();
    let mut ranges = Vec::with_capacity(tokens.len());
    for t in tokens {
        let a = joined.len();
        joined.push_str(t);
        ranges.push((a, joined.len()));
    }
    (joined, ranges)
}

/// Mask spans of `joined`; `None` when nothing is to be masked.
fn spans_of(joined: &str, rules: &RuleSet, apply: bool, v: &mut Verdict) -> Option<Vec<Span>> {
    let found = rules.scan(joined);
    if found.matched.is_empty() {
        return None;
    }
    v.add(&found.matched);
    let spans = rules.mask_spans(joined, &found.matched);
    if !apply || spans.is_empty() {
        return None;
    }
    v.changed = true;
    Some(spans)
}

/// Each token's new text, or `None` when it overlaps no span.
fn remap(joined: &str, ranges: &[(usize, usize)], spans: &[Span], rules: &RuleSet) -> Vec<Option<String>> {
    ranges
        .iter()
        .map(|&(a, b)| {
            let hits: Vec<&Span> = spans.iter().filter(|s| s.start < b && s.end > a).collect();
            if hits.is_empty() {
                return None;
            }
            let mut out = String::new();
            let mut at = a;
            for s in hits {
                let from = s.start.max(a);
                let to = s.end.min(b);
                out.push_str(joined.get(at..from).unwrap_or_default());
                let part = joined.get(from..to).unwrap_or_default();
                match rules.replacement(s.rule) {
                    Some(crate::rules::Replacement::EachChar(c)) => {
                        out.extend(std::iter::repeat_n(*c, part.chars().count()))
                    }
                    Some(crate::rules::Replacement::Text(t)) if s.start >= a => out.push_str(t),
                    _ => {}
                }
                at = to;
            }
            out.push_str(joined.get(at..b).unwrap_or_default());
            Some(out)
        })
        .collect()
}

fn bytes_of(s: &str) -> Value {
    Value::Array(s.bytes().map(Value::from).collect())
}

fn set_token(entry: &mut Value, token: &str) {
    if let Some(o) = entry.as_object_mut() {
        o.insert("token".into(), Value::String(token.to_string()));
        if o.contains_key("bytes") {
            o.insert("bytes".into(), bytes_of(token));
        }
    }
}

/// `[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]` (chat, Responses).
fn mask_entries(entries: &mut [Value], rules: &RuleSet, apply: bool, v: &mut Verdict) {
    let tokens: Vec<String> =
        entries.iter().map(|e| e.get("token").and_then(Value::as_str).unwrap_or_default().to_string()).collect();
    let (joined, ranges) = join(&tokens);
    let Some(spans) = spans_of(&joined, rules, apply, v) else { return };
    for (entry, new) in entries.iter_mut().zip(remap(&joined, &ranges, &spans, rules)) {
        let Some(new) = new else { continue };
        set_token(entry, &new);
        if let Some(Value::Array(alts)) = entry.get_mut("top_logprobs") {
            for alt in alts {
                set_token(alt, &new);
            }
        }
    }
}

/// `{tokens: [...], token_logprobs, top_logprobs: [{token: logprob}], text_offset}` (legacy
/// completions).
fn mask_legacy(obj: &mut Map<String, Value>, rules: &RuleSet, apply: bool, v: &mut Verdict) {
    let tokens: Vec<String> = obj
        .get("tokens")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|t| t.as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default();
    let (joined, ranges) = join(&tokens);
    let Some(spans) = spans_of(&joined, rules, apply, v) else { return };
    let new = remap(&joined, &ranges, &spans, rules);
    let finals: Vec<String> =
        tokens.iter().zip(&new).map(|(old, n)| n.clone().unwrap_or_else(|| old.clone())).collect();
    obj.insert("tokens".into(), Value::Array(finals.iter().cloned().map(Value::String).collect()));
    if let Some(Value::Array(tops)) = obj.get_mut("top_logprobs") {
        for (top, n) in tops.iter_mut().zip(&new) {
            let Some(n) = n else { continue };
            let best = top.as_object().and_then(|m| m.values().filter_map(Value::as_f64).reduce(f64::max));
            let mut m = Map::new();
            m.insert(n.clone(), best.map_or(Value::Null, Value::from));
            *top = Value::Object(m);
        }
    }
    // Offsets are in characters from the start of the answer: recompute after the change.
    let first = obj.get("text_offset").and_then(|o| o.get(0)).and_then(Value::as_u64);
    if let (Some(first), Some(Value::Array(offsets))) = (first, obj.get_mut("text_offset")) {
        let mut at = first;
        for (o, t) in offsets.iter_mut().zip(&finals) {
            *o = Value::from(at);
            at = at.saturating_add(t.chars().count() as u64);
        }
    }
}

/// Remove log-probabilities from a stream event (they cannot be masked exactly there).
/// Returns true when the event changed.
pub fn strip(event: &mut Value) -> bool {
    match event {
        Value::Object(map) => {
            let mut changed = false;
            for (k, child) in map.iter_mut() {
                if k == "logprobs" {
                    let empty = match child {
                        Value::Null => true,
                        Value::Array(a) => a.is_empty(),
                        Value::Object(o) => o.values().all(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty)),
                        _ => false,
                    };
                    if !empty {
                        *child = if child.is_array() { Value::Array(Vec::new()) } else { Value::Null };
                        changed = true;
                    }
                } else {
                    changed |= strip(child);
                }
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |c, i| strip(i) | c),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn rules() -> RuleSet {
        let c = Config::from_json(
            br#"{"policies":{"p":{"response_rules":[
                {"builtin":"credit_card","action":"mask"},
                {"builtin":"email","action":"mask","replacement":"[EMAIL]"}]}}}"#,
        )
        .unwrap();
        c.policy("p").unwrap().response.clone()
    }

    fn entry(t: &str) -> Value {
        let alts: Vec<Value> = [t.to_string(), t.to_uppercase()]
            .iter()
            .map(|a| json!({"token": a, "logprob": -1.0, "bytes": a.bytes().collect::<Vec<u8>>()}))
            .collect();
        json!({"token": t, "logprob": -0.1, "bytes": t.bytes().collect::<Vec<u8>>(), "top_logprobs": alts})
    }

    fn tokens(list: &Value) -> String {
        list.as_array().unwrap().iter().map(|e| e["token"].as_str().unwrap()).collect()
    }

    #[test]
    fn chat_logprobs_are_masked_exactly() {
        let pieces = ["Card", " 4111", " 1111", " 11", "11 1111", " or", " bob@", "example.com", "."];
        let mut body = json!({"choices": [{"message": {"content": pieces.concat()},
            "logprobs": {"content": pieces.iter().map(|p| entry(p)).collect::<Vec<_>>(), "refusal": null}}]});
        let mut v = Verdict::default();
        mask(&mut body, &rules(), true, &mut v);
        assert!(v.changed);
        let list = &body["choices"][0]["logprobs"]["content"];
        assert_eq!(tokens(list), "Card XXXXXXXXXXXXXXXXXXX or [EMAIL].");
        for e in list.as_array().unwrap() {
            let t = e["token"].as_str().unwrap();
            assert_eq!(e["bytes"], json!(t.bytes().collect::<Vec<u8>>()));
            for alt in e["top_logprobs"].as_array().unwrap() {
                let a = alt["token"].as_str().unwrap();
                assert!(
                    !a.contains("4111") && !a.contains("1111") && !a.contains("bob") && !a.contains("EXAMPLE"),
                    "{a}"
                );
            }
        }
        assert_eq!(list[1]["token"], " XXXX");
        assert_eq!(list[6]["token"], " [EMAIL]");
        assert_eq!(list[7]["token"], "");
    }

    #[test]
    fn responses_and_legacy_logprobs() {
        let mut r = json!({"output": [{"content": [{"type": "output_text", "text": "x",
            "logprobs": [entry("4111111111111111")]}]}]});
        let mut v = Verdict::default();
        mask(&mut r, &rules(), true, &mut v);
        assert_eq!(r["output"][0]["content"][0]["logprobs"][0]["token"], "XXXXXXXXXXXXXXXX");
        let mut l = json!({"choices": [{"text": "a b@c.example", "logprobs": {"tokens": ["a", " b@c", ".example"],
            "token_logprobs": [-0.1, -0.1, -0.1], "top_logprobs": [{"a": -0.1}, {" b@c": -0.1, " B@C": -1.1}, {".example": -0.1}],
            "text_offset": [0, 1, 5]}}]});
        mask(&mut l, &rules(), true, &mut v);
        let lp = &l["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"], json!(["a", " [EMAIL]", ""]));
        assert_eq!(lp["top_logprobs"][1], json!({" [EMAIL]": -0.1}));
        assert_eq!(lp["text_offset"], json!([0, 1, 9]));
    }

    #[test]
    fn shadow_counts_without_changing_and_streams_are_stripped() {
        let mut body = json!({"choices": [{"logprobs": {"content": [entry("4111111111111111")]}}]});
        let copy = body.clone();
        let mut v = Verdict::default();
        mask(&mut body, &rules(), false, &mut v);
        assert_eq!(body, copy);
        assert_eq!(v.matched, vec![0]);
        let mut ev = json!({"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [entry("x")]}}]});
        assert!(strip(&mut ev));
        assert!(ev["choices"][0]["logprobs"].is_null());
        let mut quiet =
            json!({"choices": [{"delta": {"content": "x"}, "logprobs": null}], "type": "x", "logprobs": []});
        assert!(!strip(&mut quiet));
    }
}
