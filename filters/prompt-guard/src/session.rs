//! The per-request state machine, written against `sluice_core::host::Host` so native
//! tests drive it with `FakeHost`. `filter.rs` maps [`Step`] to proxy-wasm actions.

use crate::config::{Config, Policy, Webhook, FILTER};
use crate::inspect::{guard_request, guard_response, Verdict};
use crate::rules::{RuleAction, RuleSet};
use crate::stream::StreamMasker;
use serde_json::{json, Value};
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::{tagged_name, MetricIds, MetricKind};
use std::cell::RefCell;
use std::rc::Rc;

/// Counter of guard checks, tagged by phase, action and rule.
pub const CHECKS_METRIC: &str = "sluice_guard_checks";

/// What the glue should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Continue (from a callout callback: resume the request).
    Continue,
    /// Hold (buffering, waiting for a callout, or a local reply was sent).
    Pause,
}

#[derive(Debug, Default)]
enum ResponseMode {
    #[default]
    Pass,
    Json,
    Sse(Box<StreamMasker>),
}

/// State of one HTTP stream.
#[derive(Debug)]
pub struct GuardSession {
    config: Rc<Config>,
    metrics: Rc<RefCell<MetricIds>>,
    policy: Option<Rc<Policy>>,
    inspect_request: bool,
    /// Request body waiting for the webhook, with its size and whether it changed.
    waiting: Option<(Value, usize, bool)>,
    webhook_token: Option<u32>,
    response: ResponseMode,
    verdict: String,
    replied: bool,
}

fn reject_reply(status: u32, message: &str) -> LocalReply {
    let kind = if status == 403 { "permission_error" } else { "invalid_request_error" };
    LocalReply::openai_error(status, kind, "prompt_guard_rejected", message)
}

impl GuardSession {
    /// A session for one stream.
    pub fn new(config: Rc<Config>, metrics: Rc<RefCell<MetricIds>>) -> Self {
        Self {
            config,
            metrics,
            policy: None,
            inspect_request: false,
            waiting: None,
            webhook_token: None,
            response: ResponseMode::Pass,
            verdict: String::new(),
            replied: false,
        }
    }

    /// The token of the webhook call in flight.
    pub fn webhook_token(&self) -> Option<u32> {
        self.webhook_token
    }

    fn count<H: Host>(&self, host: &mut H, phase: &str, action: &str, rule: &str) {
        let name =
            tagged_name(CHECKS_METRIC, &[("sluice_phase", phase), ("sluice_action", action), ("sluice_rule", rule)]);
        let id = self.metrics.borrow_mut().get_or_define(&name, |n| host.define_metric(MetricKind::Counter, n));
        if let Some(id) = id {
            host.increment_metric(id, 1);
        }
    }

    fn reply<H: Host>(&mut self, host: &mut H, reply: &LocalReply) -> Step {
        self.replied = true;
        host.send_reply(reply);
        Step::Pause
    }

    fn set_verdict<H: Host>(&mut self, host: &mut H, v: String) {
        self.verdict = v;
        keys::set_filter_state(host, keys::GUARD, &self.verdict);
    }

    /// Request headers: pick the policy; hold the headers when the body must be inspected.
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Step {
        let route = keys::route_metadata(host, &self.config.route_metadata_key);
        let policy = match self.config.policy_for(route.as_deref()) {
            Ok(p) => p,
            Err(name) => {
                log::warn!("{FILTER}: route names unknown guard policy {name:?}");
                let r = LocalReply::openai_error(
                    500,
                    "server_error",
                    "guard_policy_unknown",
                    &format!("{FILTER}: route names an unknown guard policy"),
                );
                return self.reply(host, &r);
            }
        };
        let Some(policy) = policy else { return Step::Continue };
        let inspect = !policy.request.is_empty() || policy.webhook.is_some();
        self.policy = Some(policy.clone());
        if !policy.response.is_empty() && !policy.shadow {
            // A compressed answer cannot be masked: ask the provider for identity encoding.
            host.set_request_header("accept-encoding", None);
        }
        if !inspect || end_of_stream {
            return Step::Continue;
        }
        if let Some(len) = host
            .request_header("content-length")
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<usize>().ok())
        {
            if len > self.config.max_request_bytes {
                self.count(host, "request", "too_large", "none");
                return self.reply(host, &LocalReply::body_too_large(FILTER, self.config.max_request_bytes));
            }
        }
        self.inspect_request = true;
        if !policy.shadow && (policy.request.has_mask_rules() || policy.webhook.is_some()) {
            host.set_request_header("content-length", None);
        }
        Step::Pause
    }

    /// Request body: buffer to the end, then guard it.
    pub fn on_request_body<H: Host>(&mut self, host: &mut H, size: usize, end_of_stream: bool) -> Step {
        if !self.inspect_request || self.replied {
            return if self.replied { Step::Pause } else { Step::Continue };
        }
        let Some(policy) = self.policy.clone() else { return Step::Continue };
        if size > self.config.max_request_bytes {
            self.count(host, "request", "too_large", "none");
            return self.reply(host, &LocalReply::body_too_large(FILTER, self.config.max_request_bytes));
        }
        if !end_of_stream {
            return Step::Pause;
        }
        self.inspect_request = false;
        let body = host.request_body(0, size).unwrap_or_default();
        if std::str::from_utf8(&body).is_err() {
            self.count(host, "request", "invalid", "none");
            let r = LocalReply::openai_error(
                400,
                "invalid_request_error",
                "invalid_encoding",
                &format!("{FILTER}: request body is not valid UTF-8"),
            );
            return self.reply(host, &r);
        }
        let mut value: Value = match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                self.count(host, "request", "invalid", "none");
                return self.reply(host, &LocalReply::invalid_json(FILTER, "expected a JSON object"));
            }
            Err(e) => {
                self.count(host, "request", "invalid", "none");
                return self.reply(host, &LocalReply::invalid_json(FILTER, &e.to_string()));
            }
        };
        let verdict = guard_request(&mut value, &policy.request, policy.roles.as_deref(), !policy.shadow);
        self.record(host, "request", &policy.request, &verdict, policy.shadow);
        if let Some(i) = verdict.reject {
            if !policy.shadow {
                if let Some(RuleAction::Reject { status, message }) = policy.request.rule(i).map(|r| r.action.clone()) {
                    return self.reply(host, &reject_reply(status, &message));
                }
            }
        }
        if let Some(hook) = &policy.webhook {
            return self.call_webhook(host, hook, &policy, value, size, verdict.changed);
        }
        self.forward(host, &value, size, verdict.changed);
        Step::Continue
    }

    /// Metrics and filter state for one verdict.
    fn record<H: Host>(&mut self, host: &mut H, phase: &str, rules: &RuleSet, v: &Verdict, shadow: bool) {
        let prefix = if shadow { "shadow_" } else { "" };
        if v.matched.is_empty() {
            self.count(host, phase, "allow", "none");
        }
        for i in &v.matched {
            let Some(rule) = rules.rule(*i) else { continue };
            let action = match rule.action {
                RuleAction::Reject { .. } => "reject",
                RuleAction::Mask(_) => "mask",
            };
            self.count(host, phase, &format!("{prefix}{action}"), &rule.name);
        }
        let state = match (v.reject.and_then(|i| rules.rule(i)), v.matched.first().and_then(|i| rules.rule(*i))) {
            (Some(r), _) => format!("{prefix}reject:{}", r.name),
            (None, Some(r)) => format!("{prefix}mask:{}", r.name),
            (None, None) => "allow".to_string(),
        };
        if phase == "request" {
            self.set_verdict(host, state);
        } else if state != "allow" {
            let v = if self.verdict.is_empty() {
                format!("response_{state}")
            } else {
                format!("{};response_{state}", self.verdict)
            };
            self.set_verdict(host, v);
        }
    }

    fn forward<H: Host>(&mut self, host: &mut H, value: &Value, size: usize, changed: bool) {
        if changed {
            let bytes = serde_json::to_vec(value).unwrap_or_default();
            host.set_request_body(0, size, &bytes);
        }
    }

    fn call_webhook<H: Host>(
        &mut self,
        host: &mut H,
        hook: &Webhook,
        policy: &Policy,
        value: Value,
        size: usize,
        changed: bool,
    ) -> Step {
        let payload = json!({
            "phase": "request",
            "policy": policy.name,
            "messages": value.get("messages").cloned().unwrap_or(Value::Null),
            "prompt": value.get("prompt").cloned().unwrap_or(Value::Null),
        });
        let body = serde_json::to_vec(&payload).unwrap_or_default();
        let headers = [
            (":method", "POST"),
            (":path", hook.path.as_str()),
            (":authority", hook.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match host.dispatch_http_call(&hook.cluster, &headers, Some(&body), hook.timeout) {
            Some(token) => {
                self.webhook_token = Some(token);
                self.waiting = Some((value, size, changed));
                Step::Pause
            }
            None => {
                self.waiting = Some((value, size, changed));
                self.webhook_failed(host, hook.failure_mode, policy.shadow, "dispatch failed")
            }
        }
    }

    fn webhook_failed<H: Host>(&mut self, host: &mut H, mode: FailureMode, shadow: bool, why: &str) -> Step {
        log::warn!("{FILTER}: webhook failed: {why}");
        let (value, size, changed) = self.waiting.take().unwrap_or((Value::Null, 0, false));
        if mode == FailureMode::Deny && !shadow {
            self.count(host, "request", "error", "webhook");
            let r = LocalReply::openai_error(
                503,
                "server_error",
                "guard_unavailable",
                &format!("{FILTER}: the content check is unavailable"),
            );
            return self.reply(host, &r);
        }
        self.count(host, "request", if shadow { "shadow_error" } else { "error_allowed" }, "webhook");
        self.forward(host, &value, size, changed);
        Step::Continue
    }

    /// The webhook answered (or failed / timed out: no `:status`). Always resumes or replies.
    pub fn on_webhook_response<H: Host>(&mut self, host: &mut H, token: u32, body_size: usize) -> Step {
        if self.webhook_token != Some(token) {
            return Step::Pause;
        }
        self.webhook_token = None;
        let Some(policy) = self.policy.clone() else { return Step::Continue };
        let Some(hook) = policy.webhook.clone() else { return Step::Continue };
        let status = host
            .call_response_header(":status")
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse::<u32>().ok());
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            let why = status
                .map_or_else(|| "no response (timeout or connection failure)".to_string(), |s| format!("status {s}"));
            return self.webhook_failed(host, hook.failure_mode, policy.shadow, &why);
        }
        let body = host.call_response_body(body_size).unwrap_or_default();
        let Ok(answer) = serde_json::from_slice::<Value>(&body) else {
            return self.webhook_failed(host, hook.failure_mode, policy.shadow, "answer is not JSON");
        };
        let action = answer.get("action").and_then(Value::as_str).unwrap_or("");
        let prefix = if policy.shadow { "shadow_" } else { "" };
        match action {
            "allow" => {
                self.count(host, "request", "allow", "webhook");
                let (value, size, changed) = self.waiting.take().unwrap_or((Value::Null, 0, false));
                self.forward(host, &value, size, changed);
                Step::Continue
            }
            "reject" => {
                self.count(host, "request", &format!("{prefix}reject"), "webhook");
                self.set_verdict(host, format!("{prefix}reject:webhook"));
                if policy.shadow {
                    let (value, size, changed) = self.waiting.take().unwrap_or((Value::Null, 0, false));
                    self.forward(host, &value, size, changed);
                    return Step::Continue;
                }
                self.waiting = None;
                let status = answer
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u32::try_from(s).ok())
                    .filter(|s| (400..=599).contains(s))
                    .unwrap_or(403);
                let message =
                    answer.get("message").and_then(Value::as_str).unwrap_or("request blocked by the content check");
                self.reply(host, &reject_reply(status, message))
            }
            "mask" => {
                let Some(messages @ Value::Array(_)) = answer.get("messages").cloned() else {
                    return self.webhook_failed(
                        host,
                        hook.failure_mode,
                        policy.shadow,
                        "mask answer without a messages array",
                    );
                };
                self.count(host, "request", &format!("{prefix}mask"), "webhook");
                self.set_verdict(host, format!("{prefix}mask:webhook"));
                let (mut value, size, changed) = self.waiting.take().unwrap_or((Value::Null, 0, false));
                if policy.shadow {
                    self.forward(host, &value, size, changed);
                    return Step::Continue;
                }
                if let Value::Object(obj) = &mut value {
                    obj.insert("messages".to_string(), messages);
                }
                self.forward(host, &value, size, true);
                Step::Continue
            }
            other => self.webhook_failed(host, hook.failure_mode, policy.shadow, &format!("unknown action {other:?}")),
        }
    }

    /// Response headers: choose SSE masking, JSON buffering, or pass-through.
    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Step {
        if self.replied {
            return Step::Continue;
        }
        let Some(policy) = self.policy.clone() else { return Step::Continue };
        if policy.response.is_empty() || end_of_stream {
            return Step::Continue;
        }
        let ctype = host
            .response_header("content-type")
            .map(|v| String::from_utf8_lossy(&v).to_ascii_lowercase())
            .unwrap_or_default();
        let encoding =
            host.response_header("content-encoding").map(|v| String::from_utf8_lossy(&v).trim().to_ascii_lowercase());
        let inspectable = ctype.starts_with("text/event-stream") || ctype.contains("json");
        if inspectable && !policy.shadow && encoding.as_deref().is_some_and(|e| !e.is_empty() && e != "identity") {
            // Fail closed: a compressed answer would pass unmasked.
            self.count(host, "response", "uninspectable", "none");
            let r = LocalReply::openai_error(
                502,
                "server_error",
                "response_not_inspectable",
                &format!("{FILTER}: the provider's answer is compressed and cannot be inspected"),
            );
            return self.reply(host, &r);
        }
        if ctype.starts_with("text/event-stream") {
            self.response =
                ResponseMode::Sse(Box::new(StreamMasker::new(policy.response.max_mask_len(), !policy.shadow)));
            if !policy.shadow {
                host.set_response_header("content-length", None);
            }
            return Step::Continue;
        }
        if ctype.contains("json") {
            if let Some(len) = host
                .response_header("content-length")
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.trim().parse::<usize>().ok())
            {
                if len > self.config.max_response_bytes {
                    return self.response_too_large(host);
                }
            }
            self.response = ResponseMode::Json;
            if !policy.shadow {
                host.set_response_header("content-length", None);
            }
            return Step::Pause;
        }
        Step::Continue
    }

    fn response_too_large<H: Host>(&mut self, host: &mut H) -> Step {
        self.count(host, "response", "too_large", "none");
        self.response = ResponseMode::Pass;
        let r = LocalReply::openai_error(
            502,
            "server_error",
            "response_too_large",
            &format!("{FILTER}: response exceeds the {}-byte inspection limit", self.config.max_response_bytes),
        );
        self.reply(host, &r)
    }

    /// Response body: mask SSE chunks as they pass, or buffer JSON to the end and mask it.
    pub fn on_response_body<H: Host>(&mut self, host: &mut H, size: usize, end_of_stream: bool) -> Step {
        let Some(policy) = self.policy.clone() else { return Step::Continue };
        match &mut self.response {
            ResponseMode::Pass => Step::Continue,
            ResponseMode::Sse(masker) => {
                let chunk = host.response_body(0, size).unwrap_or_default();
                let mut out = masker.feed(&policy.response, &chunk);
                if end_of_stream {
                    out.extend(masker.finish(&policy.response));
                }
                if out != chunk {
                    host.set_response_body(0, size, &out);
                }
                if end_of_stream {
                    let v =
                        Verdict { reject: None, matched: masker.matched.clone(), changed: !masker.applied.is_empty() };
                    self.response = ResponseMode::Pass;
                    self.record(host, "response", &policy.response, &v, policy.shadow);
                }
                Step::Continue
            }
            ResponseMode::Json => {
                if size > self.config.max_response_bytes {
                    return self.response_too_large(host);
                }
                if !end_of_stream {
                    return Step::Pause;
                }
                self.response = ResponseMode::Pass;
                let body = host.response_body(0, size).unwrap_or_default();
                let apply = !policy.shadow;
                let (out, verdict) = match serde_json::from_slice::<Value>(&body) {
                    Ok(mut value) => {
                        let v = guard_response(&mut value, &policy.response, apply);
                        (v.changed.then(|| serde_json::to_vec(&value).unwrap_or_default()), v)
                    }
                    Err(_) => {
                        // Not JSON: mask the raw text so a broken answer cannot leak.
                        let text = String::from_utf8_lossy(&body).into_owned();
                        let mut t = text.clone();
                        let mut v = Verdict::default();
                        crate::inspect::guard_text(&policy.response, &mut t, apply, &mut v);
                        (v.changed.then(|| t.into_bytes()), v)
                    }
                };
                if let Some(bytes) = out {
                    host.set_response_body(0, size, &bytes);
                }
                self.record(host, "response", &policy.response, &verdict, policy.shadow);
                Step::Continue
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;

    const CONFIG: &str = r#"{
      "default_policy": "strict",
      "max_request_bytes": 4096,
      "max_response_bytes": 4096,
      "policies": {
        "strict": {
          "request_rules": [
            {"name": "credit-card-talk", "phrase": "credit card", "case_insensitive": true, "action": "reject",
             "message": "Rejected due to inappropriate content"},
            {"builtin": "aws_access_key", "action": "reject", "status": 422},
            {"builtin": "credit_card", "action": "mask"},
            {"builtin": "email", "action": "mask", "replacement": "<email>"}
          ],
          "response_rules": [
            {"name": "mastercard", "regex": "5[1-5][0-9]{2}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}", "action": "mask"}
          ]
        },
        "users-only": {
          "roles": ["user"],
          "request_rules": [{"name": "cc", "phrase": "credit card", "action": "reject"}]
        },
        "shadow": {
          "shadow": true,
          "request_rules": [{"name": "cc", "phrase": "credit card", "action": "reject"}, {"builtin": "email", "action": "mask"}],
          "response_rules": [{"builtin": "credit_card", "action": "mask"}]
        },
        "hooked": {
          "request_rules": [{"builtin": "email", "action": "mask"}],
          "webhook": {"cluster": "guard", "timeout": "200ms", "failure_mode": "deny"}
        },
        "hooked-open": {
          "webhook": {"cluster": "guard", "failure_mode": "allow"}
        }
      }
    }"#;

    fn session() -> GuardSession {
        let c = Rc::new(Config::from_json(CONFIG.as_bytes()).unwrap());
        GuardSession::new(c, Rc::new(RefCell::new(MetricIds::new(100))))
    }

    fn host(policy: Option<&str>, body: &Value) -> FakeHost {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut h = FakeHost::with_request_headers(&[
            ("content-length", &bytes.len().to_string()),
            ("content-type", "application/json"),
        ]);
        if let Some(p) = policy {
            h.set_prop(&keys::route_metadata_path("guard_policy"), p);
        }
        h.req_body = bytes;
        h
    }

    /// Run the request side; returns (session, host, last step).
    fn request(policy: Option<&str>, body: Value) -> (GuardSession, FakeHost, Step) {
        let mut s = session();
        let mut h = host(policy, &body);
        assert_eq!(s.on_request_headers(&mut h, false), Step::Pause);
        let size = h.req_body.len();
        assert_eq!(s.on_request_body(&mut h, size / 2, false), Step::Pause);
        let step = s.on_request_body(&mut h, size, true);
        (s, h, step)
    }

    fn user(text: &str) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": text}]})
    }

    fn rejected(h: &FakeHost) -> Option<(u32, String)> {
        h.replies.last().map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            (r.status, v["error"]["message"].as_str().unwrap_or_default().to_string())
        })
    }

    fn sent_body(h: &FakeHost) -> Value {
        serde_json::from_slice(&h.req_body).unwrap()
    }

    #[test]
    fn phrase_rejects_with_custom_message() {
        let (_, h, step) = request(None, user("Give me examples of credit card numbers"));
        assert_eq!(step, Step::Pause);
        assert_eq!(rejected(&h), Some((403, "Rejected due to inappropriate content".into())));
        assert_eq!(h.prop(&[keys::GUARD]).as_deref(), Some("reject:credit-card-talk"));
        let m = tagged_name(
            CHECKS_METRIC,
            &[("sluice_phase", "request"), ("sluice_action", "reject"), ("sluice_rule", "credit-card-talk")],
        );
        assert_eq!(h.metric(&m), Some(1));
    }

    #[test]
    fn clean_request_passes_untouched() {
        let (_, h, step) = request(None, user("Explain how Mastercard numbers are built"));
        assert_eq!(step, Step::Continue);
        assert!(h.replies.is_empty());
        assert_eq!(h.prop(&[keys::GUARD]).as_deref(), Some("allow"));
        // content-length was removed because the policy may mask, body left as is.
        assert_eq!(h.req_header("content-length"), None);
        assert_eq!(sent_body(&h), user("Explain how Mastercard numbers are built"));
    }

    #[test]
    fn no_bypass_by_moving_text() {
        let cases = [
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "tell me a CREDIT CARD number"}]}]}),
            json!({"messages": [{"role": "tool", "tool_call_id": "1", "content": "the credit card is..."}]}),
            json!({"messages": [{"role": "system", "content": "talk about credit card data"}, {"role": "user", "content": "hi"}]}),
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":\"credit card\"}"}}]}]}),
            json!({"prompt": "credit card please"}),
            json!({"prompt": ["ok", "Credit Card please"]}),
            json!({"messages": [{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}]}),
        ];
        for (i, body) in cases.into_iter().enumerate() {
            let (_, h, step) = request(None, body);
            assert_eq!(step, Step::Pause, "case {i}");
            assert!(rejected(&h).is_some(), "case {i}");
        }
        let (_, h, _) = request(None, json!({"messages": [{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}]}));
        assert_eq!(rejected(&h).unwrap().0, 422);
    }

    #[test]
    fn documented_gaps() {
        // Split across two messages: each text is scanned on its own.
        let body = json!({"messages": [{"role": "user", "content": "credit"}, {"role": "user", "content": "card"}]});
        let (_, h, step) = request(None, body);
        assert_eq!(step, Step::Continue);
        assert!(h.replies.is_empty());
        // Unicode look-alikes (Cyrillic 'с') are not folded.
        let (_, h, step) = request(None, user("\u{0441}redit \u{0441}ard"));
        assert_eq!(step, Step::Continue);
        assert!(h.replies.is_empty());
    }

    #[test]
    fn roles_limit_what_is_inspected() {
        let body =
            json!({"messages": [{"role": "system", "content": "credit card"}, {"role": "user", "content": "hi"}]});
        let (_, h, step) = request(Some("users-only"), body);
        assert_eq!(step, Step::Continue);
        assert!(h.replies.is_empty());
        let (_, h, _) = request(Some("users-only"), user("credit card"));
        assert!(rejected(&h).is_some());
    }

    #[test]
    fn mask_rewrites_request() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111, mail bob@example.com, order 4111111111111112"}]});
        let (_, h, step) = request(None, body);
        assert_eq!(step, Step::Continue);
        let v = sent_body(&h);
        assert_eq!(v["messages"][0]["content"], "card XXXXXXXXXXXXXXXXXXX, mail <email>, order 4111111111111112");
        assert_eq!(v["model"], "m");
        assert_eq!(h.prop(&[keys::GUARD]).as_deref(), Some("mask:credit_card"));
    }

    #[test]
    fn bad_input_gets_documented_answers() {
        let mut s = session();
        let mut h = FakeHost::with_request_headers(&[("content-type", "application/json")]);
        h.req_body = b"not json".to_vec();
        s.on_request_headers(&mut h, false);
        assert_eq!(s.on_request_body(&mut h, 8, true), Step::Pause);
        assert_eq!(h.replies[0].status, 400);

        let mut s = session();
        let mut h = FakeHost {
            req_body: b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            ..FakeHost::default()
        };
        s.on_request_headers(&mut h, false);
        let n = h.req_body.len();
        assert_eq!(s.on_request_body(&mut h, n, true), Step::Pause);
        let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
        assert_eq!(h.replies[0].status, 400);
        assert_eq!(v["error"]["code"], "invalid_encoding");

        // Over the cap: by content-length in the headers, or by the body size.
        let mut s = session();
        let mut h = FakeHost::with_request_headers(&[("content-length", "5000")]);
        assert_eq!(s.on_request_headers(&mut h, false), Step::Pause);
        assert_eq!(h.replies[0].status, 413);
        let mut s = session();
        let mut h = FakeHost::default();
        s.on_request_headers(&mut h, false);
        assert_eq!(s.on_request_body(&mut h, 5000, false), Step::Pause);
        assert_eq!(h.replies[0].status, 413);

        // A JSON array is not a chat request.
        let mut s = session();
        let mut h = FakeHost { req_body: b"[1]".to_vec(), ..FakeHost::default() };
        s.on_request_headers(&mut h, false);
        s.on_request_body(&mut h, 3, true);
        assert_eq!(h.replies[0].status, 400);
    }

    #[test]
    fn unknown_route_policy_fails_closed() {
        let mut s = session();
        let mut h = host(Some("nope"), &user("hi"));
        assert_eq!(s.on_request_headers(&mut h, false), Step::Pause);
        assert_eq!(h.replies[0].status, 500);
    }

    #[test]
    fn shadow_counts_without_acting() {
        let (mut s, mut h, step) = request(Some("shadow"), user("credit card to bob@example.com"));
        assert_eq!(step, Step::Continue);
        assert!(h.replies.is_empty());
        assert_eq!(sent_body(&h), user("credit card to bob@example.com"));
        assert_eq!(h.prop(&[keys::GUARD]).as_deref(), Some("shadow_reject:cc"));
        let m = tagged_name(
            CHECKS_METRIC,
            &[("sluice_phase", "request"), ("sluice_action", "shadow_reject"), ("sluice_rule", "cc")],
        );
        assert_eq!(h.metric(&m), Some(1));
        // Response: counted, not masked.
        h.resp_headers =
            vec![("content-type".into(), b"application/json".to_vec()), ("content-length".into(), b"10".to_vec())];
        assert_eq!(s.on_response_headers(&mut h, false), Step::Pause);
        let body = json!({"choices": [{"message": {"role": "assistant", "content": "4111 1111 1111 1111"}}]});
        h.resp_body = serde_json::to_vec(&body).unwrap();
        let n = h.resp_body.len();
        assert_eq!(s.on_response_body(&mut h, n, true), Step::Continue);
        let v: Value = serde_json::from_slice(&h.resp_body).unwrap();
        assert_eq!(v, body);
        let m = tagged_name(
            CHECKS_METRIC,
            &[("sluice_phase", "response"), ("sluice_action", "shadow_mask"), ("sluice_rule", "credit_card")],
        );
        assert_eq!(h.metric(&m), Some(1));
    }

    #[test]
    fn response_json_is_masked() {
        let (mut s, mut h, _) = request(None, user("Give me example numbers"));
        h.resp_headers =
            vec![("content-type".into(), b"application/json".to_vec()), ("content-length".into(), b"100".to_vec())];
        assert_eq!(s.on_response_headers(&mut h, false), Step::Pause);
        assert_eq!(h.resp_header("content-length"), None);
        let body = json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Try 5555 5555 5555 4444 or 5105-1051-0510-5100.",
            "tool_calls": [{"function": {"name": "f", "arguments": "{\"n\":\"5555555555554444\"}"}}]}}]});
        h.resp_body = serde_json::to_vec(&body).unwrap();
        let n = h.resp_body.len();
        assert_eq!(s.on_response_body(&mut h, n / 2, false), Step::Pause);
        assert_eq!(s.on_response_body(&mut h, n, true), Step::Continue);
        let v: Value = serde_json::from_slice(&h.resp_body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Try XXXXXXXXXXXXXXXXXXX or XXXXXXXXXXXXXXXXXXX.");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"n\":\"XXXXXXXXXXXXXXXX\"}"
        );
        assert_eq!(h.prop(&[keys::GUARD]).as_deref(), Some("allow;response_mask:mastercard"));
    }

    #[test]
    fn compressed_answers_are_refused_and_not_requested() {
        let mut s = session();
        let mut h = host(None, &user("hi"));
        h.req_headers.push(("accept-encoding".into(), b"gzip".to_vec()));
        s.on_request_headers(&mut h, false);
        assert_eq!(h.req_header("accept-encoding"), None);
        let n = h.req_body.len();
        s.on_request_body(&mut h, n, true);
        h.resp_headers =
            vec![("content-type".into(), b"application/json".to_vec()), ("content-encoding".into(), b"gzip".to_vec())];
        assert_eq!(s.on_response_headers(&mut h, false), Step::Pause);
        assert_eq!(h.replies[0].status, 502);
    }

    #[test]
    fn response_over_cap_fails_closed() {
        let (mut s, mut h, _) = request(None, user("hi"));
        h.resp_headers = vec![("content-type".into(), b"application/json".to_vec())];
        assert_eq!(s.on_response_headers(&mut h, false), Step::Pause);
        assert_eq!(s.on_response_body(&mut h, 5000, false), Step::Pause);
        assert_eq!(h.replies[0].status, 502);
    }

    #[test]
    fn response_sse_is_masked_per_chunk() {
        let (mut s, mut h, _) = request(None, user("hi"));
        h.resp_headers = vec![("content-type".into(), b"text/event-stream".to_vec())];
        assert_eq!(s.on_response_headers(&mut h, false), Step::Continue);
        let events = [
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x 5555 55\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"55 5555 4444 y\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        ];
        let mut seen = Vec::new();
        for (i, e) in events.iter().enumerate() {
            h.resp_body = e.as_bytes().to_vec();
            assert_eq!(s.on_response_body(&mut h, e.len(), i == 1), Step::Continue);
            seen.extend(h.resp_body.clone());
        }
        let text = String::from_utf8(seen).unwrap();
        assert!(!text.contains("5555"), "{text}");
        assert!(text.contains("x XXXXXXXXXXXXXXXXXXX y"), "{text}");
    }

    fn webhook_session(policy: &str, body: Value) -> (GuardSession, FakeHost) {
        let (s, h, step) = request(Some(policy), body);
        assert_eq!(step, Step::Pause);
        assert!(h.replies.is_empty());
        assert_eq!(h.calls.len(), 1);
        (s, h)
    }

    fn answer(h: &mut FakeHost, status: &str, body: &str) -> usize {
        h.call_resp_headers = vec![(":status".into(), status.as_bytes().to_vec())];
        h.call_resp_body = body.as_bytes().to_vec();
        body.len()
    }

    #[test]
    fn webhook_paths_always_resume_or_reply() {
        // allow: locally masked body goes on.
        let (mut s, mut h) = webhook_session("hooked", user("mail bob@example.com"));
        let call: Value = serde_json::from_slice(h.calls[0].body.as_ref().unwrap()).unwrap();
        assert_eq!(call["messages"][0]["content"], "mail XXXXXXXXXXXXXXX");
        let tok = s.webhook_token().unwrap();
        let n = answer(&mut h, "200", r#"{"action":"allow"}"#);
        assert_eq!(s.on_webhook_response(&mut h, tok, n), Step::Continue);
        assert_eq!(sent_body(&h)["messages"][0]["content"], "mail XXXXXXXXXXXXXXX");

        // reject
        let (mut s, mut h) = webhook_session("hooked", user("hi"));
        let tok = s.webhook_token().unwrap();
        let n = answer(&mut h, "200", r#"{"action":"reject","message":"no way","status":451}"#);
        assert_eq!(s.on_webhook_response(&mut h, tok, n), Step::Pause);
        assert_eq!(rejected(&h), Some((451, "no way".into())));

        // mask: messages replaced
        let (mut s, mut h) = webhook_session("hooked", user("my name is Bob"));
        let tok = s.webhook_token().unwrap();
        let n =
            answer(&mut h, "200", r#"{"action":"mask","messages":[{"role":"user","content":"my name is [name]"}]}"#);
        assert_eq!(s.on_webhook_response(&mut h, tok, n), Step::Continue);
        assert_eq!(sent_body(&h)["messages"][0]["content"], "my name is [name]");
        assert_eq!(sent_body(&h)["model"], "m");

        // failures, fail-closed: 500, timeout (no headers), garbage, unknown action
        for (status, body) in [("500", "{}"), ("", ""), ("200", "nope"), ("200", r#"{"action":"maybe"}"#)] {
            let (mut s, mut h) = webhook_session("hooked", user("hi"));
            let tok = s.webhook_token().unwrap();
            let n = if status.is_empty() { 0 } else { answer(&mut h, status, body) };
            assert_eq!(s.on_webhook_response(&mut h, tok, n), Step::Pause, "{status} {body}");
            assert_eq!(h.replies[0].status, 503);
        }
        // fail-open
        let (mut s, mut h) = webhook_session("hooked-open", user("hi"));
        let tok = s.webhook_token().unwrap();
        assert_eq!(s.on_webhook_response(&mut h, tok, 0), Step::Continue);
        assert!(h.replies.is_empty());

        // dispatch failure, fail-closed: replies at once.
        let mut s = session();
        let mut h = host(Some("hooked"), &user("hi"));
        h.fail_calls = true;
        s.on_request_headers(&mut h, false);
        let n = h.req_body.len();
        assert_eq!(s.on_request_body(&mut h, n, true), Step::Pause);
        assert_eq!(h.replies[0].status, 503);
    }
}
