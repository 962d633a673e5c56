//! Where text lives in chat requests and responses, and the guard pass over it.
//!
//! Request: every message whose role is inspected (all by default): `content` as a string
//! or as an array of parts (every part's `text` string), `tool_calls[].function.arguments`,
//! the legacy `function_call.arguments`, tool results (role `tool`/`function`: their
//! content), and the legacy completions `prompt` (string or array of strings).
//! Each text is scanned on its own: text split across two places is not joined.

use crate::rules::{RuleAction, RuleSet};
use serde_json::Value;

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
    fn add(&mut self, rules: &[usize]) {
        for r in rules {
            if let Err(pos) = self.matched.binary_search(r) {
                self.matched.insert(pos, *r);
            }
        }
    }
}

fn visit_content(content: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => f(s),
                    Value::Object(obj) => {
                        if let Some(Value::String(s)) = obj.get_mut("text") {
                            f(s);
                        }
                        // Nested tool-result content (Anthropic-style parts).
                        if let Some(inner) = obj.get_mut("content") {
                            visit_content(inner, f);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn visit_arguments(obj: &mut serde_json::Map<String, Value>, f: &mut dyn FnMut(&mut String)) {
    if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
        for call in calls {
            if let Some(Value::String(args)) = call.pointer_mut("/function/arguments") {
                f(args);
            }
        }
    }
    if let Some(Value::String(args)) = obj.get_mut("function_call").and_then(|fc| fc.get_mut("arguments")) {
        f(args);
    }
}

/// Visit every inspected text of a request body.
pub fn visit_request(body: &mut Value, roles: Option<&[String]>, f: &mut dyn FnMut(&mut String)) {
    let Value::Object(root) = body else { return };
    if let Some(Value::Array(messages)) = root.get_mut("messages") {
        for msg in messages {
            let Value::Object(m) = msg else { continue };
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            if let Some(roles) = roles {
                if !roles.iter().any(|r| r == role) {
                    continue;
                }
            }
            if let Some(content) = m.get_mut("content") {
                visit_content(content, f);
            }
            visit_arguments(m, f);
        }
    }
    if let Some(prompt) = root.get_mut("prompt") {
        visit_content(prompt, f);
    }
}

/// Visit every text of a non-streaming chat response (`choices[].message.content`, its
/// tool-call arguments, and legacy `choices[].text`).
pub fn visit_response(body: &mut Value, f: &mut dyn FnMut(&mut String)) {
    let Some(Value::Array(choices)) = body.get_mut("choices") else { return };
    for choice in choices {
        let Value::Object(c) = choice else { continue };
        if let Some(Value::Object(msg)) = c.get_mut("message") {
            if let Some(content) = msg.get_mut("content") {
                visit_content(content, f);
            }
            visit_arguments(msg, f);
        }
        if let Some(Value::String(t)) = c.get_mut("text") {
            f(t);
        }
    }
}

/// Scan one text; mask it in place when `apply` and no reject has been seen.
pub fn guard_text(rules: &RuleSet, text: &mut String, apply: bool, verdict: &mut Verdict) {
    let found = rules.scan(text);
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

/// Guard a request body (masking in place when `apply`).
pub fn guard_request(body: &mut Value, rules: &RuleSet, roles: Option<&[String]>, apply: bool) -> Verdict {
    let mut v = Verdict::default();
    visit_request(body, roles, &mut |t| guard_text(rules, t, apply, &mut v));
    v
}

/// Guard a non-streaming response body (mask rules only).
pub fn guard_response(body: &mut Value, rules: &RuleSet, apply: bool) -> Verdict {
    let mut v = Verdict::default();
    visit_response(body, &mut |t| guard_text(rules, t, apply, &mut v));
    v
}
