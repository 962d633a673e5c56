//! The guard pass over a body's texts. Which texts a request or an answer has, in every
//! format, is core's knowledge (`sluice_core::api::visit_request_texts` /
//! `visit_response_texts`); this module only scans what those visit.
//!
//! Two passes (see `rules`): the joined pre-filter over every text at once, then, only when it
//! found candidate rules, each text on its own with those rules. Each text is still decided
//! **on its own**: text split across two places is not joined into one match.

use crate::logprobs;
use crate::rules::{RuleAction, RuleSet};
use serde_json::Value;
use sluice_core::api;

/// Outcome of guarding one body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// First reject rule that matched (rule order), if any.
    pub reject: Option<usize>,
    /// Every rule that matched anywhere, sorted, deduplicated.
    pub matched: Vec<usize>,
    /// True when some text was changed.
    pub changed: bool,
}

impl Verdict {
    /// Add matched rules (kept sorted and unique).
    pub fn add(&mut self, rules: &[usize]) {
        for r in rules {
            if let Err(pos) = self.matched.binary_search(r) {
                self.matched.insert(pos, *r);
            }
        }
    }
}

/// Scan one text (with the rules among `candidates`, or all when `None`); mask it in place
/// when `apply` and no reject has been seen.
pub fn guard_text(
    rules: &RuleSet,
    text: &mut String,
    candidates: Option<&[usize]>,
    apply: bool,
    verdict: &mut Verdict,
) {
    let found = match candidates {
        Some(c) => rules.scan_among(text, c),
        None => rules.scan(text),
    };
    if found.matched.is_empty() {
        return;
    }
    verdict.add(&found.matched);
    if verdict.reject.is_none() {
        verdict.reject = found
            .matched
            .iter()
            .copied()
            .find(|i| rules.rule(*i).is_some_and(|r| matches!(r.action, RuleAction::Reject { .. })));
    }
    if apply && verdict.reject.is_none() {
        let spans = rules.mask_spans(text, &found.matched);
        if !spans.is_empty() {
            *text = rules.apply_spans(text, &spans);
            verdict.changed = true;
        }
    }
}

/// Up to this many texts a body is scanned text by text (see `guard_texts`).
const FEW_TEXTS: usize = 4;

/// Calls its argument on every text of one body (a core visitor over that body).
pub type Visit<'a> = dyn FnMut(&mut dyn FnMut(&mut String)) + 'a;

/// A body's texts, visited by `visit` (called once or twice), guarded with `rules`.
pub fn guard_texts(rules: &RuleSet, apply: bool, visit: &mut Visit<'_>) -> Verdict {
    let mut v = Verdict::default();
    if rules.is_empty() {
        return v;
    }
    let mut joined = String::new();
    let mut texts = 0usize;
    if rules.joinable() {
        visit(&mut |t| {
            texts += 1;
            joined.push_str(t);
            joined.push('\n');
        });
    }
    if !rules.joinable() || texts <= FEW_TEXTS {
        // Few texts: one set pass each costs the same as the joined pass, without a second
        // scan of a text that matched.
        visit(&mut |t| guard_text(rules, t, None, apply, &mut v));
        return v;
    }
    let candidates = rules.candidates(&joined);
    if candidates.is_empty() {
        return v;
    }
    visit(&mut |t| guard_text(rules, t, Some(&candidates), apply, &mut v));
    v
}

/// Guard a request body (masking in place when `apply`): every text the model reads.
pub fn guard_request(body: &mut Value, rules: &RuleSet, roles: Option<&[String]>, apply: bool) -> Verdict {
    guard_texts(rules, apply, &mut |f| api::visit_request_texts(body, roles, f))
}

/// Guard a non-streaming answer (mask rules only): every generated text, and the tokens of
/// its log-probabilities.
pub fn guard_response(body: &mut Value, rules: &RuleSet, apply: bool) -> Verdict {
    let mut v = guard_texts(rules, apply, &mut |f| api::visit_response_texts(body, f));
    logprobs::mask(body, rules, apply, &mut v);
    v
}

/// Guard a plain-text answer: the masked text when something was masked.
pub fn guard_plain(text: &str, rules: &RuleSet, apply: bool, v: &mut Verdict) -> Option<String> {
    let mut t = text.to_string();
    let mut one = Verdict::default();
    guard_text(rules, &mut t, None, apply, &mut one);
    v.add(&one.matched);
    v.changed |= one.changed;
    one.changed.then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn rules() -> RuleSet {
        let c = Config::from_json(
            br#"{"policies":{"p":{"request_rules":[
                {"name":"cc","phrase":"credit card","case_insensitive":true,"action":"reject"},
                {"builtin":"credit_card","action":"mask"},
                {"builtin":"email","action":"mask","replacement":"<email>"}]}}}"#,
        )
        .unwrap();
        c.policy("p").unwrap().request.clone()
    }

    #[test]
    fn every_text_the_model_reads_is_guarded() {
        let r = rules();
        let bodies = [
            json!({"messages": [{"role": "user", "name": "credit card", "content": "hi"}]}),
            json!({"tools": [{"type": "function", "function": {"name": "f", "description": "Ask for a credit card"}}]}),
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"credit card": {"type": "string"}}}}}]}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                "properties": {"q": {"type": "string", "description": "the credit card"}}}}}}),
            json!({"prediction": {"type": "content", "content": "credit card"}}),
            json!({"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no credit card"}]}]}),
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "credit card"}]}]}),
            json!({"model": "m", "instructions": "credit card", "input": "hi"}),
            json!({"model": "m", "input": ["fine", "credit card"]}),
            json!({"model": "m", "prompt": ["fine", "credit card"]}),
            json!({"model": "m", "system": [{"type": "text", "text": "credit card"}], "messages": []}),
        ];
        for (i, mut b) in bodies.into_iter().enumerate() {
            let v = guard_request(&mut b, &r, None, true);
            assert_eq!(v.reject, Some(0), "case {i}: {b}");
        }
    }

    #[test]
    fn the_prefilter_skips_clean_bodies_and_masks_in_place() {
        let r = rules();
        let mut clean = json!({"messages": [{"role": "user", "content": "hello"}], "tools": [{"function":
            {"name": "f", "parameters": {"properties": {"a": {}, "b": {}}}}}]});
        let copy = clean.clone();
        assert_eq!(guard_request(&mut clean, &r, None, true), Verdict::default());
        assert_eq!(clean, copy);
        let mut b = json!({"messages": [{"role": "user", "content": "mail a@b.example"}, {"role": "user", "content": "card 4111111111111111 123"}]});
        let v = guard_request(&mut b, &r, None, true);
        assert!(v.changed && v.reject.is_none());
        assert_eq!(b["messages"][0]["content"], "mail <email>");
        assert_eq!(b["messages"][1]["content"], "card XXXXXXXXXXXXXXXX 123");
    }

    #[test]
    fn answers_of_every_format_are_masked() {
        let r = rules();
        let card = "4111 1111 1111 1111";
        let bodies = [
            json!({"choices": [{"message": {"content": card}}]}),
            json!({"choices": [{"message": {"content": null, "refusal": card}}]}),
            json!({"choices": [{"message": {"content": "x", "reasoning_content": card}}]}),
            json!({"choices": [{"message": {"content": "x", "reasoning": card}}]}),
            json!({"choices": [{"message": {"audio": {"id": "a", "data": "QUJD", "transcript": card}}}]}),
            json!({"choices": [{"message": {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": card}}]}}]}),
            json!({"choices": [{"text": card}]}),
            json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": card}]}]}),
            json!({"content": [{"type": "text", "text": card}]}),
        ];
        for (i, mut b) in bodies.into_iter().enumerate() {
            let v = guard_response(&mut b, &r, true);
            assert!(v.changed, "case {i}");
            assert!(!b.to_string().contains("4111"), "case {i}: {b}");
        }
    }
}
