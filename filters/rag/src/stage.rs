//! The RAG stage: on a route with `sluice.rag` metadata, embed the prompt (the last user
//! message), query the route's collection, and add the nearest passages to the request as a
//! system text (`sluice_core::api::add_system_text`: a system message first in chat, the
//! Responses `instructions`, the Messages `system`), before the body goes upstream.
//!
//! It runs after prompt-guard (the guard sees only the client's text) and before
//! token-ratelimit (the passages count for the token estimate: the limiter reads the final
//! body). Every callout path resumes or replies: embeddings or store down or slow forwards the
//! request unchanged (`failure_mode: allow`, the default) or answers 503 (`deny`). An empty
//! collection, or no passage within the distance cut-off, changes nothing.

use crate::config::{Config, Retrieval};
use crate::embeddings::parse_embedding;
use crate::passages;
use crate::store::{Filter, StoreError, VectorStore};
use sluice_core::api::{self, Api};
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyUse, Exchange};
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{CalloutResponse, Flow, Plugin, Stage};
use sluice_core::usage::estimate_tokens_from_bytes;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::SystemTime;

/// Counter: requests on RAG routes, `sluice_action` = `added` | `none` | `skip` | `error`,
/// `sluice_reason` for skips and errors.
pub const REQUESTS: &str = "sluice_rag_requests";
/// Counter: passages added.
pub const PASSAGES: &str = "sluice_rag_passages";
/// Counter: tokens added (estimated).
pub const ADDED_TOKENS: &str = "sluice_rag_added_tokens";
/// Histogram: embed + retrieve time in microseconds.
pub const LOOKUP_US: &str = "sluice_rag_lookup_us";

const MAX_METRIC_NAMES: usize = 64;
/// Collection ids remembered per VM.
const MAX_COLLECTIONS: usize = 256;

/// The configured filter (one per VM).
pub struct RagPlugin {
    cfg: Rc<Config>,
    /// Collection name -> id, per VM.
    collections: Rc<RefCell<HashMap<String, String>>>,
    metrics: Rc<Metrics>,
}

impl RagPlugin {
    /// A plugin for `cfg`.
    pub fn new(cfg: Config) -> Self {
        Self { cfg: Rc::new(cfg), collections: Rc::default(), metrics: Rc::new(Metrics::new(MAX_METRIC_NAMES)) }
    }
}

impl Plugin for RagPlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(RagStage {
            cfg: Rc::clone(&self.cfg),
            collections: Rc::clone(&self.collections),
            metrics: Rc::clone(&self.metrics),
            settings: None,
            step: Step::Idle,
            vector: None,
            started: None,
        })
    }

    fn body_limit(&self) -> Option<usize> {
        Some(self.cfg.max_request_body_bytes)
    }

    fn holds_headers(&self) -> bool {
        // Only `deny` may refuse a request; `allow` only adds text, so the headers go on.
        self.cfg.failure_mode == FailureMode::Deny
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Embedding,
    Opening,
    Querying,
}

/// One request.
pub struct RagStage {
    cfg: Rc<Config>,
    collections: Rc<RefCell<HashMap<String, String>>>,
    metrics: Rc<Metrics>,
    /// This route's settings (set when RAG is on for the request).
    settings: Option<Retrieval>,
    step: Step,
    vector: Option<Vec<f32>>,
    started: Option<SystemTime>,
}

fn shared_key(name: &str) -> String {
    format!("sluice.rag.collection.{name}")
}

impl RagStage {
    fn outcome(&mut self, h: &mut dyn Host, action: &str, reason: &str, state: &str) {
        if reason.is_empty() {
            self.metrics.count(h, REQUESTS, &[("sluice_action", action)], 1);
        } else {
            self.metrics.count(h, REQUESTS, &[("sluice_action", action), ("sluice_reason", reason)], 1);
        }
        keys::set_filter_state(h, keys::RAG, state);
    }

    fn latency(&self, h: &mut dyn Host) {
        if let Some(t) = self.started {
            let us = h.now().duration_since(t).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            self.metrics.record(h, LOOKUP_US, &[], us);
        }
    }

    fn skip(&mut self, h: &mut dyn Host, why: &str) -> Flow {
        self.settings = None;
        self.outcome(h, "skip", why, &format!("skip:{why}"));
        Flow::Continue
    }

    fn fail(&mut self, x: &Exchange, h: &mut dyn Host, what: &str, why: &str) -> Flow {
        log::warn!(
            "{} #{}: {what} failed ({why}); {}",
            crate::NAME,
            x.id,
            match self.cfg.failure_mode {
                FailureMode::Allow => "forwarding the request unchanged",
                FailureMode::Deny => "refusing (failure_mode deny)",
            }
        );
        self.step = Step::Idle;
        self.outcome(h, "error", what, &format!("error:{what}"));
        match self.cfg.failure_mode {
            FailureMode::Allow => Flow::Continue,
            FailureMode::Deny => Flow::Reply(LocalReply::openai_error(
                503,
                "server_error",
                "retrieval_unavailable",
                &format!("{}: the retrieval {what} is unavailable; try again later", crate::NAME),
            )),
        }
    }

    fn collection_id(&self, h: &dyn Host, name: &str) -> Option<String> {
        let local = self.collections.try_borrow().ok().and_then(|c| c.get(name).cloned());
        local.or_else(|| {
            h.shared_data(&shared_key(name)).0.map(|v| sluice_core::json::lossy(&v)).filter(|s| !s.is_empty())
        })
    }

    fn remember(&self, h: &mut dyn Host, name: &str, id: Option<&str>) {
        if let Ok(mut c) = self.collections.try_borrow_mut() {
            match id {
                Some(id) => {
                    if c.len() >= MAX_COLLECTIONS {
                        c.clear();
                    }
                    c.insert(name.to_string(), id.to_string());
                }
                None => {
                    c.remove(name);
                }
            }
        }
        let _ = h.set_shared_data(&shared_key(name), id.unwrap_or_default().as_bytes(), None);
    }

    fn query(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let (Some(r), Some(vector)) = (self.settings.as_ref(), self.vector.as_ref()) else { return Flow::Continue };
        let Some(name) = r.collection.clone() else { return Flow::Continue };
        let call = match self.collection_id(h, &name) {
            Some(id) => {
                self.step = Step::Querying;
                cfg.store.query(&id, vector, r.top_k, &Filter::default())
            }
            None => {
                self.step = Step::Opening;
                cfg.store.open_collection(&name, false)
            }
        };
        match cfg.store.upstream().dispatch(h, &call) {
            Some(t) => {
                x.await_callout(t);
                Flow::Wait
            }
            None => self.fail(x, h, "store", "callout not dispatched (unknown cluster?)"),
        }
    }

    fn add(&mut self, x: &mut Exchange, h: &mut dyn Host, matches: &[crate::store::Match]) -> Flow {
        self.latency(h);
        self.step = Step::Idle;
        let Some(r) = self.settings.clone() else { return Flow::Continue };
        let chosen = passages::select(matches, &r);
        if chosen.is_empty() {
            log::debug!("{} #{}: no passage within the cut-off ({} retrieved)", crate::NAME, x.id, matches.len());
            self.outcome(h, "none", "", "none");
            return Flow::Continue;
        }
        let text = passages::render(&chosen, &r);
        let api = x.request.api;
        let added = x.request.json_mut().is_some_and(|v| api::add_system_text(api, v, &text));
        if !added {
            x.request.mark_unchanged();
            return self.skip(h, "shape");
        }
        let n = chosen.len() as u64;
        let tokens = estimate_tokens_from_bytes(text.len());
        log::debug!("{} #{}: added {n} passages (~{tokens} tokens)", crate::NAME, x.id);
        self.metrics.count(h, PASSAGES, &[], n);
        self.metrics.count(h, ADDED_TOKENS, &[], tokens);
        self.outcome(h, "added", "", &format!("added:{n}"));
        Flow::Continue
    }
}

impl Stage for RagStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if x.request.method != "POST" || !x.request.api.generates() {
            return Flow::Continue;
        }
        let settings = match self.cfg.defaults.for_route(x.route.get("rag")) {
            Ok(Some(s)) => s,
            Ok(None) => return Flow::Continue,
            Err(e) => {
                log::error!("{} #{}: route {:?}: invalid route metadata: {e}", crate::NAME, x.id, x.route.name);
                return self.fail(x, h, "route_config", &e.to_string());
            }
        };
        if !matches!(x.request.api, Api::Chat | Api::Responses | Api::Messages) {
            return self.skip(h, "api");
        }
        self.settings = Some(settings);
        x.want_body(BodyUse::Modify);
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if self.settings.is_none() || x.served_locally {
            return Flow::Continue;
        }
        let api = x.request.api;
        let text = match x.request.json() {
            Some(v) => api::last_user_text(api, v).filter(|t| !t.trim().is_empty()),
            None => return self.skip(h, "body"),
        };
        let Some(text) = text else { return self.skip(h, "no_text") };
        self.started = Some(h.now());
        let cfg = Rc::clone(&self.cfg);
        let call = cfg.embeddings.request(&text);
        match cfg.embeddings.upstream.dispatch(h, &call) {
            Some(t) => {
                self.step = Step::Embedding;
                x.await_callout(t);
                Flow::Wait
            }
            None => self.fail(x, h, "embeddings", "callout not dispatched (unknown cluster?)"),
        }
    }

    fn on_callout(&mut self, x: &mut Exchange, h: &mut dyn Host, r: CalloutResponse) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let name = self.settings.as_ref().and_then(|s| s.collection.clone()).unwrap_or_default();
        match self.step {
            Step::Idle => Flow::Continue,
            Step::Embedding => match parse_embedding(r.status, r.body.as_deref()) {
                Ok(v) => {
                    self.vector = Some(v);
                    self.query(x, h)
                }
                Err(e) => self.fail(x, h, "embeddings", &e.to_string()),
            },
            Step::Opening => match cfg.store.parse_collection(r.status, r.body.as_deref()) {
                Ok(id) => {
                    self.remember(h, &name, Some(&id));
                    self.query(x, h)
                }
                Err(StoreError::NoCollection) => {
                    self.fail(x, h, "no_collection", &format!("collection {name:?} does not exist"))
                }
                Err(e) => self.fail(x, h, "store", &e.to_string()),
            },
            Step::Querying => match cfg.store.parse_query(r.status, r.body.as_deref()) {
                Ok(matches) => self.add(x, h, &matches),
                Err(e) => {
                    if e == StoreError::NoCollection {
                        self.remember(h, &name, None);
                    }
                    self.fail(x, h, "store", &e.to_string())
                }
            },
        }
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
