//! The prompt-enrichment stage over the core pipeline.
//!
//! Headers: pick the route's profile (route metadata via `x.route`, else `default_profile`);
//! ask for the body when a profile applies. Request (end of stream **or trailers**: the
//! pipeline treats both alike): check the shape, apply the profile to the parsed body
//! (`x.request.json_mut()`; the pipeline serializes once), or refuse. Identity for templates
//! comes from `x.identity(h)` (auth in the same filter, or `sluice.identity` from a separate
//! auth filter); claims from the identity in process, else `sluice.claim.<name>`.

use crate::config::{Config, OnMissing};
use crate::enrich::{self, Refusal};
use crate::template::Variable;
use crate::{shape, NAME};
use serde_json::Value;
use sluice_core::api;
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyUse, Exchange};
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{Flow, Plugin, Stage};
use std::rc::Rc;

/// Counter of requests by profile (`sluice_rule`), action and reason.
pub const REQUESTS_METRIC: &str = "sluice_enrichment_requests";

/// What the filter did with a request (the `sluice_action` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The body was rewritten.
    Enriched,
    /// Forwarded as it came.
    Passthrough,
    /// Answered locally with an error.
    Refused,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Enriched => "enriched",
            Self::Passthrough => "passthrough",
            Self::Refused => "refused",
        }
    }
}

/// The configured filter (one per VM).
pub struct EnrichmentPlugin {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
}

impl EnrichmentPlugin {
    /// A plugin for `config`.
    pub fn new(config: Config) -> Self {
        Self { config: Rc::new(config), metrics: Rc::new(Metrics::new(256)) }
    }
}

impl Plugin for EnrichmentPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(EnrichmentStage {
            config: Rc::clone(&self.config),
            metrics: Rc::clone(&self.metrics),
            profile: None,
            decided: false,
        })
    }

    fn body_limit(&self) -> Option<usize> {
        Some(self.config.max_body_bytes)
    }

    fn holds_headers(&self) -> bool {
        true // caps and refusals must hold before anything reaches the provider
    }
}

/// One request.
pub struct EnrichmentStage {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    /// The profile applying to this request (index into `config.profiles`).
    profile: Option<usize>,
    /// `on_request` ran for it.
    decided: bool,
}

/// Template values of one request, each looked up at most once.
struct Vars<'a> {
    x: &'a mut Exchange,
    h: &'a dyn Host,
    seen: Vec<(Variable, Option<String>)>,
}

impl Vars<'_> {
    fn get(&mut self, v: &Variable) -> Option<String> {
        if let Some((_, value)) = self.seen.iter().find(|(k, _)| k == v) {
            return value.clone();
        }
        let value = self.lookup(v);
        self.seen.push((v.clone(), value.clone()));
        value
    }

    fn lookup(&mut self, v: &Variable) -> Option<String> {
        match v {
            Variable::User => self.x.identity(self.h).and_then(|i| i.user.clone()),
            Variable::Team => self.x.identity(self.h).and_then(|i| i.team.clone()),
            Variable::Claim(name) => {
                let claims = self.x.identity(self.h).and_then(|i| i.claims.clone());
                match claims {
                    Some(c) => c.get(name).and_then(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Null => None,
                        other => Some(other.to_string()),
                    }),
                    None => keys::filter_state(self.h, &keys::claim_key(name)),
                }
            }
            Variable::Header(name) => self.x.request.header_str(name),
            Variable::Route(key) => self.x.route.text(key),
        }
    }
}

impl EnrichmentStage {
    fn count(&self, h: &mut dyn Host, profile: &str, verdict: Verdict, reason: &str) {
        let tags = [("sluice_rule", profile), ("sluice_action", verdict.as_str()), ("sluice_reason", reason)];
        self.metrics.count(h, REQUESTS_METRIC, &tags, 1);
    }

    fn profile_name(&self) -> String {
        self.profile.and_then(|i| self.config.profiles.get(i)).map_or_else(|| "none".into(), |p| p.name.clone())
    }

    fn not_json(&self, h: &mut dyn Host, name: &str, why: &str, id: u32) -> Flow {
        match self.config.failure_mode {
            FailureMode::Allow => {
                log::debug!("{NAME} #{id}: passing a body that is not JSON: {why}");
                self.count(h, name, Verdict::Passthrough, "not_json");
                Flow::Continue
            }
            FailureMode::Deny => {
                self.count(h, name, Verdict::Refused, "not_json");
                Flow::Reply(LocalReply::invalid_json(NAME, why))
            }
        }
    }

    fn refuse(&self, h: &mut dyn Host, name: &str, reply: LocalReply, reason: &str, id: u32) -> Flow {
        log::info!("{NAME} #{id}: refused ({reason}) with profile {name}");
        self.count(h, name, Verdict::Refused, reason);
        Flow::Reply(reply)
    }
}

fn missing_variable(profile: &str, v: &Variable) -> LocalReply {
    let msg = format!("{NAME}: template variable {{{{{v}}}}} has no value for this request (profile {profile})");
    LocalReply::openai_error(400, "invalid_request_error", "missing_template_variable", &msg)
}

fn invalid_request(msg: &str) -> LocalReply {
    LocalReply::openai_error(400, "invalid_request_error", "invalid_request", &format!("{NAME}: {msg}"))
}

impl Stage for EnrichmentStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let config = Rc::clone(&self.config);
        let named = x.route.str(&config.profile_metadata_key).map(str::to_string);
        let Some(name) = named.or_else(|| config.default_profile.clone()) else {
            self.count(h, "none", Verdict::Passthrough, "no_profile");
            return Flow::Continue;
        };
        let Some((index, _)) = config.profile(&name) else {
            log::warn!("{NAME} #{}: route names unknown profile {name:?}", x.id);
            return match config.failure_mode {
                FailureMode::Allow => {
                    self.count(h, &name, Verdict::Passthrough, "unknown_profile");
                    Flow::Continue
                }
                FailureMode::Deny => {
                    self.count(h, &name, Verdict::Refused, "unknown_profile");
                    Flow::Reply(LocalReply::misconfigured(NAME))
                }
            };
        };
        if x.request.no_body {
            self.count(h, &name, Verdict::Passthrough, "no_body");
            return Flow::Continue;
        }
        // The content type is not trusted: a provider may serve a JSON body labelled
        // text/plain, and auth and the guard check such a body as JSON, so it is enriched
        // the same way; the body parse decides what is JSON.
        self.profile = Some(index);
        x.want_body(BodyUse::Modify);
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let Some(index) = self.profile else { return Flow::Continue };
        self.decided = true;
        let config = Rc::clone(&self.config);
        let Some(profile) = config.profiles.get(index) else { return Flow::Continue };
        let name = profile.name.as_str();
        if x.request.body.as_ref().is_none_or(Vec::is_empty) {
            self.count(h, name, Verdict::Passthrough, "no_body");
            return Flow::Continue;
        }
        let api = x.request.api;
        let checked = match x.request.json() {
            Some(v) => shape::check_request(api, v).map(|()| api::model(v).map(str::to_string)),
            None => {
                let why =
                    x.request.json_error().map_or_else(|| "body is not a JSON object".to_string(), |e| e.to_string());
                return self.not_json(h, name, &why, x.id);
            }
        };
        let before = match checked {
            Ok(model) => model,
            Err(e) => {
                let reply = invalid_request(&format!("request body has an unexpected shape: {e}"));
                return self.refuse(h, name, reply, "invalid_request", x.id);
            }
        };
        let was_changed = x.request.changed();
        let Some(mut body) = x.request.json_mut().map(std::mem::take) else { return Flow::Continue };
        let result = {
            let mut vars = Vars { x: &mut *x, h: &*h, seen: Vec::new() };
            enrich::apply(api, &mut body, profile, &mut |v| vars.get(v))
        };
        let after = api::model(&body).map(str::to_string);
        if let Some(slot) = x.request.json_mut() {
            *slot = body;
        }
        match result {
            Ok(true) => {
                if let Some(m) = after.filter(|m| before.as_ref() != Some(m)) {
                    x.set_model(h, &m);
                }
                self.count(h, name, Verdict::Enriched, "ok");
                Flow::Continue
            }
            Ok(false) => {
                if !was_changed {
                    x.request.mark_unchanged(); // forward the client's bytes as they came
                }
                self.count(h, name, Verdict::Passthrough, "unchanged");
                Flow::Continue
            }
            Err(Refusal::MissingVariable(v)) => {
                debug_assert!(profile.on_missing == OnMissing::Refuse);
                self.refuse(h, name, missing_variable(name, &v), "missing_variable", x.id)
            }
            Err(Refusal::InvalidRequest(msg)) => self.refuse(h, name, invalid_request(&msg), "invalid_request", x.id),
        }
    }

    fn on_done(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        // The pipeline refused the body for its size (413) before this stage could decide.
        if self.profile.is_some() && !self.decided && x.response.local && x.response.status == 413 {
            let name = self.profile_name();
            self.count(h, &name, Verdict::Refused, "too_large");
        }
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
