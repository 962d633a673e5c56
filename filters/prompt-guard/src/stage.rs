//! The prompt-guard stage over the core pipeline.
//!
//! Request: the route's policy (route metadata key, else the default) says whether the body
//! is read. The pipeline holds the headers and buffers the body to its end — end of stream
//! **or request trailers** — and calls [`Stage::on_request`]: every text the model reads is
//! scanned (core's `api::visit_request_texts`, every endpoint), a reject rule refuses, mask
//! rules change the parsed body in place (`x.request.json_mut()`, serialized once by the
//! pipeline), then the optional webhook is called (`Host::dispatch_http_call`,
//! `x.await_callout`, `Flow::Wait`; its answer arrives in [`Stage::on_callout`], which always
//! continues or replies).
//!
//! Response: on a route whose policy has response rules, a non-streaming answer is buffered
//! (`ResponseUse::Buffer`) and masked as JSON (every generated text and its log-probabilities)
//! or, when it is not JSON, as plain text; an SSE answer is masked event by event
//! (`ResponseUse::Modify`, `crate::stream`). Answers that cannot be masked — compressed
//! (`content-encoding` set although the pipeline asked for identity) or binary — are replaced
//! with 502 `response_unmaskable` in the response headers; a streaming request that asks for
//! log-probabilities is refused up front (400 `logprobs_unavailable`), since streamed tokens
//! cannot be masked exactly. A local reply sent by a later stage (a cache hit) passes through
//! here and is masked like a provider's answer.

use crate::config::{Config, Policy, Webhook};
use crate::inspect::{guard_plain, guard_request, guard_response, Verdict};
use crate::rules::{RuleAction, RuleSet};
use crate::stream::StreamMasker;
use serde_json::{Map, Value};
use sluice_core::api;
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Exchange, ResponseUse};
use sluice_core::host::Host;
use sluice_core::json::JsonError;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{CalloutResponse, Flow, Plugin, Stage};
use std::rc::Rc;

/// Counter of guard checks, tagged by phase, action and rule.
pub const CHECKS_METRIC: &str = "sluice_guard_checks";

/// Fields of a request the webhook receives (when present) and may replace with `mask`.
const WEBHOOK_FIELDS: &[&str] = &["messages", "prompt", "input", "instructions", "system"];

/// The configured filter (one per VM).
pub struct GuardPlugin {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
}

impl GuardPlugin {
    /// A plugin for `config`.
    pub fn new(config: Config) -> Self {
        Self { config: Rc::new(config), metrics: Rc::new(Metrics::new(1024)) }
    }
}

impl Plugin for GuardPlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(GuardStage {
            config: Rc::clone(&self.config),
            metrics: Rc::clone(&self.metrics),
            policy: None,
            inspect: false,
            decided: false,
            webhook_token: None,
            response: ResponseMode::Pass,
            verdict: String::new(),
        })
    }

    fn body_limit(&self) -> Option<usize> {
        Some(self.config.max_request_bytes)
    }
}

#[derive(Debug, Default)]
enum ResponseMode {
    /// Not inspected.
    #[default]
    Pass,
    /// A whole body: JSON, else plain text.
    Body,
    /// An SSE stream.
    Sse(Box<StreamMasker>),
}

/// One exchange.
pub struct GuardStage {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    policy: Option<Rc<Policy>>,
    /// The request body is read on this route.
    inspect: bool,
    /// `on_request` ran (the body was decided).
    decided: bool,
    webhook_token: Option<u32>,
    response: ResponseMode,
    /// The `sluice.guard` value written so far (never read back from the host).
    verdict: String,
}

fn reject_reply(status: u32, message: &str) -> LocalReply {
    let kind = if status == 403 { "permission_error" } else { "invalid_request_error" };
    LocalReply::openai_error(status, kind, "prompt_guard_rejected", message)
}

fn unmaskable(why: &str) -> LocalReply {
    LocalReply::openai_error(
        502,
        "server_error",
        "response_unmaskable",
        &format!("{}: the provider's answer {why} and cannot be masked", crate::NAME),
    )
}

/// Whether the policy reads request texts (rules or the webhook).
fn inspects_request(policy: &Policy) -> bool {
    !policy.request.is_empty() || policy.webhook.is_some()
}

/// A content type whose body is text (masked as plain text when it is not JSON).
fn is_text_type(ct: &str) -> bool {
    let ct = ct.to_ascii_lowercase();
    ct.starts_with("text/") || ["xml", "yaml", "javascript", "x-www-form-urlencoded"].iter().any(|k| ct.contains(k))
}

impl GuardStage {
    fn count(&self, h: &mut dyn Host, phase: &str, action: &str, rule: &str) {
        self.metrics.count(
            h,
            CHECKS_METRIC,
            &[("sluice_phase", phase), ("sluice_action", action), ("sluice_rule", rule)],
            1,
        );
    }

    fn set_verdict(&mut self, h: &mut dyn Host, v: String) {
        self.verdict = v;
        keys::set_filter_state(h, keys::GUARD, &self.verdict);
    }

    /// Metrics and filter state for one verdict.
    fn record(&mut self, h: &mut dyn Host, phase: &str, rules: &RuleSet, v: &Verdict, shadow: bool) {
        let prefix = if shadow { "shadow_" } else { "" };
        if v.matched.is_empty() {
            self.count(h, phase, "allow", "none");
        }
        for i in &v.matched {
            let Some(rule) = rules.rule(*i) else { continue };
            let action = if rule.masks() { "mask" } else { "reject" };
            self.count(h, phase, &format!("{prefix}{action}"), &rule.name);
        }
        let state = match (v.reject.and_then(|i| rules.rule(i)), v.matched.first().and_then(|i| rules.rule(*i))) {
            (Some(r), _) => format!("{prefix}reject:{}", r.name),
            (None, Some(r)) => format!("{prefix}mask:{}", r.name),
            (None, None) => "allow".to_string(),
        };
        if phase == "request" {
            self.set_verdict(h, state);
        } else if state != "allow" {
            let v = if self.verdict.is_empty() {
                format!("response_{state}")
            } else {
                format!("{};response_{state}", self.verdict)
            };
            self.set_verdict(h, v);
        }
    }

    fn invalid(&self, h: &mut dyn Host, e: &JsonError) -> Flow {
        self.count(h, "request", "invalid", "none");
        Flow::Reply(match e {
            JsonError::NotUtf8 => LocalReply::openai_error(
                400,
                "invalid_request_error",
                "invalid_encoding",
                &format!("{}: request body is not valid UTF-8", crate::NAME),
            ),
            JsonError::Syntax(why) => LocalReply::invalid_json(crate::NAME, why),
            JsonError::NotObject | JsonError::DuplicateKey(_) => {
                LocalReply::invalid_json(crate::NAME, "expected a JSON object")
            }
        })
    }

    fn call_webhook(&mut self, x: &mut Exchange, h: &mut dyn Host, hook: &Webhook, policy: &Policy) -> Flow {
        let mut payload = Map::new();
        payload.insert("phase".into(), Value::String("request".into()));
        payload.insert("policy".into(), Value::String(policy.name.clone()));
        let body = x.request.json();
        for key in WEBHOOK_FIELDS {
            let v = body.and_then(|b| b.get(*key)).cloned();
            // `messages` and `prompt` were always sent (null when absent); the rest when present.
            if v.is_some() || matches!(*key, "messages" | "prompt") {
                payload.insert((*key).to_string(), v.unwrap_or(Value::Null));
            }
        }
        let bytes = serde_json::to_vec(&Value::Object(payload)).unwrap_or_default();
        let headers = [
            (":method", "POST"),
            (":path", hook.path.as_str()),
            (":authority", hook.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match h.dispatch_http_call(&hook.cluster, &headers, Some(&bytes), hook.timeout) {
            Some(token) => {
                self.webhook_token = Some(token);
                x.await_callout(token);
                Flow::Wait
            }
            None => self.webhook_failed(h, hook.failure_mode, policy.shadow, "dispatch failed"),
        }
    }

    fn webhook_failed(&mut self, h: &mut dyn Host, mode: FailureMode, shadow: bool, why: &str) -> Flow {
        log::warn!("{}: webhook failed: {why}", crate::NAME);
        if mode == FailureMode::Deny && !shadow {
            self.count(h, "request", "error", "webhook");
            return Flow::Reply(LocalReply::openai_error(
                503,
                "server_error",
                "guard_unavailable",
                &format!("{}: the content check is unavailable", crate::NAME),
            ));
        }
        self.count(h, "request", if shadow { "shadow_error" } else { "error_allowed" }, "webhook");
        Flow::Continue
    }

    /// The webhook's `mask` answer: replace the fields it carries.
    fn webhook_mask(x: &mut Exchange, answer: &Value) -> bool {
        let replacements: Vec<(&str, Value)> = WEBHOOK_FIELDS
            .iter()
            .filter_map(|k| answer.get(*k).filter(|v| v.is_array() || v.is_string()).map(|v| (*k, v.clone())))
            .collect();
        if replacements.is_empty() {
            return false;
        }
        if let Some(Value::Object(body)) = x.request.json_mut() {
            for (k, v) in replacements {
                body.insert(k.to_string(), v);
            }
        }
        true
    }

    /// The end of a whole (buffered) answer: mask it as JSON, else as text.
    fn mask_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk, policy: &Policy) -> Flow {
        let apply = !policy.shadow;
        if apply && x.response.bytes > self.config.max_response_bytes {
            return self.response_too_large(h);
        }
        let rules = &policy.response;
        let verdict = if x.response.json().is_some() {
            if apply {
                let before = x.response.changed();
                let v = x.response.json_mut().map(|b| guard_response(b, rules, true)).unwrap_or_default();
                if !v.changed && !before {
                    x.response.mark_unchanged();
                }
                v
            } else {
                let mut copy = x.response.json().cloned().unwrap_or_default();
                guard_response(&mut copy, rules, false)
            }
        } else {
            // Not JSON: masked as text, so a broken or plain-text answer cannot leak; a stream
            // behind a wrong content type is masked as a stream first (matches split across
            // its events), then as text.
            let bytes = if apply { c.bytes.as_slice() } else { x.response.copy.as_deref().unwrap_or_default() };
            let text = String::from_utf8_lossy(bytes).into_owned();
            let mut v = Verdict::default();
            let mut out = None;
            if crate::stream::looks_like_sse(&text) {
                out = crate::stream::mask_whole(x.request.api, rules, text.as_bytes(), apply, &mut v.matched)
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
            }
            if let Some(masked) = guard_plain(out.as_deref().unwrap_or(&text), rules, apply, &mut v) {
                out = Some(masked);
            }
            if let (Some(masked), true) = (out, apply) {
                c.bytes = masked.into_bytes();
                c.bytes_changed = true;
                v.changed = true;
            }
            v
        };
        self.record(h, "response", rules, &verdict, policy.shadow);
        Flow::Continue
    }

    fn response_too_large(&mut self, h: &mut dyn Host) -> Flow {
        self.count(h, "response", "too_large", "none");
        self.response = ResponseMode::Pass;
        Flow::Reply(LocalReply::openai_error(
            502,
            "server_error",
            "response_too_large",
            &format!("{}: response exceeds the {}-byte inspection limit", crate::NAME, self.config.max_response_bytes),
        ))
    }
}

impl Stage for GuardStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let policy = match self.config.policy_for(x.route.str(&self.config.route_metadata_key)) {
            Ok(Some(p)) => p,
            Ok(None) => return Flow::Continue,
            Err(name) => {
                log::warn!("{}: route names unknown guard policy {name:?}", crate::NAME);
                return Flow::Reply(LocalReply::openai_error(
                    500,
                    "server_error",
                    "guard_policy_unknown",
                    &format!("{}: route names an unknown guard policy", crate::NAME),
                ));
            }
        };
        self.policy = Some(Rc::clone(&policy));
        if !policy.response.is_empty() {
            // Read in the headers phase: the pipeline then asks the provider for an
            // uncompressed answer (a compressed one could not be masked).
            x.want_response(ResponseUse::Track);
            if policy.masks_responses() && !x.request.api.is_model_call() {
                x.set_request_header(h, "accept-encoding", None);
            }
        }
        // The body is read for request rules and the webhook, and on a masking route for the
        // stream + logprobs check (generating endpoints only: an upload to another endpoint is
        // not buffered for it).
        self.inspect = inspects_request(&policy) || (policy.masks_responses() && x.request.api.generates());
        if !self.inspect || x.request.no_body {
            return Flow::Continue;
        }
        let declared = x.request.header_str("content-length").and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.config.max_request_bytes) {
            self.count(h, "request", "too_large", "none");
            self.decided = true;
            return Flow::Reply(LocalReply::body_too_large(crate::NAME, self.config.max_request_bytes));
        }
        let rewrites = !policy.shadow && (policy.request.has_mask_rules() || policy.webhook.is_some());
        x.want_body(if rewrites { BodyUse::Modify } else { BodyUse::Json });
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let Some(policy) = self.policy.clone() else { return Flow::Continue };
        if !self.inspect || x.request.no_body || self.decided {
            return Flow::Continue;
        }
        self.decided = true;
        let rules = inspects_request(&policy);
        if let Some(e) = x.request.json_error().cloned() {
            // No parse, no pass when rules must see the text; a body that is not JSON cannot
            // ask for log-probabilities either.
            return if rules { self.invalid(h, &e) } else { Flow::Continue };
        }
        if x.request.json().is_none() {
            return if rules { self.invalid(h, &JsonError::Syntax("empty body".into())) } else { Flow::Continue };
        }
        if policy.masks_responses() && x.request.stream() && x.request.json().is_some_and(api::wants_logprobs) {
            self.count(h, "request", "reject", "logprobs");
            self.set_verdict(h, "reject:logprobs".into());
            return Flow::Reply(LocalReply::openai_error(
                400,
                "invalid_request_error",
                "logprobs_unavailable",
                &format!(
                    "{}: log-probabilities cannot be streamed on this route (its answers are masked); ask without stream or without logprobs",
                    crate::NAME
                ),
            ));
        }
        if !rules {
            return Flow::Continue;
        }
        let apply = !policy.shadow;
        let before = x.request.changed();
        let verdict = match x.request.json_mut() {
            Some(body) => guard_request(body, &policy.request, policy.roles.as_deref(), apply),
            None => Verdict::default(),
        };
        if !verdict.changed && !before {
            x.request.mark_unchanged();
        }
        self.record(h, "request", &policy.request, &verdict, policy.shadow);
        if let (Some(i), false) = (verdict.reject, policy.shadow) {
            if let Some(RuleAction::Reject { status, message }) = policy.request.rule(i).map(|r| &r.action) {
                return Flow::Reply(reject_reply(*status, message));
            }
        }
        match &policy.webhook {
            Some(hook) => self.call_webhook(x, h, hook, &policy),
            None => Flow::Continue,
        }
    }

    fn on_callout(&mut self, x: &mut Exchange, h: &mut dyn Host, r: CalloutResponse) -> Flow {
        if self.webhook_token != Some(r.token) {
            return Flow::Continue;
        }
        self.webhook_token = None;
        let Some(policy) = self.policy.clone() else { return Flow::Continue };
        let Some(hook) = policy.webhook.clone() else { return Flow::Continue };
        if !r.ok() {
            let why = r
                .status
                .map_or_else(|| "no response (timeout or connection failure)".to_string(), |s| format!("status {s}"));
            return self.webhook_failed(h, hook.failure_mode, policy.shadow, &why);
        }
        let Some(answer) = r.body.as_deref().and_then(|b| serde_json::from_slice::<Value>(b).ok()) else {
            return self.webhook_failed(h, hook.failure_mode, policy.shadow, "answer is not JSON");
        };
        let prefix = if policy.shadow { "shadow_" } else { "" };
        match answer.get("action").and_then(Value::as_str).unwrap_or_default() {
            "allow" => {
                self.count(h, "request", "allow", "webhook");
                Flow::Continue
            }
            "reject" => {
                self.count(h, "request", &format!("{prefix}reject"), "webhook");
                self.set_verdict(h, format!("{prefix}reject:webhook"));
                if policy.shadow {
                    return Flow::Continue;
                }
                let status = answer
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u32::try_from(s).ok())
                    .filter(|s| (400..=599).contains(s))
                    .unwrap_or(403);
                let message =
                    answer.get("message").and_then(Value::as_str).unwrap_or("request blocked by the content check");
                Flow::Reply(reject_reply(status, message))
            }
            "mask" => {
                let carries =
                    WEBHOOK_FIELDS.iter().any(|k| answer.get(*k).is_some_and(|v| v.is_array() || v.is_string()));
                if !carries {
                    return self.webhook_failed(
                        h,
                        hook.failure_mode,
                        policy.shadow,
                        "mask answer without a messages array",
                    );
                }
                self.count(h, "request", &format!("{prefix}mask"), "webhook");
                self.set_verdict(h, format!("{prefix}mask:webhook"));
                if !policy.shadow {
                    Self::webhook_mask(x, &answer);
                }
                Flow::Continue
            }
            other => self.webhook_failed(h, hook.failure_mode, policy.shadow, &format!("unknown action {other:?}")),
        }
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let Some(policy) = self.policy.clone() else { return Flow::Continue };
        if policy.response.is_empty() {
            return Flow::Continue;
        }
        let apply = !policy.shadow;
        let empty = x.response.header("content-length").is_some_and(|v| v.trim_ascii() == b"0");
        if x.response.encoded && !empty {
            if !apply {
                return Flow::Continue;
            }
            self.count(h, "response", "uninspectable", "none");
            return Flow::Reply(unmaskable("is compressed (content-encoding)"));
        }
        match x.response.kind {
            BodyKind::Sse => {
                x.want_response(if apply { ResponseUse::Modify } else { ResponseUse::Track });
                let m = StreamMasker::new(x.request.api, policy.response.max_mask_len(), apply);
                self.response = ResponseMode::Sse(Box::new(m));
            }
            BodyKind::Json | BodyKind::Unknown => {
                let declared = x
                    .response
                    .header("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.trim().parse::<usize>().ok());
                if apply && declared.is_some_and(|n| n > self.config.max_response_bytes) {
                    return self.response_too_large(h);
                }
                x.want_response(if apply { ResponseUse::Buffer } else { ResponseUse::Track });
                self.response = ResponseMode::Body;
            }
            BodyKind::Other => {
                let ct = x.response.header("content-type").map(sluice_core::json::lossy).unwrap_or_default();
                if !is_text_type(&ct) {
                    if !apply || empty {
                        return Flow::Continue;
                    }
                    self.count(h, "response", "uninspectable", "none");
                    return Flow::Reply(unmaskable(&format!("is not text ({ct})")));
                }
                x.want_response(if apply { ResponseUse::Buffer } else { ResponseUse::Track });
                self.response = ResponseMode::Body;
            }
        }
        Flow::Continue
    }

    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        let Some(policy) = self.policy.clone() else { return Flow::Continue };
        match &mut self.response {
            ResponseMode::Pass => Flow::Continue,
            ResponseMode::Sse(m) => {
                m.on_chunk(&policy.response, c);
                if c.end {
                    let v = Verdict { reject: None, matched: m.matched.clone(), changed: !m.applied.is_empty() };
                    self.response = ResponseMode::Pass;
                    self.record(h, "response", &policy.response, &v, policy.shadow);
                }
                Flow::Continue
            }
            ResponseMode::Body => {
                if !c.end {
                    return Flow::Continue;
                }
                self.response = ResponseMode::Pass;
                self.mask_body(x, h, c, &policy)
            }
        }
    }

    fn on_done(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        // The pipeline refused a chunked body over the cap before `on_request` could run.
        if self.inspect && !self.decided && x.response.local && x.response.status == 413 {
            self.count(h, "request", "too_large", "none");
        }
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
