//! The usage-metrics stage: what one exchange used, as metrics and filter state.
//!
//! Request: for a model call (any format `sluice_core::api` knows) the body is read for the
//! model and the prompt size. A streaming chat/completions request without
//! `stream_options.include_usage` gets `include_usage: true` on the way up so the provider
//! reports usage; that extra usage-only chunk is removed again on the way down — this filter
//! owns the injection and the stripping. The pipeline tracks usage before any stage sees an
//! event and publishes it as `sluice.usage`, so a filter that runs closer to the client
//! (token-ratelimit in a separate-filter suite) still settles on the provider's numbers.
//! Other endpoints (Responses, Messages) report usage on their own and are never changed.
//!
//! Response: never held. At the end (or at access-log time for a reset stream: an aborted
//! stream is still usage) the usage is recorded — the provider's, or an estimate from the
//! prompt and the output seen, marked as estimated with the reason.

use crate::config::Config;
use crate::recorder::{Recorder, RequestLabels, COST, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN};
use serde_json::Value;
use sluice_core::api::{self, Api};
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Exchange, ResponseUse};
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::stage::{Flow, Plugin, Stage};
use sluice_core::usage::TokenUsage;
use std::rc::Rc;
use std::time::SystemTime;

/// Why a request's usage had to be estimated (`sluice_reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateReason {
    /// The response was complete and valid but carried no usage.
    NoUsage,
    /// A usage object was present but malformed.
    InvalidUsage,
    /// The response body was not a JSON object.
    InvalidBody,
    /// The response ended early (connection reset, truncated stream, client abort).
    Incomplete,
    /// The response body exceeded `max_response_body_bytes`.
    TooLarge,
    /// The provider compressed the answer although identity encoding was asked for.
    Encoded,
}

impl EstimateReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoUsage => "no_usage",
            Self::InvalidUsage => "invalid_usage",
            Self::InvalidBody => "invalid_body",
            Self::Incomplete => "incomplete",
            Self::TooLarge => "too_large",
            Self::Encoded => "encoded",
        }
    }
}

/// The configured filter (one per VM).
pub struct UsagePlugin {
    config: Rc<Config>,
    recorder: Rc<Recorder>,
}

impl UsagePlugin {
    /// A plugin for `config`.
    pub fn new(config: Config) -> Self {
        let recorder = Recorder::new(config.max_metric_names, config.max_label_values, config.known_models.clone());
        Self { config: Rc::new(config), recorder: Rc::new(recorder) }
    }
}

impl Plugin for UsagePlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }
    fn stage(&self) -> Box<dyn Stage> {
        Box::new(UsageStage {
            config: Rc::clone(&self.config),
            rec: Rc::clone(&self.recorder),
            tracked: false,
            injected: false,
            finished: false,
        })
    }
    fn body_limit(&self) -> Option<usize> {
        Some(self.config.max_request_body_bytes)
    }
    fn holds_headers(&self) -> bool {
        false // observes and adds `include_usage`: nothing to refuse before the headers go
    }
}

/// One exchange.
pub struct UsageStage {
    config: Rc<Config>,
    rec: Rc<Recorder>,
    tracked: bool,
    injected: bool,
    finished: bool,
}

/// `true` for a chat chunk with `"choices": []` and a usage: the chunk `include_usage` adds.
pub fn is_usage_only_chunk(v: &Value) -> bool {
    let no_choices = v.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
    no_choices && v.get("usage").is_some_and(|u| !u.is_null())
}

fn millis_between(from: Option<SystemTime>, to: Option<SystemTime>) -> Option<u64> {
    let d = to?.duration_since(from?).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn status_class(status: u32) -> String {
    match status {
        100..=599 => format!("{}xx", status / 100),
        0 => "none".into(),
        _ => "other".into(),
    }
}

impl UsageStage {
    fn reason(&self, x: &mut Exchange, usage: &TokenUsage) -> Option<EstimateReason> {
        if !usage.estimated {
            return None;
        }
        let r = &x.response;
        Some(if r.encoded {
            EstimateReason::Encoded
        } else if !r.complete {
            EstimateReason::Incomplete
        } else if let Some(s) = &r.stream {
            if !s.saw_done() {
                EstimateReason::Incomplete
            } else if s.saw_invalid_usage() {
                EstimateReason::InvalidUsage
            } else {
                EstimateReason::NoUsage
            }
        } else if r.bytes > self.config.max_response_body_bytes || r.copy.is_none() {
            EstimateReason::TooLarge
        } else {
            match x.response.json() {
                None => EstimateReason::InvalidBody,
                Some(v) if v.get("usage").is_some_and(|u| !u.is_null()) => EstimateReason::InvalidUsage,
                Some(_) => EstimateReason::NoUsage,
            }
        })
    }

    /// Record the exchange (once).
    fn finish(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        if self.finished || !self.tracked {
            return;
        }
        self.finished = true;
        let rec = Rc::clone(&self.rec);
        if x.response.status == 0 {
            x.response.status = h
                .property(&["response", "code"])
                .and_then(|v| bytes_to_u64(&v))
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0);
        }
        let published_provider = keys::filter_state(h, keys::PROVIDER);
        let provider = published_provider
            .clone()
            .or_else(|| x.route.str("provider").map(str::to_string))
            .or_else(|| {
                h.property(&["xds", "cluster_name"])
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "unknown".into());
        if let Some(m) = x.route.str("default_model") {
            rec.learn_model(m);
        }
        if let Some(list) = x.route.get("models").and_then(Value::as_array) {
            for m in list.iter().filter_map(Value::as_str) {
                rec.learn_model(m);
            }
        }
        if let Some(m) = keys::filter_state(h, keys::UPSTREAM_MODEL) {
            rec.learn_model(&m);
        }
        let requested = x.model().unwrap_or_else(|| "unknown".into());
        let request_label = rec.model_label(&requested);
        let identity = x.identity(h).cloned();
        let user = self.config.user_label.then(|| {
            identity.as_ref().and_then(|i| i.user.as_deref()).map_or_else(|| "none".to_string(), |u| rec.user_label(u))
        });
        let team = self.config.team_label.then(|| {
            identity.as_ref().and_then(|i| i.team.as_deref()).map_or_else(|| "none".to_string(), |t| rec.team_label(t))
        });
        let mut labels = RequestLabels {
            operation: x.request.api.operation().to_string(),
            provider: provider.clone(),
            request_model: request_label.clone(),
            response_model: String::new(),
            user,
            team,
        };
        rec.count(h, &labels.requests(&status_class(x.response.status)), 1);
        if !x.response.ok() || x.response.local {
            return;
        }
        let Some(usage) = x.usage(h) else { return };
        let reason = self.reason(x, &usage);
        let response_model = match &x.response.stream {
            Some(s) => s.response_model().map(str::to_string),
            None => x.response.json().and_then(api::response_model).map(str::to_string),
        };
        labels.response_model = match &response_model {
            Some(m) => rec.response_model_label(m, &request_label),
            None => request_label.clone(),
        };
        for (ty, n) in [
            ("input", usage.input),
            ("output", usage.output),
            ("cached_input", usage.cached_input),
            ("cache_write_input", usage.cache_write_input),
            ("reasoning", usage.reasoning),
            ("audio_input", usage.audio_input),
            ("audio_output", usage.audio_output),
        ] {
            if n > 0 || ty == "input" || ty == "output" {
                rec.count(h, &labels.token_usage(ty), n);
            }
        }
        if let Some(reason) = reason {
            log::debug!("{} #{}: usage estimated ({})", crate::NAME, x.id, reason.as_str());
            rec.count(h, &labels.estimated(reason.as_str()), 1);
            rec.count(h, &labels.estimated_tokens("input"), usage.input);
            rec.count(h, &labels.estimated_tokens("output"), usage.output);
        }
        let ttft = millis_between(x.started, x.response.first_byte);
        let mut tpot = None;
        if x.response.kind == BodyKind::Sse {
            if let Some(t) = ttft {
                rec.observe(h, &labels.latency(TIME_TO_FIRST_TOKEN), t);
            }
            if let (Some(span), true) = (millis_between(x.response.first_byte, x.response.last_byte), usage.output > 1)
            {
                let per = span / (usage.output - 1);
                rec.observe(h, &labels.latency(TIME_PER_OUTPUT_TOKEN), per);
                tpot = Some(per);
            }
        }
        // Priced by the model the provider answered with when the table knows it (a failover
        // or backup model), else by the requested one.
        let cost = response_model
            .as_deref()
            .and_then(|m| self.config.prices.cost_micros(m, &usage))
            .or_else(|| self.config.prices.cost_micros(&requested, &usage));
        if let Some(c) = cost {
            let mut cost_labels = labels.clone();
            cost_labels.user = None;
            if !self.config.cost_by_team {
                cost_labels.team = None;
            }
            rec.count(h, &cost_labels.cost(COST, &self.config.prices.currency), c);
        }
        for (k, v) in [
            (keys::INPUT_TOKENS, usage.input.to_string()),
            (keys::OUTPUT_TOKENS, usage.output.to_string()),
            (keys::TOTAL_TOKENS, usage.total.to_string()),
            (keys::CACHED_INPUT_TOKENS, usage.cached_input.to_string()),
            (keys::REASONING_TOKENS, usage.reasoning.to_string()),
            (keys::USAGE_ESTIMATED, reason.is_some().to_string()),
        ] {
            keys::set_filter_state(h, k, &v);
        }
        if let Some(m) = &response_model {
            keys::set_filter_state(h, keys::RESPONSE_MODEL, m);
        }
        if let Some(t) = ttft {
            keys::set_filter_state(h, keys::TTFT_MS, &t.to_string());
        }
        if let Some(t) = tpot {
            keys::set_filter_state(h, keys::TPOT_MS, &t.to_string());
        }
        if let Some(c) = cost {
            keys::set_filter_state(h, keys::COST, &c.to_string());
        }
        if published_provider.is_none() {
            keys::set_filter_state(h, keys::PROVIDER, &provider);
        }
    }
}

impl Stage for UsageStage {
    fn on_request_headers(&mut self, x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        let api = x.request.api;
        if x.request.method != "POST" || !api.is_model_call() || !x.request.json_content() {
            return Flow::Continue;
        }
        self.tracked = true;
        let body = if self.config.inject_include_usage && api.supports_include_usage() {
            BodyUse::Modify
        } else {
            BodyUse::Json
        };
        x.want_body(body);
        x.want_response(ResponseUse::Track);
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if !self.tracked || x.served_locally {
            return Flow::Continue;
        }
        // On the request path, so every trace span (attempts included) can be named by it.
        keys::set_filter_state(h, keys::OPERATION, x.request.api.operation());
        let api: Api = x.request.api;
        let wants = x.request.json().is_some_and(|v| api::is_stream(v) && !api::asked_include_usage(v));
        if self.config.inject_include_usage && api.supports_include_usage() && wants {
            if let Some(v) = x.request.json_mut() {
                self.injected = api::ensure_include_usage(api, v);
            }
        }
        Flow::Continue
    }

    fn on_response_headers(&mut self, x: &mut Exchange, _h: &mut dyn Host) -> Flow {
        if self.injected && x.response.kind == BodyKind::Sse && x.response.ok() && !x.response.local {
            // The usage-only chunk we asked for is removed again: chunks change size.
            x.want_response(ResponseUse::Modify);
        }
        Flow::Continue
    }

    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        if self.injected && x.response.kind == BodyKind::Sse {
            let before = c.events.len();
            c.events.retain(|e| !e.json.as_ref().is_some_and(is_usage_only_chunk));
            if c.events.len() != before {
                c.events_changed = true;
            }
        }
        if c.end {
            self.finish(x, h);
        }
        Flow::Continue
    }

    fn on_done(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        // A reset or aborted stream is accounted here, with what was seen.
        self.finish(x, h);
    }
}

/// A property holding a number: Envoy encodes integers as 8 little-endian bytes.
fn bytes_to_u64(v: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
