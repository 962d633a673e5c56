//! The per-request state machine: pick the route's rules, reserve an estimate when the
//! request body is complete, refuse what does not fit, and replace the reservation with the
//! real usage when the response ends (or release it when the upstream failed).
//!
//! Written against [`Host`] so native tests drive it with `FakeHost`; `filter.rs` only maps
//! the verdicts to proxy-wasm actions and performs the gRPC calls.

use crate::budget::{counter_key, fnv1a, Reserved, Store, StoreError};
use crate::config::{Config, Counts, KeyPart, Mode, Rule, FILTER};
use crate::rls::{self, Code, Descriptor};
use serde_json::Value;
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::sse::SseParser;
use sluice_core::usage::{estimate_tokens_from_bytes, usage_from_json, StreamUsage, TokenUsage};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// What the glue should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let the request go on.
    Continue,
    /// Wait (for more body).
    Pause,
    /// A local reply was sent: return Pause.
    Replied,
    /// Send this `RateLimitRequest` to the RLS, then call [`RequestLimiter::on_rls_response`].
    CallRls(Vec<u8>),
}

/// One rule's reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Charge {
    rule: usize,
    /// Local: the counter key; RLS: unused.
    key: String,
    /// Local: window starts the reservation went into.
    starts: Vec<u64>,
    /// Units reserved.
    amount: u64,
    /// RLS: the key values, for correction descriptors.
    values: Vec<String>,
}

/// The window reported in `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tightest {
    limit: u64,
    remaining: u64,
    reset_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No rules apply.
    Off,
    /// Waiting for the request body.
    Body,
    /// Waiting for the RLS answer.
    Rls,
    /// Admitted with reservations outstanding.
    Reserved,
    /// Admitted without reservations (failure mode allow).
    Unmetered,
    /// We replied locally.
    Replied,
    /// Reservations settled.
    Settled,
}

/// Per-request limiter.
pub struct RequestLimiter {
    cfg: Rc<Config>,
    set: String,
    phase: Phase,
    values: Vec<Vec<String>>,
    input_est: u64,
    output_est: u64,
    charges: Vec<Charge>,
    tokens: Option<Tightest>,
    requests: Option<Tightest>,
    /// RLS descriptors sent: (rule, window).
    sent: Vec<(usize, usize)>,
    status: u32,
    streaming: bool,
    sse: SseParser,
    stream_usage: StreamUsage,
    body: Vec<u8>,
    body_overflow: bool,
    /// Corrections for the RLS, taken by the glue after the response ends.
    pub corrections: Option<Vec<u8>>,
    /// How the reservation was settled (`reconciled`, `estimated`, `released`), once, for metrics.
    pub settled: Option<&'static str>,
}

fn now_ms<H: Host>(host: &H) -> u64 {
    host.now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn header_value<H: Host>(host: &H, name: &str) -> Option<String> {
    host.request_header(name).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

fn counts_name(c: Counts) -> &'static str {
    match c {
        Counts::InputTokens => "input_tokens",
        Counts::OutputTokens => "output_tokens",
        Counts::TotalTokens => "total_tokens",
        Counts::Requests => "requests",
    }
}

/// Units a rule counts for a usage.
fn amount_of(counts: Counts, input: u64, output: u64) -> u64 {
    match counts {
        Counts::InputTokens => input,
        Counts::OutputTokens => output,
        Counts::TotalTokens => input.saturating_add(output),
        Counts::Requests => 1,
    }
}

/// Prompt bytes, output cap and model of a chat request, the way `sluice_core::wire`'s
/// `ChatRequest::prompt_bytes` counts them (message texts and text parts, tool-call
/// arguments, legacy `prompt`), read from a `Value` to keep the wasm small. A body that is not
/// a JSON object counts all its bytes as prompt.
pub fn request_facts(body: &[u8]) -> (usize, Option<u64>, Option<String>) {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return (body.len(), None, None);
    };
    let str_len = |v: Option<&Value>| v.and_then(Value::as_str).map_or(0, str::len);
    let mut bytes: usize = 0;
    for m in req.get("messages").and_then(Value::as_array).into_iter().flatten() {
        match m.get("content") {
            Some(Value::String(s)) => bytes = bytes.saturating_add(s.len()),
            Some(Value::Array(parts)) => {
                for p in parts {
                    bytes = bytes.saturating_add(str_len(p.get("text")));
                }
            }
            _ => {}
        }
        for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            bytes = bytes.saturating_add(str_len(call.get("function").and_then(|f| f.get("arguments"))));
        }
    }
    match req.get("prompt") {
        Some(Value::String(s)) => bytes = bytes.saturating_add(s.len()),
        Some(Value::Array(items)) => {
            for i in items {
                bytes = bytes.saturating_add(str_len(Some(i)));
            }
        }
        _ => {}
    }
    let max_out = ["max_completion_tokens", "max_tokens"].iter().find_map(|k| req.get(*k).and_then(Value::as_u64));
    let model = req.get("model").and_then(Value::as_str).map(str::to_string);
    (bytes, max_out, model)
}

/// An OpenAI-style error reply, the same shape as `LocalReply::openai_error`, written without
/// serializing a `serde_json::Value` (which pulls float formatting into the wasm).
pub fn error_reply(status: u32, kind: &str, code: &str, message: &str) -> LocalReply {
    let body = format!(
        "{{\"error\":{{\"message\":{},\"type\":{},\"param\":null,\"code\":{}}}}}",
        json_string(message),
        json_string(kind),
        json_string(code)
    );
    LocalReply { status, headers: vec![("content-type".into(), "application/json".into())], body: body.into_bytes() }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

impl RequestLimiter {
    /// A limiter for one request.
    pub fn new(cfg: Rc<Config>) -> Self {
        Self {
            cfg,
            set: String::new(),
            phase: Phase::Off,
            values: Vec::new(),
            input_est: 0,
            output_est: 0,
            charges: Vec::new(),
            tokens: None,
            requests: None,
            sent: Vec::new(),
            status: 0,
            streaming: false,
            sse: SseParser::new(),
            stream_usage: StreamUsage::new(),
            body: Vec::new(),
            body_overflow: false,
            corrections: None,
            settled: None,
        }
    }

    /// Where this request's counters live.
    pub fn mode(&self) -> Mode {
        self.cfg.mode.clone()
    }

    fn rules(&self) -> &[Rule] {
        self.cfg.rule_set(&self.set).unwrap_or(&[])
    }

    /// Request headers: choose the rule set; decide now when there is no body.
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Verdict {
        let set =
            keys::route_metadata(host, &self.cfg.route_metadata_key).or_else(|| self.cfg.default_rule_set.clone());
        let Some(set) = set else { return Verdict::Continue };
        if set == "none" {
            return Verdict::Continue;
        }
        if self.cfg.rule_set(&set).is_none() {
            log::warn!("{FILTER}: route names unknown rule set {set:?}");
            self.phase = Phase::Replied;
            host.send_reply(&error_reply(
                500,
                "server_error",
                "gateway_misconfigured",
                &format!("{FILTER}: gateway filter is misconfigured"),
            ));
            return Verdict::Replied;
        }
        self.set = set;
        if end_of_stream {
            // No body (GET /v1/models...): nothing to generate, so no output is reserved.
            return self.decide(host, None);
        }
        self.phase = Phase::Body;
        Verdict::Pause
    }

    /// Request body: wait for the whole body, then decide.
    pub fn on_request_body<H: Host>(&mut self, host: &mut H, body_size: usize, end_of_stream: bool) -> Verdict {
        if self.phase != Phase::Body {
            return Verdict::Continue;
        }
        if body_size > self.cfg.max_body_bytes {
            self.phase = Phase::Replied;
            host.send_reply(&error_reply(
                413,
                "invalid_request_error",
                "request_too_large",
                &format!("{FILTER}: request body exceeds the gateway limit of {} bytes", self.cfg.max_body_bytes),
            ));
            return Verdict::Replied;
        }
        if !end_of_stream {
            return Verdict::Pause;
        }
        let body = host.request_body(0, body_size).unwrap_or_default();
        self.decide(host, Some(&body))
    }

    fn key_values<H: Host>(&self, host: &H, rule: &Rule, model: Option<&str>) -> Vec<String> {
        rule.key
            .iter()
            .map(|part| {
                let v = match part {
                    KeyPart::User => keys::filter_state(host, keys::USER)
                        .or_else(|| self.cfg.user_header.as_deref().and_then(|h| header_value(host, h))),
                    KeyPart::Team => keys::filter_state(host, keys::TEAM)
                        .or_else(|| self.cfg.team_header.as_deref().and_then(|h| header_value(host, h))),
                    KeyPart::ApiKey => header_value(host, "authorization")
                        .map(|a| a.strip_prefix("Bearer ").unwrap_or(&a).trim().to_string())
                        .or_else(|| header_value(host, "x-api-key"))
                        .map(|k| format!("k{:016x}", fnv1a(k.as_bytes()))),
                    KeyPart::Route => host
                        .property(&["xds", "route_name"])
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .filter(|s| !s.is_empty()),
                    KeyPart::Model => {
                        model.map(str::to_string).or_else(|| keys::filter_state(host, keys::REQUESTED_MODEL))
                    }
                    KeyPart::Header(h) => header_value(host, h),
                };
                // Callers without the value share one bucket (never an exemption).
                let mut v = v.unwrap_or_else(|| "_none".into());
                v.truncate(256);
                v
            })
            .collect()
    }

    /// Estimate, then reserve (local) or ask the RLS.
    fn decide<H: Host>(&mut self, host: &mut H, body: Option<&[u8]>) -> Verdict {
        let (prompt_bytes, max_out, model) = request_facts(body.unwrap_or_default());
        self.input_est = estimate_tokens_from_bytes(prompt_bytes);
        self.output_est = match body {
            Some(_) => max_out.unwrap_or(self.cfg.default_output_tokens).min(self.cfg.max_output_tokens),
            None => 0,
        };
        let rules: Vec<Rule> = self.rules().to_vec();
        self.values = rules.iter().map(|r| self.key_values(host, r, model.as_deref())).collect();
        match self.cfg.mode.clone() {
            Mode::Local => self.reserve_local(host, &rules),
            Mode::Rls(rls_cfg) => {
                let mut descriptors = Vec::new();
                self.sent.clear();
                for (ri, rule) in rules.iter().enumerate() {
                    let amount = amount_of(rule.counts, self.input_est, self.output_est);
                    self.charges.push(Charge {
                        rule: ri,
                        key: String::new(),
                        starts: Vec::new(),
                        amount,
                        values: self.values.get(ri).cloned().unwrap_or_default(),
                    });
                    for (wi, w) in rule.windows.iter().enumerate() {
                        descriptors.push(self.descriptor(
                            rule,
                            ri,
                            w.name.as_str(),
                            w.limit,
                            w.unit.map_or(0, |u| u as u32),
                            amount,
                        ));
                        self.sent.push((ri, wi));
                    }
                }
                self.phase = Phase::Rls;
                Verdict::CallRls(rls::encode_request(&rls_cfg.domain, &descriptors))
            }
        }
    }

    fn descriptor(&self, rule: &Rule, ri: usize, window: &str, limit: u64, unit: u32, hits: u64) -> Descriptor {
        let mut entries = vec![
            ("rule".to_string(), format!("{}.{}", self.set, rule.name)),
            ("window".to_string(), window.to_string()),
        ];
        let values = self.values.get(ri).cloned().unwrap_or_default();
        for (part, v) in rule.key.iter().zip(values) {
            entries.push((part.name(), v));
        }
        Descriptor { entries, limit: u32::try_from(limit).unwrap_or(u32::MAX), unit, hits }
    }

    fn note_window(&mut self, counts: Counts, limit: u64, remaining: u64, reset_ms: u64) {
        let slot = if counts.is_tokens() { &mut self.tokens } else { &mut self.requests };
        let t = Tightest { limit, remaining, reset_ms };
        match slot {
            Some(cur) if (cur.remaining, cur.reset_ms) <= (remaining, reset_ms) => {}
            _ => *slot = Some(t),
        }
    }

    fn reserve_local<H: Host>(&mut self, host: &mut H, rules: &[Rule]) -> Verdict {
        let now = now_ms(host);
        let shadow = self.cfg.shadow;
        let mut shadow_hit: Option<(usize, usize)> = None;
        let mut failure: Option<StoreError> = None;
        let mut refused: Option<(usize, usize, u64, u64)> = None;
        {
            let mut store = Store::new(host, self.cfg.cas_retries, self.cfg.max_counters);
            for (ri, rule) in rules.iter().enumerate() {
                let values = self.values.get(ri).cloned().unwrap_or_default();
                let key = counter_key(&self.set, &rule.name, &values);
                let amount = amount_of(rule.counts, self.input_est, self.output_est);
                match store.reserve(&key, &rule.windows, amount, now, shadow) {
                    Ok(Reserved::Fits { starts, used }) => {
                        for (w, u) in rule.windows.iter().zip(&used) {
                            self.note_window(rule.counts, w.limit, w.limit.saturating_sub(*u), w.ms_to_reset(now));
                        }
                        self.charges.push(Charge { rule: ri, key, starts, amount, values });
                    }
                    Ok(Reserved::Over { window, starts: Some(starts), .. }) => {
                        shadow_hit.get_or_insert((ri, window));
                        self.charges.push(Charge { rule: ri, key, starts, amount, values });
                    }
                    Ok(Reserved::Over { window, used, starts: None }) => {
                        refused = Some((ri, window, used, amount));
                        break;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if refused.is_some() || failure.is_some() {
                for c in self.charges.drain(..) {
                    if let Some(rule) = rules.get(c.rule) {
                        let delta = -i64::try_from(c.amount).unwrap_or(i64::MAX);
                        if let Err(e) = store.adjust(&c.key, &rule.windows, &c.starts, delta) {
                            log::warn!("{FILTER}: rollback of {} failed: {e}", c.key);
                        }
                    }
                }
            }
        }
        if let Some(e) = failure {
            return self.fail(host, &e.to_string());
        }
        if let Some((ri, wi, used, amount)) = refused {
            let Some(rule) = rules.get(ri) else { return self.fail(host, "rule") };
            let Some(w) = rule.windows.get(wi) else { return self.fail(host, "window") };
            return self.refuse(host, rule, wi, w.limit.saturating_sub(used), w.ms_to_reset(now), Some((used, amount)));
        }
        if let Some((ri, wi)) = shadow_hit {
            let name = rules.get(ri).map(|r| r.name.clone()).unwrap_or_default();
            let window = rules.get(ri).and_then(|r| r.windows.get(wi)).map(|w| w.name.clone()).unwrap_or_default();
            log::info!("{FILTER}: shadow: would refuse rule {name:?} window {window}");
            keys::set_filter_state(host, keys::RATELIMIT, &format!("shadow:{name}/{window}"));
        } else {
            keys::set_filter_state(host, keys::RATELIMIT, "ok");
        }
        self.phase = if self.charges.is_empty() { Phase::Unmetered } else { Phase::Reserved };
        Verdict::Continue
    }

    /// The RLS answered (`grpc_status` 0 = OK), or the call could not be made.
    pub fn on_rls_response<H: Host>(&mut self, host: &mut H, grpc_status: u32, body: Option<&[u8]>) -> Verdict {
        if self.phase != Phase::Rls {
            return Verdict::Continue;
        }
        let resp = match (grpc_status, body.and_then(rls::decode_response)) {
            (0, Some(r)) if r.overall != Code::Unknown => r,
            (0, _) => return self.fail(host, "rls_bad_response"),
            (s, _) => return self.fail(host, &format!("rls_unavailable_{s}")),
        };
        let rules: Vec<Rule> = self.rules().to_vec();
        let mut over: Option<(usize, usize, u64, u64)> = None;
        for (i, st) in resp.statuses.iter().enumerate() {
            let Some((ri, wi)) = self.sent.get(i).copied() else { continue };
            let Some(rule) = rules.get(ri) else { continue };
            let Some(w) = rule.windows.get(wi) else { continue };
            let reset_ms =
                if st.reset_secs > 0 { st.reset_secs.saturating_mul(1000) } else { w.ms_to_reset(now_ms(host)) };
            if st.code == Code::OverLimit && over.is_none() {
                over = Some((ri, wi, st.remaining, reset_ms));
            }
            self.note_window(rule.counts, w.limit, st.remaining, reset_ms);
        }
        if resp.overall == Code::OverLimit {
            // The RLS counted the hits already and cannot take them back: no release in shared mode.
            let (ri, wi, rem, reset) = over.unwrap_or((0, 0, 0, 1000));
            let name = rules.get(ri).map(|r| r.name.clone()).unwrap_or_default();
            let window = rules.get(ri).and_then(|r| r.windows.get(wi)).map(|w| w.name.clone()).unwrap_or_default();
            if self.cfg.shadow {
                keys::set_filter_state(host, keys::RATELIMIT, &format!("shadow:{name}/{window}"));
                self.phase = Phase::Reserved;
                return Verdict::Continue;
            }
            let Some(rule) = rules.get(ri) else { return self.fail(host, "rule") };
            return self.refuse(host, rule, wi, rem, reset, None);
        }
        keys::set_filter_state(host, keys::RATELIMIT, "ok");
        self.phase = Phase::Reserved;
        Verdict::Continue
    }

    fn fail<H: Host>(&mut self, host: &mut H, why: &str) -> Verdict {
        log::warn!("{FILTER}: cannot count ({why}); failure mode {:?}", self.cfg.failure_mode);
        keys::set_filter_state(host, keys::RATELIMIT, &format!("error:{why}"));
        self.charges.clear();
        match self.cfg.failure_mode {
            FailureMode::Allow => {
                self.phase = Phase::Unmetered;
                Verdict::Continue
            }
            FailureMode::Deny => {
                self.phase = Phase::Replied;
                host.send_reply(&error_reply(
                    503,
                    "server_error",
                    "ratelimit_unavailable",
                    &format!("{FILTER}: the rate limiter is unavailable ({why}); request refused"),
                ));
                Verdict::Replied
            }
        }
    }

    fn refuse<H: Host>(
        &mut self,
        host: &mut H,
        rule: &Rule,
        wi: usize,
        remaining: u64,
        reset_ms: u64,
        need: Option<(u64, u64)>,
    ) -> Verdict {
        let Some(w) = rule.windows.get(wi) else { return self.fail(host, "window") };
        let what = counts_name(rule.counts);
        let retry = secs_ceil(reset_ms);
        let detail = match need {
            Some((used, amount)) => format!("; {used} used, this request needs {amount}"),
            None => String::new(),
        };
        let message = format!(
            "Rate limit exceeded: rule \"{}\" allows {} {what} per {} window{detail}. Retry in {retry}s.",
            rule.name, w.limit, w.name
        );
        let kind = if rule.counts.is_tokens() { "tokens" } else { "requests" };
        let unit = if rule.counts.is_tokens() { "tokens" } else { "requests" };
        let reply = error_reply(429, kind, "rate_limit_exceeded", &message)
            .with_header("x-envoy-ratelimited", "true")
            .with_header("retry-after", &retry.to_string())
            .with_header(&format!("x-ratelimit-limit-{unit}"), &w.limit.to_string())
            .with_header(&format!("x-ratelimit-remaining-{unit}"), &remaining.to_string())
            .with_header(&format!("x-ratelimit-reset-{unit}"), &format!("{retry}s"))
            .with_header("x-sluice-ratelimit-window", &format!("{}/{}", rule.name, w.name));
        keys::set_filter_state(host, keys::RATELIMIT, &format!("refused:{}/{}", rule.name, w.name));
        self.phase = Phase::Replied;
        host.send_reply(&reply);
        Verdict::Replied
    }

    /// Response headers: add `x-ratelimit-*`, note status and whether the body streams.
    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) {
        if !matches!(self.phase, Phase::Reserved | Phase::Unmetered) {
            return;
        }
        for (unit, t) in [("tokens", self.tokens), ("requests", self.requests)] {
            if let Some(t) = t {
                host.set_response_header(&format!("x-ratelimit-limit-{unit}"), Some(t.limit.to_string().as_bytes()));
                host.set_response_header(
                    &format!("x-ratelimit-remaining-{unit}"),
                    Some(t.remaining.to_string().as_bytes()),
                );
                host.set_response_header(
                    &format!("x-ratelimit-reset-{unit}"),
                    Some(format!("{}s", secs_ceil(t.reset_ms)).as_bytes()),
                );
            }
        }
        self.status =
            host.response_header(":status").and_then(|s| String::from_utf8_lossy(&s).trim().parse().ok()).unwrap_or(0);
        self.streaming = host
            .response_header("content-type")
            .is_some_and(|ct| String::from_utf8_lossy(&ct).to_ascii_lowercase().contains("text/event-stream"));
        if end_of_stream {
            self.settle(host, None);
        }
    }

    /// Response body chunk: read usage without holding the body back.
    pub fn on_response_body<H: Host>(&mut self, host: &mut H, size: usize, end_of_stream: bool) {
        if self.phase != Phase::Reserved {
            return;
        }
        let chunk = host.response_body(0, size).unwrap_or_default();
        if self.streaming {
            for ev in self.sse.feed(&chunk) {
                self.stream_usage.observe(&ev);
            }
        } else if !self.body_overflow {
            if self.body.len().saturating_add(chunk.len()) > self.cfg.max_response_bytes {
                self.body_overflow = true;
                self.body = Vec::new();
            } else {
                self.body.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            let usage = if self.streaming {
                for ev in self.sse.finish() {
                    self.stream_usage.observe(&ev);
                }
                self.stream_usage.usage()
            } else if self.body_overflow {
                None
            } else {
                usage_from_json(&self.body)
            };
            self.settle(host, usage);
        }
    }

    /// The stream ended: a reservation never settled belongs to a failed or reset request.
    pub fn on_log<H: Host>(&mut self, host: &mut H) {
        if self.phase == Phase::Reserved {
            self.release(host);
        }
    }

    /// Replace the reservation with the real usage (or keep it when there is none, or
    /// release it when the upstream failed).
    fn settle<H: Host>(&mut self, host: &mut H, usage: Option<TokenUsage>) {
        if self.phase != Phase::Reserved {
            self.phase = Phase::Settled;
            return;
        }
        if !(200..300).contains(&self.status) {
            self.release(host);
            return;
        }
        match usage {
            Some(u) => self.apply_real(host, u.input, u.output),
            None => {
                // No usage: the estimate stands and is what was counted.
                log::debug!("{FILTER}: no usage in response; reservation stands as the estimate");
                self.phase = Phase::Settled;
                self.settled = Some("estimated");
            }
        }
    }

    fn release<H: Host>(&mut self, host: &mut H) {
        self.settled = Some("released");
        if matches!(self.cfg.mode, Mode::Rls(_)) {
            // The RLS cannot decrement: the reservation stays counted (documented bound).
            self.phase = Phase::Settled;
            return;
        }
        self.apply_deltas(host, |_, c| -i64::try_from(c.amount).unwrap_or(i64::MAX));
    }

    fn apply_real<H: Host>(&mut self, host: &mut H, input: u64, output: u64) {
        self.settled = Some("reconciled");
        self.apply_deltas(host, |rule, c| {
            let real = i64::try_from(amount_of(rule.counts, input, output)).unwrap_or(i64::MAX);
            real.saturating_sub(i64::try_from(c.amount).unwrap_or(i64::MAX))
        });
    }

    fn apply_deltas<H: Host>(&mut self, host: &mut H, delta_of: impl Fn(&Rule, &Charge) -> i64) {
        self.phase = Phase::Settled;
        let rules: Vec<Rule> = self.rules().to_vec();
        let charges = std::mem::take(&mut self.charges);
        match self.cfg.mode.clone() {
            Mode::Local => {
                let mut store = Store::new(host, self.cfg.cas_retries, self.cfg.max_counters);
                for c in &charges {
                    let Some(rule) = rules.get(c.rule) else { continue };
                    let delta = delta_of(rule, c);
                    if let Err(e) = store.adjust(&c.key, &rule.windows, &c.starts, delta) {
                        log::warn!("{FILTER}: correction of {} by {delta} failed: {e}", c.key);
                    }
                }
            }
            Mode::Rls(rls_cfg) => {
                let mut descriptors = Vec::new();
                for c in &charges {
                    let Some(rule) = rules.get(c.rule) else { continue };
                    let delta = delta_of(rule, c);
                    if delta <= 0 {
                        continue; // the RLS cannot decrement (documented bound)
                    }
                    for w in &rule.windows {
                        descriptors.push(self.descriptor(
                            rule,
                            c.rule,
                            &w.name,
                            w.limit,
                            w.unit.map_or(0, |u| u as u32),
                            delta.unsigned_abs(),
                        ));
                    }
                }
                if !descriptors.is_empty() {
                    self.corrections = Some(rls::encode_request(&rls_cfg.domain, &descriptors));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;
    use std::time::{Duration, SystemTime};

    const CFG: &str = r#"{
        "user_header": "x-user",
        "default_output_tokens": 10,
        "default_rule_set": "tiered",
        "rule_sets": {
          "tiered": [{"name": "per-user", "key": ["user"], "count": "total_tokens",
            "windows": [{"window": "minute", "limit": 150}, {"window": "hour", "limit": 300}]}],
          "input": [{"name": "input", "key": ["user"], "count": "input_tokens", "windows": [{"window": "hour", "limit": 70}]}]
        }
    }"#;

    fn cfg(json: &str) -> Rc<Config> {
        Rc::new(Config::from_json(json.as_bytes()).unwrap())
    }

    /// 40 bytes of prompt = 10 tokens.
    fn body(max_tokens: Option<u64>, stream: bool) -> Vec<u8> {
        let mut v = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(40)}]});
        if let Some(m) = max_tokens {
            v["max_tokens"] = m.into();
        }
        if stream {
            v["stream"] = true.into();
        }
        serde_json::to_vec(&v).unwrap()
    }

    fn host(shared: &FakeHost, user: &str, secs: u64) -> FakeHost {
        let mut h = FakeHost::with_request_headers(&[("x-user", user)]);
        h.shared = shared.shared.clone();
        h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        h
    }

    /// Run one request to admission. Returns the limiter and host.
    fn admit(
        c: &Rc<Config>,
        shared: &mut FakeHost,
        user: &str,
        secs: u64,
        b: &[u8],
    ) -> (RequestLimiter, FakeHost, Verdict) {
        let mut h = host(shared, user, secs);
        h.req_body = b.to_vec();
        let mut l = RequestLimiter::new(c.clone());
        assert_eq!(l.on_request_headers(&mut h, false), Verdict::Pause);
        let v = l.on_request_body(&mut h, b.len(), true);
        shared.shared = h.shared.clone();
        (l, h, v)
    }

    fn respond_json(l: &mut RequestLimiter, h: &mut FakeHost, shared: &mut FakeHost, status: &str, body: &str) {
        h.shared = shared.shared.clone();
        h.resp_headers =
            vec![(":status".into(), status.as_bytes().to_vec()), ("content-type".into(), b"application/json".to_vec())];
        l.on_response_headers(h, false);
        h.resp_body = body.as_bytes().to_vec();
        l.on_response_body(h, body.len(), true);
        l.on_log(h);
        shared.shared = h.shared.clone();
    }

    fn used(c: &Config, shared: &mut FakeHost, set: &str, user: &str, secs: u64) -> Vec<u64> {
        let rule = &c.rule_set(set).unwrap()[0];
        let key = counter_key(set, &rule.name, &[user.to_string()]);
        Store::new(shared, 10, 100).peek(&key, &rule.windows, secs * 1000)
    }

    const USAGE_30: &str = r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;

    #[test]
    fn reservation_replaced_by_real_usage() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, v) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        assert_eq!(v, Verdict::Continue);
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![60, 60]);
        respond_json(&mut l, &mut h, &mut shared, "200", USAGE_30);
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![30, 30]);
        assert_eq!(h.resp_header("x-ratelimit-limit-tokens").as_deref(), Some("150"));
        assert_eq!(h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("90"));
        assert_eq!(h.resp_header("x-ratelimit-reset-tokens").as_deref(), Some("50s"));
        assert_eq!(h.prop(&[keys::RATELIMIT]).as_deref(), Some("ok"));
    }

    #[test]
    fn refuses_when_reservation_does_not_fit_and_other_users_pass() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        for _ in 0..5 {
            let (mut l, mut h, v) = admit(&c, &mut shared, "alice", 10, &body(Some(20), false));
            assert_eq!(v, Verdict::Continue);
            respond_json(&mut l, &mut h, &mut shared, "200", USAGE_30);
        }
        let (_, h, v) = admit(&c, &mut shared, "alice", 10, &body(Some(20), false));
        assert_eq!(v, Verdict::Replied);
        let r = &h.replies[0];
        assert_eq!(r.status, 429);
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains("per minute window"), "{text}");
        assert!(r.headers.contains(&("x-envoy-ratelimited".into(), "true".into())));
        assert!(r.headers.contains(&("retry-after".into(), "50".into())));
        assert!(r.headers.contains(&("x-ratelimit-remaining-tokens".into(), "0".into())));
        assert_eq!(h.prop(&[keys::RATELIMIT]).as_deref(), Some("refused:per-user/minute"));
        // nothing was added by the refused request
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![150, 150]);
        let (_, _, v) = admit(&c, &mut shared, "bob", 10, &body(Some(20), false));
        assert_eq!(v, Verdict::Continue);
        // next minute: 150 more fit, then the hour refuses
        for _ in 0..5 {
            let (mut l, mut h, v) = admit(&c, &mut shared, "alice", 70, &body(Some(20), false));
            assert_eq!(v, Verdict::Continue);
            respond_json(&mut l, &mut h, &mut shared, "200", USAGE_30);
        }
        let (_, h, v) = admit(&c, &mut shared, "alice", 130, &body(Some(20), false));
        assert_eq!(v, Verdict::Replied);
        assert!(String::from_utf8_lossy(&h.replies[0].body).contains("per hour window"));
    }

    #[test]
    fn failed_or_reset_upstream_releases() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        respond_json(&mut l, &mut h, &mut shared, "503", r#"{"error":{}}"#);
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![0, 0]);
        // reset: headers but no end of stream, then on_log
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), true));
        h.resp_headers =
            vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
        l.on_response_headers(&mut h, false);
        h.resp_body = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".to_vec();
        let n = h.resp_body.len();
        l.on_response_body(&mut h, n, false);
        l.on_log(&mut h);
        shared.shared = h.shared.clone();
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![0, 0]);
    }

    #[test]
    fn stream_usage_chunk_replaces_reservation_exactly() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(100), true));
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![110, 110]);
        h.resp_headers =
            vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
        l.on_response_headers(&mut h, false);
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"a b\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":7,\"total_tokens\":17}}\n\ndata: [DONE]\n\n";
        // split mid-event to prove partial events carry over
        let (a, b) = stream.split_at(70);
        h.resp_body = a.as_bytes().to_vec();
        l.on_response_body(&mut h, a.len(), false);
        h.resp_body = b.as_bytes().to_vec();
        l.on_response_body(&mut h, b.len(), false);
        h.resp_body = Vec::new();
        l.on_response_body(&mut h, 0, true);
        l.on_log(&mut h);
        shared.shared = h.shared.clone();
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![17, 17]);
    }

    #[test]
    fn no_usage_keeps_the_estimate() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(None, false));
        respond_json(&mut l, &mut h, &mut shared, "200", r#"{"choices":[]}"#);
        // 10 input + default_output_tokens 10
        assert_eq!(used(&c, &mut shared, "tiered", "alice", 10), vec![20, 20]);
    }

    #[test]
    fn input_token_limit_per_route_metadata() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let mut admitted = 0;
        for _ in 0..10 {
            let mut h = host(&shared, "alice", 10);
            h.set_prop(&keys::route_metadata_path("ratelimit"), "input");
            let b = body(Some(1000), false);
            h.req_body = b.clone();
            let mut l = RequestLimiter::new(c.clone());
            l.on_request_headers(&mut h, false);
            let v = l.on_request_body(&mut h, b.len(), true);
            shared.shared = h.shared.clone();
            if v == Verdict::Continue {
                admitted += 1;
            }
        }
        // 70 input tokens per hour, 10 per request: the output cap of 1000 is not counted
        assert_eq!(admitted, 7);
    }

    #[test]
    fn unknown_rule_set_is_a_500_and_none_disables() {
        let c = cfg(CFG);
        let mut h = FakeHost::default();
        h.set_prop(&keys::route_metadata_path("ratelimit"), "nope");
        assert_eq!(RequestLimiter::new(c.clone()).on_request_headers(&mut h, false), Verdict::Replied);
        assert_eq!(h.replies[0].status, 500);
        let mut h = FakeHost::default();
        h.set_prop(&keys::route_metadata_path("ratelimit"), "none");
        assert_eq!(RequestLimiter::new(c).on_request_headers(&mut h, false), Verdict::Continue);
    }

    #[test]
    fn shadow_counts_but_admits() {
        let c = cfg(&CFG.replace("\"user_header\"", "\"shadow\": true, \"user_header\""));
        let mut shared = FakeHost::default();
        for _ in 0..4 {
            let (_, h, v) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
            assert_eq!(v, Verdict::Continue);
            assert!(h.replies.is_empty());
        }
        let (_, h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        assert_eq!(h.prop(&[keys::RATELIMIT]).as_deref(), Some("shadow:per-user/minute"));
    }

    #[test]
    fn hostile_bodies_do_not_panic() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        for b in [&b"\xff\xfe"[..], b"{", b"[[[[[[[[", b"{\"messages\": 3}", b""] {
            let (_, _, v) = admit(&c, &mut shared, "x", 10, b);
            assert_eq!(v, Verdict::Continue);
        }
        let c = cfg(&CFG.replace("\"user_header\"", "\"max_body_bytes\": 10, \"user_header\""));
        let (_, h, v) = admit(&c, &mut shared, "x", 10, &body(None, false));
        assert_eq!(v, Verdict::Replied);
        assert_eq!(h.replies[0].status, 413);
    }

    #[test]
    fn combined_keys_from_filter_state_headers_route_model_and_api_key() {
        let c = cfg(r#"{"team_header": "x-team", "default_rule_set": "s", "rule_sets": {"s": [
            {"name": "combo", "key": ["user", "team", "route", "model", "header:x-tenant", "api_key"],
             "count": "requests", "windows": [{"window": "minute", "limit": 1}]}]}}"#);
        let mut h = FakeHost::with_request_headers(&[
            ("x-team", "ignored-when-auth-wrote-it"),
            ("x-tenant", "t1"),
            ("authorization", "Bearer sk-secret"),
        ]);
        h.set_prop(&[keys::USER], "alice");
        h.set_prop(&[keys::TEAM], "dev");
        h.set_prop(&["xds", "route_name"], "chat");
        let b = body(Some(5), false);
        h.req_body = b.clone();
        let mut l = RequestLimiter::new(c.clone());
        l.on_request_headers(&mut h, false);
        assert_eq!(l.on_request_body(&mut h, b.len(), true), Verdict::Continue);
        let values = &l.values[0];
        assert_eq!(&values[..5], &["alice", "dev", "chat", "m", "t1"]);
        assert!(values[5].starts_with('k') && !values[5].contains("secret"));
        assert_eq!(h.resp_header("x-ratelimit-limit-requests"), None);
        h.resp_headers = vec![(":status".into(), b"200".to_vec())];
        l.on_response_headers(&mut h, false);
        assert_eq!(h.resp_header("x-ratelimit-limit-requests").as_deref(), Some("1"));
        assert_eq!(h.resp_header("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        // the same combination is refused; another tenant passes
        let mut l2 = RequestLimiter::new(c.clone());
        l2.on_request_headers(&mut h, false);
        assert_eq!(l2.on_request_body(&mut h, b.len(), true), Verdict::Replied);
        assert_eq!(h.replies[0].status, 429);
        assert!(String::from_utf8_lossy(&h.replies[0].body).contains("\"type\":\"requests\""));
        h.set_request_header("x-tenant", Some(b"t2"));
        let mut l3 = RequestLimiter::new(c);
        l3.on_request_headers(&mut h, false);
        assert_eq!(l3.on_request_body(&mut h, b.len(), true), Verdict::Continue);
    }

    #[test]
    fn request_without_body_is_decided_at_headers() {
        let c = cfg(CFG);
        let mut h = FakeHost::with_request_headers(&[("x-user", "zed")]);
        let mut l = RequestLimiter::new(c);
        // no body: nothing reserved for tokens
        assert_eq!(l.on_request_headers(&mut h, true), Verdict::Continue);
        h.resp_headers = vec![(":status".into(), b"200".to_vec())];
        l.on_response_headers(&mut h, false);
        assert_eq!(h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("150"));
    }

    #[test]
    fn missing_identity_shares_one_bucket() {
        let c = cfg(CFG);
        let mut shared = FakeHost::default();
        let mut h = FakeHost { time: Some(SystemTime::UNIX_EPOCH), ..FakeHost::default() };
        let b = body(Some(50), false);
        h.req_body = b.clone();
        let mut l = RequestLimiter::new(c.clone());
        l.on_request_headers(&mut h, false);
        l.on_request_body(&mut h, b.len(), true);
        shared.shared = h.shared.clone();
        assert_eq!(used(&c, &mut shared, "tiered", "_none", 0), vec![60, 60]);
    }

    const RLS_CFG: &str = r#"{
        "mode": "rls", "rls": {"cluster": "rls", "domain": "d"},
        "user_header": "x-user", "default_rule_set": "s",
        "rule_sets": {"s": [{"name": "r", "key": ["user"], "count": "total_tokens", "windows": [{"window": "minute", "limit": 100}]}]}
    }"#;

    #[test]
    fn rls_mode_asks_and_obeys() {
        let c = cfg(RLS_CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, v) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        let Verdict::CallRls(req) = v else { panic!("{v:?}") };
        assert!(req.windows(5).any(|w| w == b"alice"));
        let ok = crate::rls::tests::encode_response(1, &[(1, 40, 50)]);
        assert_eq!(l.on_rls_response(&mut h, 0, Some(&ok)), Verdict::Continue);
        // real usage 80 > reserved 60: a correction of 20 is prepared
        h.resp_headers = vec![(":status".into(), b"200".to_vec())];
        l.on_response_headers(&mut h, false);
        assert_eq!(h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("40"));
        let u = r#"{"usage":{"prompt_tokens":10,"completion_tokens":70}}"#;
        h.resp_body = u.as_bytes().to_vec();
        l.on_response_body(&mut h, u.len(), true);
        let corr = crate::rls::decode_hits(l.corrections.as_ref().unwrap());
        assert_eq!(corr, vec![20]);

        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        let over = crate::rls::tests::encode_response(2, &[(2, 0, 50)]);
        assert_eq!(l.on_rls_response(&mut h, 0, Some(&over)), Verdict::Replied);
        assert_eq!(h.replies[0].status, 429);
        assert!(h.replies[0].headers.contains(&("retry-after".into(), "50".into())));
    }

    #[test]
    fn request_facts_match_core_wire_prompt_bytes() {
        let bodies = [
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"héllo"},{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]}]}"#,
            r#"{"model":"m","prompt":["ab","cd"],"max_completion_tokens":9,"max_tokens":3}"#,
            r#"{"prompt":"abcdef","messages":[]}"#,
        ];
        for b in bodies {
            let req = sluice_core::wire::ChatRequest::parse(b.as_bytes()).unwrap();
            let (bytes, max_out, model) = request_facts(b.as_bytes());
            assert_eq!(bytes, req.prompt_bytes(), "{b}");
            assert_eq!(max_out, req.max_completion_tokens.or(req.max_tokens), "{b}");
            assert_eq!(model, req.model, "{b}");
        }
        assert_eq!(request_facts(b"not json"), (8, None, None));
    }

    #[test]
    fn error_reply_matches_core_shape() {
        let msg = "a \"quoted\" \\ line\nbreak \u{1} é";
        let mine = error_reply(429, "tokens", "rate_limit_exceeded", msg);
        let core = LocalReply::openai_error(429, "tokens", "rate_limit_exceeded", msg);
        let a: serde_json::Value = serde_json::from_slice(&mine.body).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&core.body).unwrap();
        assert_eq!(a, b);
        assert_eq!(mine.headers, core.headers);
    }

    #[test]
    fn rls_down_follows_failure_mode() {
        let c = cfg(RLS_CFG);
        let mut shared = FakeHost::default();
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        assert_eq!(l.on_rls_response(&mut h, 14, None), Verdict::Replied);
        assert_eq!(h.replies[0].status, 503);
        assert_eq!(h.prop(&[keys::RATELIMIT]).as_deref(), Some("error:rls_unavailable_14"));
        let c = cfg(&RLS_CFG.replace("\"mode\"", "\"failure_mode\": \"allow\", \"mode\""));
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        assert_eq!(l.on_rls_response(&mut h, 4, None), Verdict::Continue);
        assert_eq!(l.on_rls_response(&mut h, 0, Some(b"\xff")), Verdict::Continue);
        let (mut l, mut h, _) = admit(&c, &mut shared, "alice", 10, &body(Some(50), false));
        assert_eq!(l.on_rls_response(&mut h, 0, Some(b"\x12\xff")), Verdict::Continue);
        assert!(h.prop(&[keys::RATELIMIT]).unwrap().starts_with("error:rls_bad_response"));
    }
}
