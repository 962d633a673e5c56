//! The auth plugin (per VM: config, JWKS refresh on the root timer, caches) and its stage
//! (per request).
//!
//! Request headers: find the credential, verify it (maybe after a JWKS fetch: a stage
//! callout), publish the identity, apply the route's RBAC policy, set identity headers, strip
//! credentials. Per-model access: a `…/v1/models/{id}` outside the caller's claim is answered
//! 404; the list is read back (`ResponseUse::Buffer`) and filtered; any other request on a
//! route with a `provider` asks for the body, and `on_request` checks its `model` (or the
//! route's `default_model`). The pipeline holds the request until then and treats request
//! trailers as the end of the body, so no body check can be skipped.

use crate::config::{Config, Source};
use crate::credential::{self, looks_like_jwt};
use crate::jwks::{fetch_headers, publish};
use crate::jwt::Failure;
use crate::models::{self, ModelsPath};
use crate::replies;
use crate::rules::{allowed_models, lookup, model_allowed};
use crate::verifier::{self, Refusal, Verdict, VmState};
use crate::NAME;
use serde_json::Value;
use sluice_core::encoding::payload_from_metadata;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Exchange, Identity, ResponseUse};
use sluice_core::host::Host;
use sluice_core::json::JsonError;
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{CalloutResponse, Flow, Plugin, Stage};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// How often the root timer checks whether a remote JWKS is due (cheap when none is).
pub const TICK: Duration = Duration::from_millis(500);

/// Counter `{sluice_action, sluice_reason}` of every decision.
pub const DECISIONS: &str = "sluice_auth_decisions";
/// Counter of JWT signature checks made (one per key tried): the crypto actually spent.
pub const SIGNATURE_CHECKS: &str = "sluice_auth_jwt_signature_checks";
/// Counter `{sluice_action="negative_hit"}` of tokens refused from the negative cache.
pub const JWT_CACHE: &str = "sluice_auth_jwt_cache";

/// Most metric names one VM defines (decisions × reasons, plus the two counters).
const MAX_METRIC_NAMES: usize = 64;

fn now_ms(h: &dyn Host) -> u64 {
    h.now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The configured filter, once per VM.
pub struct AuthPlugin {
    cfg: Rc<Config>,
    vm: Rc<RefCell<VmState>>,
    metrics: Rc<Metrics>,
    /// JWKS fetches made from the root context: callout token and provider index.
    root_calls: RefCell<Vec<(u32, usize)>>,
}

impl AuthPlugin {
    /// A plugin for `cfg`.
    pub fn new(cfg: Config) -> Self {
        let vm = VmState::new(&cfg);
        Self {
            cfg: Rc::new(cfg),
            vm: Rc::new(RefCell::new(vm)),
            metrics: Rc::new(Metrics::new(MAX_METRIC_NAMES)),
            root_calls: RefCell::new(Vec::new()),
        }
    }

    /// The per-VM state (tests).
    pub fn vm(&self) -> Rc<RefCell<VmState>> {
        Rc::clone(&self.vm)
    }

    fn apply_fetch(&self, h: &mut dyn Host, provider: usize, r: &CalloutResponse, how: &str) {
        let Some(p) = self.cfg.providers.get(provider) else { return };
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            log::error!("{NAME} #root: per-VM state busy; JWKS answer for {} dropped", p.name);
            return;
        };
        let Some(state) = vm.remote.get_mut(provider) else { return };
        match state.finished(r.status, r.body.as_deref()) {
            Ok(a) => {
                for why in &a.skipped {
                    log::warn!("{NAME} #root: JWKS for {}: skipping JWK: {why}", p.name);
                }
                if a.changed {
                    log::info!("{NAME} #root: JWKS for {} loaded {how} ({} keys)", p.name, a.keys);
                    drop(vm);
                    if let Some(b) = &r.body {
                        if !publish(h, &p.name, b) {
                            log::warn!("{NAME} #root: publishing JWKS for {} to the other workers failed", p.name);
                        }
                    }
                } else {
                    log::debug!("{NAME} #root: JWKS for {} unchanged", p.name);
                }
            }
            Err(e) => {
                log::warn!("{NAME} #root: JWKS for {}: {e}; keeping {} cached keys", p.name, state.keys.keys.len())
            }
        }
    }
}

impl Plugin for AuthPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        Box::new(AuthStage {
            cfg: Rc::clone(&self.cfg),
            vm: Rc::clone(&self.vm),
            metrics: Rc::clone(&self.metrics),
            pending: None,
            model_check: None,
            models_list: None,
        })
    }

    fn body_limit(&self) -> Option<usize> {
        // Only model access reads a body; without it auth never asks for one, and a cap here
        // would also cap the bodies other stages of a composed filter read.
        self.cfg.model_access.as_ref().map(|_| self.cfg.max_body_bytes)
    }

    fn holds_headers(&self) -> bool {
        true // a refused request (model access, a token still being checked) never goes upstream
    }

    fn tick_period(&self) -> Option<Duration> {
        self.cfg.providers.iter().any(|p| p.remote.is_some()).then_some(TICK)
    }

    fn on_start(&self, _h: &mut dyn Host) {
        if self.cfg.require_policy && self.cfg.default_policy.is_none() {
            log::info!(
                "{NAME} #root: require_policy is on and no default_policy is set: routes without an auth_policy \
                 answer 403 no_policy"
            );
        }
    }

    fn on_tick(&self, h: &mut dyn Host) {
        let now = now_ms(h);
        for (i, p) in self.cfg.providers.iter().enumerate() {
            let Some(remote) = &p.remote else { continue };
            let Ok(mut vm) = self.vm.try_borrow_mut() else {
                log::error!("{NAME} #root: per-VM state busy; JWKS refresh skipped this tick");
                return;
            };
            let Some(state) = vm.remote.get_mut(i) else { continue };
            if state.sync_shared(h, &p.name) {
                log::info!("{NAME} #root: JWKS for {} taken from another worker", p.name);
            }
            if !state.refresh_due(now, remote) {
                continue;
            }
            match h.dispatch_http_call(&remote.cluster, &fetch_headers(remote), None, remote.timeout) {
                Some(token) => {
                    state.started(now);
                    self.root_calls.borrow_mut().push((token, i));
                }
                None => {
                    state.not_dispatched(now);
                    log::warn!("{NAME} #root: JWKS fetch for {} not dispatched (cluster {:?})", p.name, remote.cluster);
                }
            }
        }
    }

    fn on_root_callout(&self, h: &mut dyn Host, r: &CalloutResponse) -> bool {
        let provider = {
            let Ok(mut calls) = self.root_calls.try_borrow_mut() else { return false };
            let Some(pos) = calls.iter().position(|(t, _)| *t == r.token) else { return false };
            calls.swap_remove(pos).1
        };
        self.apply_fetch(h, provider, r, "by the timer");
        true
    }
}

/// A JWT waiting for a JWKS fetch this request started.
#[derive(Debug, Clone)]
struct Pending {
    token: String,
    provider: usize,
}

/// The model check to make once the body is complete.
#[derive(Debug, Clone)]
struct ModelCheck {
    provider: String,
    allowed: Vec<String>,
}

/// One request.
pub struct AuthStage {
    cfg: Rc<Config>,
    vm: Rc<RefCell<VmState>>,
    metrics: Rc<Metrics>,
    pending: Option<Pending>,
    model_check: Option<ModelCheck>,
    /// The caller's models, when the response is a models list to filter.
    models_list: Option<Vec<String>>,
}

impl AuthStage {
    fn count(&self, h: &mut dyn Host, action: &str, reason: &str) {
        self.metrics.count(h, DECISIONS, &[("sluice_action", action), ("sluice_reason", reason)], 1);
    }

    fn deny(&mut self, x: &Exchange, h: &mut dyn Host, reply: LocalReply, reason: &str) -> Flow {
        log::debug!("{NAME} #{}: deny {} ({reason})", x.id, reply.status);
        self.count(h, "deny", reason);
        self.pending = None;
        self.model_check = None;
        self.models_list = None;
        Flow::Reply(reply)
    }

    /// The per-VM state is borrowed (impossible outside re-entrancy): fail closed, loudly.
    fn busy(&mut self, x: &Exchange, h: &mut dyn Host) -> Flow {
        log::error!("{NAME} #{}: per-VM state busy; refusing the request (failure mode deny)", x.id);
        self.deny(x, h, LocalReply::internal(NAME), "internal")
    }

    fn verify(&mut self, x: &mut Exchange, h: &mut dyn Host, token: String, may_fetch: bool) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let vm = Rc::clone(&self.vm);
        let outcome = match vm.try_borrow_mut() {
            Ok(mut vm) => verifier::verify(&mut vm, &cfg, h, &token, may_fetch),
            Err(_) => return self.busy(x, h),
        };
        if outcome.checks > 0 {
            self.metrics.count(h, SIGNATURE_CHECKS, &[], u64::try_from(outcome.checks).unwrap_or(u64::MAX));
        }
        if outcome.negative_hit {
            self.metrics.count(h, JWT_CACHE, &[("sluice_action", "negative_hit")], 1);
        }
        if let Some(p) = &outcome.adopted {
            log::info!("{NAME} #{}: JWKS for {p} taken from another worker", x.id);
        }
        match outcome.verdict {
            Verdict::Verified(claims) => self.admit(x, h, "jwt", claims, None),
            Verdict::Refused(Refusal::Token(f)) => self.deny(x, h, replies::failure(f), f.class()),
            Verdict::Refused(Refusal::Budget) => {
                log::warn!("{NAME} #{}: JWT signature-check budget spent; refusing a new token", x.id);
                self.deny(x, h, replies::verify_budget(), "verify_budget")
            }
            Verdict::Fetch { provider, failure } => self.fetch(x, h, token, provider, failure),
        }
    }

    /// Fetch the provider's JWKS for a token whose key is missing (rate-limited by
    /// `min_refresh_interval`), holding the request; refuse when no fetch can be made.
    fn fetch(&mut self, x: &mut Exchange, h: &mut dyn Host, token: String, provider: usize, f: Failure) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let Some(remote) = cfg.providers.get(provider).and_then(|p| p.remote.as_ref()) else {
            return self.deny(x, h, replies::failure(f), f.class());
        };
        let now = now_ms(h);
        let vm = Rc::clone(&self.vm);
        let allowed = match vm.try_borrow() {
            Ok(vm) => vm.remote.get(provider).is_some_and(|r| r.on_demand_allowed(now, remote)),
            Err(_) => return self.busy(x, h),
        };
        if allowed {
            let call = h.dispatch_http_call(&remote.cluster, &fetch_headers(remote), None, remote.timeout);
            let Ok(mut state) = vm.try_borrow_mut() else { return self.busy(x, h) };
            if let Some(state) = state.remote.get_mut(provider) {
                match call {
                    Some(_) => state.started(now),
                    None => state.not_dispatched(now),
                }
            }
            drop(state);
            if let Some(call) = call {
                log::debug!("{NAME} #{}: fetching JWKS ({}) for a token", x.id, f.class());
                x.await_callout(call);
                self.pending = Some(Pending { token, provider });
                return Flow::Wait;
            }
            log::warn!("{NAME} #{}: JWKS fetch not dispatched (cluster {:?})", x.id, remote.cluster);
        }
        self.deny(x, h, replies::failure(f), f.class())
    }

    fn api_key(&mut self, x: &mut Exchange, h: &mut dyn Host, key: &str) -> Flow {
        let hash = crate::jwt::sha256(key.as_bytes());
        // Compare against every entry without early exit.
        let mut found = None;
        for k in &self.cfg.api_keys {
            let diff = k.hash.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some((Rc::clone(&k.claims), k.key_id.clone()));
            }
        }
        match found {
            Some((claims, id)) => self.admit(x, h, "api_key", claims, Some(id)),
            None => self.deny(x, h, replies::bad_api_key(), "api_key"),
        }
    }

    /// The caller is authenticated: publish, authorize, prepare the request.
    fn admit(
        &mut self,
        x: &mut Exchange,
        h: &mut dyn Host,
        method: &str,
        claims: Rc<Value>,
        key_id: Option<String>,
    ) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        // Hand-off, written before RBAC so access logs name who was refused.
        let user = lookup(&claims, &cfg.subject_claim).map(value_text);
        let team = lookup(&claims, &cfg.team_claim).map(value_text);
        x.set_identity(
            h,
            Identity { method: method.to_string(), user, team, key_id, claims: Some(Rc::clone(&claims)) },
        );
        for name in &cfg.claims_to_filter_state {
            if let Some(v) = lookup(&claims, name) {
                keys::set_filter_state(h, &keys::claim_key(name), &value_text(v));
            }
        }
        // RBAC.
        match x.route.str("auth_policy").map(str::to_string).or_else(|| cfg.default_policy.clone()) {
            None if cfg.require_policy => return self.deny(x, h, replies::no_policy(), "no_policy"),
            None => {}
            Some(name) => match cfg.policies.get(&name) {
                None => {
                    log::warn!("{NAME} #{}: route {:?} names unknown auth_policy {name:?}", x.id, x.route.name);
                    return self.deny(x, h, LocalReply::misconfigured(NAME), "misconfigured");
                }
                Some(rule) if !rule.eval(&claims) => return self.deny(x, h, replies::rbac(), "rbac"),
                Some(_) => {}
            },
        }
        // Identity headers for the upstream, replacing any client-sent copy.
        for (header, claim) in &cfg.claims_to_headers {
            let text =
                lookup(&claims, claim).map(|v| value_text(v).chars().filter(|c| !c.is_control()).collect::<String>());
            if text.is_some() || x.request.header(header).is_some() {
                x.set_request_header(h, header, text.as_deref().map(str::as_bytes));
            }
        }
        if cfg.strip_credentials && !x.route.flag("auth_keep_credentials") {
            let mut sources: Vec<&Source> = Vec::with_capacity(cfg.from.len() + cfg.api_key_from.len());
            for s in cfg.from.iter().chain(cfg.api_key_from.iter()) {
                if !sources.contains(&s) {
                    sources.push(s);
                }
            }
            credential::strip(x, h, &sources);
        }
        // Per-model access.
        let (Some(ma), Some(provider)) = (&cfg.model_access, x.route.str("provider").map(str::to_string)) else {
            self.count(h, "allow", method);
            return Flow::Continue;
        };
        let allowed = allowed_models(lookup(&claims, &ma.claim.replace("{provider}", &provider)));
        match models::classify(&x.request.path, &ma.models_path) {
            ModelsPath::List => {
                if x.request.method != "HEAD" {
                    // Read the answer back, uncompressed: it is filtered to the caller's models.
                    x.want_response(ResponseUse::Buffer);
                    if x.request.header("accept-encoding").is_some() {
                        x.set_request_header(h, "accept-encoding", None);
                    }
                    self.models_list = Some(allowed);
                }
                self.count(h, "allow", method);
                Flow::Continue
            }
            ModelsPath::Retrieve(id) => {
                if model_allowed(&allowed, id) {
                    self.count(h, "allow", "model");
                    return Flow::Continue;
                }
                let reply = replies::model_not_found(id);
                self.deny(x, h, reply, "model")
            }
            ModelsPath::Neither => {
                // Modify: a request naming no model gets the default that was checked.
                x.want_body(BodyUse::Modify);
                self.model_check = Some(ModelCheck { provider, allowed });
                Flow::Continue
            }
        }
    }
}

impl Stage for AuthStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let cfg = Rc::clone(&self.cfg);
        let jwt_token = match credential::extract(&x.request, &cfg.from) {
            Ok(t) => t,
            Err(f) => return self.deny(x, h, replies::failure(f), f.class()),
        };
        if let Some((token, source)) = jwt_token {
            let api_key_here = !cfg.api_keys.is_empty() && cfg.api_key_from.contains(&source);
            let is_api_key = api_key_here && !looks_like_jwt(&token);
            if !is_api_key && !cfg.providers.is_empty() {
                return self.verify(x, h, token, true);
            }
            if api_key_here {
                return self.api_key(x, h, &token);
            }
        }
        if !cfg.api_keys.is_empty() {
            match credential::extract(&x.request, &cfg.api_key_from) {
                Err(f) => return self.deny(x, h, replies::failure(f), f.class()),
                Ok(Some((key, _))) => return self.api_key(x, h, &key),
                Ok(None) => {}
            }
        }
        if let Some(ja) = &cfg.jwt_authn {
            // The whole dynamic metadata (a serialized envoy.config.core.v3.Metadata), decoded
            // here: paths that stop at a map inside it come back in the flat pair encoding.
            let found = h.property(&["metadata"]).and_then(|b| payload_from_metadata(&b, &ja.namespace, &ja.key));
            if let Some(claims) = found {
                return self.admit(x, h, "jwt_authn", Rc::new(claims), None);
            }
        }
        let api_only = cfg.providers.is_empty() && cfg.jwt_authn.is_none();
        self.deny(x, h, replies::missing(api_only), "missing")
    }

    fn on_callout(&mut self, x: &mut Exchange, h: &mut dyn Host, r: CalloutResponse) -> Flow {
        let Some(p) = self.pending.take() else {
            // Only the callout this stage waits for is delivered here; anything else would
            // leave the caller unauthenticated: refuse.
            log::error!("{NAME} #{}: callout answer without a pending verification", x.id);
            return self.deny(x, h, LocalReply::internal(NAME), "internal");
        };
        let name = self.cfg.providers.get(p.provider).map(|q| q.name.clone()).unwrap_or_default();
        let vm = Rc::clone(&self.vm);
        let changed = match vm.try_borrow_mut() {
            Ok(mut vm) => match vm.remote.get_mut(p.provider).map(|s| s.finished(r.status, r.body.as_deref())) {
                Some(Ok(a)) => {
                    for why in &a.skipped {
                        log::warn!("{NAME} #{}: JWKS for {name}: skipping JWK: {why}", x.id);
                    }
                    log::info!("{NAME} #{}: JWKS for {name} refreshed on demand (changed: {})", x.id, a.changed);
                    a.changed
                }
                Some(Err(e)) => {
                    log::warn!("{NAME} #{}: JWKS refresh for {name} failed: {e}; keeping cached keys", x.id);
                    false
                }
                None => false,
            },
            Err(_) => return self.busy(x, h),
        };
        if changed {
            if let Some(b) = &r.body {
                if !publish(h, &name, b) {
                    log::warn!("{NAME} #{}: publishing JWKS for {name} to the other workers failed", x.id);
                }
            }
        }
        self.verify(x, h, p.token, false)
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let Some(mc) = self.model_check.take() else { return Flow::Continue };
        let has_body = x.request.body.as_ref().is_some_and(|b| !b.is_empty());
        if let Some(e) = x.request.json_error().cloned() {
            let why = match e {
                JsonError::Syntax(why) => why,
                other => other.to_string(),
            };
            return self.deny(x, h, replies::invalid_body(&why), "body");
        }
        let requested = match x.request.json().and_then(|v| v.get("model")) {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) if !m.is_empty() => Some(m.clone()),
            Some(Value::String(_)) => return self.deny(x, h, replies::invalid_body("model must not be empty"), "body"),
            Some(_) => return self.deny(x, h, replies::invalid_body("model must be a string"), "body"),
        };
        // The body's model, else the model a stage set or the route's `default_model`; the
        // pipeline publishes the same value as `sluice.model` once every stage agreed.
        let Some(model) = requested.clone().or_else(|| x.model()) else {
            if has_body {
                return self.deny(x, h, replies::model_required(), "body");
            }
            // No body, no default: nothing names a model (e.g. a GET); nothing to check.
            self.count(h, "allow", "no_model");
            return Flow::Continue;
        };
        if !model_allowed(&mc.allowed, &model) {
            return self.deny(x, h, replies::model_not_allowed(&model, &mc.provider), "model");
        }
        if requested.is_none() && has_body {
            // What was checked is what the provider gets: the route default goes into the
            // body, instead of leaving the provider to pick its own default model.
            if let Some(v) = x.request.json_mut() {
                sluice_core::api::set_model(v, &model);
            }
        }
        self.count(h, "allow", "model");
        Flow::Continue
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if self.models_list.is_none() || x.response.local || !x.response.ok() {
            return Flow::Continue;
        }
        // A list this filter cannot read is refused, never passed unfiltered or corrupted.
        let why = if x.response.encoded {
            "the provider compressed it although identity encoding was asked for"
        } else if x.response.kind == BodyKind::Sse {
            "it is an event stream"
        } else {
            return Flow::Continue;
        };
        self.models_list = None;
        log::warn!("{NAME} #{}: models list refused: {why}", x.id);
        self.count(h, "deny", "models_unreadable");
        Flow::Reply(replies::models_unreadable(why))
    }

    fn on_response_body(&mut self, x: &mut Exchange, _h: &mut dyn Host, c: &mut Chunk) -> Flow {
        let Some(allowed) = &self.models_list else { return Flow::Continue };
        if !c.end || x.response.local || x.response.bytes == 0 {
            return Flow::Continue;
        }
        if x.response.json().is_some_and(models::is_list) {
            if let Some(v) = x.response.json_mut() {
                models::filter_list(v, allowed);
            }
        } else if x.response.ok() {
            // Not a list this filter understands (or over the copy cap): nothing leaks.
            log::warn!("{NAME} #{}: models answer is not a list; answering an empty list", x.id);
            c.bytes = models::EMPTY_LIST.to_vec();
            c.bytes_changed = true;
        }
        // Non-2xx answers that are not lists (errors) pass as they are.
        self.models_list = None;
        Flow::Continue
    }
}
