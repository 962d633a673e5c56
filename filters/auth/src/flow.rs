//! One request through the auth filter, written against [`Host`] so native tests drive it.
//!
//! Headers phase: find the credential, verify it (maybe after a JWKS fetch), apply the
//! route's RBAC policy, hand the identity to later filters, strip the credential. The body
//! is read only when per-model access must see the `model`. A `GET …/v1/models` response
//! is buffered and filtered to the caller's models.

use crate::config::{Config, Source, FILTER};
use crate::jwks::{fetch_headers, publish, VmState};
use crate::jwt::{self, Failure};
use crate::metadata;
use crate::rules::{allowed_models, lookup, model_allowed};
use serde_json::Value;
use sluice_core::errors::LocalReply;
use sluice_core::host::Host;
use sluice_core::keys;
use sluice_core::metrics::{tagged_name, MetricKind};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// What the glue returns to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on (resume it if it was paused).
    Continue,
    /// Hold the stream (waiting for body or a callout).
    Pause,
    /// A local reply was sent; hold (return Pause, never resume).
    Replied,
}

/// How the caller authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Claims (JWT payload, or the API key's configured claims).
    pub claims: Rc<Value>,
    /// `jwt`, `jwt_authn` or `api_key`.
    pub method: &'static str,
}

#[derive(Debug, Clone)]
struct PendingJwt {
    token: String,
    provider: usize,
    call: u32,
}

/// Per-request state.
#[derive(Debug)]
pub struct AuthFlow {
    cfg: Rc<Config>,
    vm: Rc<RefCell<VmState>>,
    identity: Option<Identity>,
    credential: Option<Source>,
    pending: Option<PendingJwt>,
    /// Route provider for model access (`None`: no model check).
    provider: Option<String>,
    need_body: bool,
    headers_end: bool,
    body: Option<Vec<u8>>,
    body_end: bool,
    decided: bool,
    filter_models: Option<Vec<String>>,
}

fn now_secs<H: Host>(h: &H) -> u64 {
    h.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn now_ms<H: Host>(h: &H) -> u64 {
    h.now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// 401 `Jwt is missing`.
pub fn reply_missing(api_keys_only: bool) -> LocalReply {
    let msg = if api_keys_only { "API key is missing" } else { "Jwt is missing" };
    let code = if api_keys_only { "api_key_missing" } else { "jwt_missing" };
    LocalReply::openai_error(401, "authentication_error", code, msg).with_header("www-authenticate", "Bearer")
}

/// 401/503 for a refused token.
pub fn reply_failure(f: Failure) -> LocalReply {
    let msg = format!("Jwt verification fails: {}", f.class());
    if f == Failure::KeysUnavailable {
        return LocalReply::openai_error(503, "server_error", f.code(), &msg).with_header("retry-after", "1");
    }
    LocalReply::openai_error(401, "authentication_error", f.code(), &msg)
        .with_header("www-authenticate", "Bearer error=\"invalid_token\"")
}

/// 401 for an unknown API key.
pub fn reply_bad_api_key() -> LocalReply {
    LocalReply::openai_error(401, "authentication_error", "invalid_api_key", "API key is invalid")
        .with_header("www-authenticate", "Bearer")
}

/// 403 `RBAC: access denied`.
pub fn reply_rbac() -> LocalReply {
    LocalReply::openai_error(403, "permission_error", "rbac_denied", "RBAC: access denied")
}

/// 403 for a model the caller may not use.
pub fn reply_model(model: &str, provider: &str) -> LocalReply {
    let model: String = model.chars().take(128).collect();
    let provider: String = provider.chars().take(64).collect();
    LocalReply::openai_error(
        403,
        "permission_error",
        "model_not_allowed",
        &format!("model {model:?} is not allowed for this caller on provider {provider:?}"),
    )
}

/// Read a credential from the first source that has one. Two copies of a header, a header
/// without the expected scheme, or an empty value are `malformed`.
pub fn extract<H: Host>(h: &H, sources: &[Source]) -> Result<Option<(String, Source)>, Failure> {
    for s in sources {
        match s {
            Source::Header { name, prefix } => {
                let values: Vec<Vec<u8>> = h
                    .request_headers()
                    .into_iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
                    .collect();
                let [v] = values.as_slice() else {
                    if values.is_empty() {
                        continue;
                    }
                    return Err(Failure::Malformed);
                };
                let v = std::str::from_utf8(v).map_err(|_| Failure::Malformed)?.trim();
                let token = match prefix {
                    None => v,
                    Some(p) => {
                        let head = v.get(..p.len()).ok_or(Failure::Malformed)?;
                        if !head.eq_ignore_ascii_case(p) {
                            return Err(Failure::Malformed);
                        }
                        v.get(p.len()..).unwrap_or("").trim()
                    }
                };
                if token.is_empty() {
                    return Err(Failure::Malformed);
                }
                return Ok(Some((token.to_string(), s.clone())));
            }
            Source::Query(name) => {
                let path = h.request_header(":path").unwrap_or_default();
                let path = String::from_utf8_lossy(&path);
                let Some((_, query)) = path.split_once('?') else { continue };
                let found: Vec<&str> = query
                    .split('&')
                    .filter_map(|kv| kv.split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v))
                    .collect();
                match found.as_slice() {
                    [] => continue,
                    [v] if !v.is_empty() => return Ok(Some((v.to_string(), s.clone()))),
                    _ => return Err(Failure::Malformed),
                }
            }
            Source::Cookie(name) => {
                let found: Vec<String> = h
                    .request_headers()
                    .into_iter()
                    .filter(|(k, _)| k == "cookie")
                    .flat_map(|(_, v)| {
                        String::from_utf8_lossy(&v)
                            .split(';')
                            .filter_map(|c| {
                                c.trim().split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v.to_string())
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                match found.as_slice() {
                    [] => continue,
                    [v] if !v.is_empty() => return Ok(Some((v.clone(), s.clone()))),
                    _ => return Err(Failure::Malformed),
                }
            }
        }
    }
    Ok(None)
}

/// Remove a credential from the request before it leaves the gateway.
pub fn strip<H: Host>(h: &mut H, source: &Source) {
    match source {
        Source::Header { name, .. } => h.set_request_header(name, None),
        Source::Query(name) => {
            let path = String::from_utf8_lossy(&h.request_header(":path").unwrap_or_default()).into_owned();
            if let Some((p, q)) = path.split_once('?') {
                let kept: Vec<&str> = q.split('&').filter(|kv| kv.split('=').next() != Some(name.as_str())).collect();
                let new = if kept.is_empty() { p.to_string() } else { format!("{p}?{}", kept.join("&")) };
                h.set_request_header(":path", Some(new.as_bytes()));
            }
        }
        Source::Cookie(name) => {
            let cookies: Vec<String> = h
                .request_headers()
                .into_iter()
                .filter(|(k, _)| k == "cookie")
                .flat_map(|(_, v)| {
                    String::from_utf8_lossy(&v).split(';').map(|c| c.trim().to_string()).collect::<Vec<_>>()
                })
                .filter(|c| !c.is_empty() && c.split('=').next() != Some(name.as_str()))
                .collect();
            let v = cookies.join("; ");
            h.set_request_header("cookie", if v.is_empty() { None } else { Some(v.as_bytes()) });
        }
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

impl AuthFlow {
    /// A new request.
    pub fn new(cfg: Rc<Config>, vm: Rc<RefCell<VmState>>) -> Self {
        Self {
            cfg,
            vm,
            identity: None,
            credential: None,
            pending: None,
            provider: None,
            need_body: false,
            headers_end: false,
            body: None,
            body_end: false,
            decided: false,
            filter_models: None,
        }
    }

    /// The identity, once authenticated.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Token of the outstanding JWKS callout, if any.
    pub fn pending_call(&self) -> Option<u32> {
        self.pending.as_ref().map(|p| p.call)
    }

    fn count<H: Host>(&self, h: &mut H, action: &str, reason: &str) {
        let name = tagged_name("sluice_auth_decisions", &[("sluice_action", action), ("sluice_reason", reason)]);
        let mut vm = self.vm.borrow_mut();
        if let Some(id) = vm.metrics.get_or_define(&name, |n| h.define_metric(MetricKind::Counter, n)) {
            h.increment_metric(id, 1);
        }
    }

    fn deny<H: Host>(&mut self, h: &mut H, reply: &LocalReply, reason: &str) -> Step {
        log::debug!("{FILTER}: deny {} ({reason})", reply.status);
        self.count(h, "deny", reason);
        h.send_reply(reply);
        self.decided = true;
        // A JWKS callout still outstanding must not decide (and reply) a second time.
        self.pending = None;
        Step::Replied
    }

    /// Request headers arrived.
    pub fn on_request_headers<H: Host>(&mut self, h: &mut H, end_of_stream: bool) -> Step {
        self.headers_end = end_of_stream;
        let cfg = self.cfg.clone();
        let jwt_tok = match extract(h, &cfg.from) {
            Ok(t) => t,
            Err(f) => return self.deny(h, &reply_failure(f), f.class()),
        };
        if let Some((token, source)) = jwt_tok {
            let api_key_here = !cfg.api_keys.is_empty() && cfg.api_key_from.contains(&source);
            let is_api_key = api_key_here && !looks_like_jwt(&token);
            if !is_api_key && !cfg.providers.is_empty() {
                self.credential = Some(source);
                return self.verify_jwt(h, token, true);
            }
            if api_key_here {
                self.credential = Some(source);
                return self.check_api_key(h, &token);
            }
        }
        if !cfg.api_keys.is_empty() {
            match extract(h, &cfg.api_key_from) {
                Err(f) => return self.deny(h, &reply_failure(f), f.class()),
                Ok(Some((key, source))) => {
                    self.credential = Some(source);
                    return self.check_api_key(h, &key);
                }
                Ok(None) => {}
            }
        }
        if let Some(ja) = &cfg.jwt_authn {
            // The whole dynamic metadata (a serialized envoy.config.core.v3.Metadata): paths
            // that stop at a map inside it come back in proxy-wasm's flat pair encoding.
            let found =
                h.property(&["metadata"]).and_then(|b| metadata::payload_from_metadata(&b, &ja.namespace, &ja.key));
            if let Some(claims) = found {
                self.identity = Some(Identity { claims: Rc::new(claims), method: "jwt_authn" });
                return self.after_auth(h);
            }
        }
        let api_only = cfg.providers.is_empty() && cfg.jwt_authn.is_none();
        self.deny(h, &reply_missing(api_only), "missing")
    }

    fn check_api_key<H: Host>(&mut self, h: &mut H, key: &str) -> Step {
        let hash = jwt::sha256(key.as_bytes());
        // Compare against every entry without early exit.
        let mut found = None;
        for k in &self.cfg.api_keys {
            let diff = k.hash.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some(k.claims.clone());
            }
        }
        match found {
            Some(claims) => {
                self.identity = Some(Identity { claims: Rc::new(claims), method: "api_key" });
                self.after_auth(h)
            }
            None => self.deny(h, &reply_bad_api_key(), "api_key"),
        }
    }

    fn verify_jwt<H: Host>(&mut self, h: &mut H, token: String, may_fetch: bool) -> Step {
        let cfg = self.cfg.clone();
        let now = now_secs(h);
        // A repeat of a token this VM verified (same bytes, keys unchanged, before `exp`)
        // skips parsing and crypto.
        let hash = jwt::sha256(token.as_bytes());
        let cached = {
            let mut vm = self.vm.borrow_mut();
            let gens: Vec<u64> = (0..cfg.providers.len()).map(|i| vm.generation(i)).collect();
            vm.cache.get(&hash, now, |i| gens.get(i).copied().unwrap_or(0))
        };
        if let Some((_, claims)) = cached {
            self.identity = Some(Identity { claims, method: "jwt" });
            return self.after_auth(h);
        }
        let peek = match jwt::peek(&token) {
            Ok(p) => p,
            Err(f) => return self.deny(h, &reply_failure(f), f.class()),
        };
        let provider_idx = match jwt::select_provider(&cfg.providers, &peek) {
            Ok(i) => i,
            Err(f) => return self.deny(h, &reply_failure(f), f.class()),
        };
        let Some(provider) = cfg.providers.get(provider_idx) else {
            return self.deny(h, &reply_failure(Failure::Issuer), "issuer");
        };
        if provider.remote.is_some() {
            // Another worker may already hold keys this VM lacks (start-up, rotation).
            let mut vm = self.vm.borrow_mut();
            if let Some(r) = vm.remote.get_mut(provider_idx) {
                let lacks = !r.loaded || peek.kid.as_deref().is_some_and(|k| !r.keys.has_kid(k));
                if lacks && r.sync_shared(h, &provider.name) {
                    log::info!("{FILTER}: JWKS for {} taken from another worker", provider.name);
                }
            }
        }
        let result = {
            let vm = self.vm.borrow();
            match (&provider.remote, vm.remote.get(provider_idx)) {
                (Some(_), Some(r)) if !r.loaded => Err(Failure::KeysUnavailable),
                (Some(_), Some(r)) => jwt::verify(&token, &peek, provider, &r.keys, now),
                _ => jwt::verify(&token, &peek, provider, &provider.static_keys, now),
            }
        };
        match result {
            Ok(v) => {
                let mut vm = self.vm.borrow_mut();
                let gen = vm.generation(provider_idx);
                vm.cache.put(hash, provider_idx, gen, &v, now);
                drop(vm);
                self.identity = Some(Identity { claims: v.claims, method: "jwt" });
                self.after_auth(h)
            }
            Err(f @ (Failure::UnknownKey | Failure::KeysUnavailable)) if may_fetch => {
                if let Some(remote) = &provider.remote {
                    let now_ms = now_ms(h);
                    let allowed =
                        self.vm.borrow().remote.get(provider_idx).is_some_and(|r| r.on_demand_allowed(now_ms, remote));
                    if allowed {
                        let headers = fetch_headers(remote);
                        if let Some(call) = h.dispatch_http_call(&remote.cluster, &headers, None, remote.timeout) {
                            if let Some(r) = self.vm.borrow_mut().remote.get_mut(provider_idx) {
                                r.started(now_ms);
                            }
                            log::debug!("{FILTER}: fetching JWKS for {} ({})", provider.name, f.class());
                            self.pending = Some(PendingJwt { token, provider: provider_idx, call });
                            return Step::Pause;
                        }
                    }
                }
                self.deny(h, &reply_failure(f), f.class())
            }
            Err(f) => self.deny(h, &reply_failure(f), f.class()),
        }
    }

    /// The JWKS callout started by this request answered (`status` None: no response).
    pub fn on_jwks_response<H: Host>(&mut self, h: &mut H, status: Option<u16>, body: Option<Vec<u8>>) -> Step {
        let Some(p) = self.pending.take() else {
            // Already answered (e.g. body too large while the fetch ran): nothing to resume.
            return if self.decided { Step::Replied } else { Step::Continue };
        };
        let name = self.cfg.providers.get(p.provider).map(|x| x.name.clone()).unwrap_or_default();
        let ok = match self.vm.borrow_mut().remote.get_mut(p.provider) {
            Some(r) => match r.finished(status, body.as_deref()) {
                Ok(changed) => {
                    log::info!("{FILTER}: JWKS for {name} refreshed on demand (changed: {changed})");
                    changed
                }
                Err(e) => {
                    log::warn!("{FILTER}: JWKS refresh for {name} failed: {e}; keeping cached keys");
                    false
                }
            },
            None => false,
        };
        if ok {
            if let Some(b) = &body {
                publish(h, &name, b);
            }
        }
        self.verify_jwt(h, p.token, false)
    }

    fn after_auth<H: Host>(&mut self, h: &mut H) -> Step {
        let cfg = self.cfg.clone();
        let Some(identity) = self.identity.clone() else {
            return self.deny(h, &LocalReply::misconfigured(FILTER), "internal");
        };
        let claims = identity.claims.as_ref();
        // Hand-off (written before RBAC so access logs name who was refused).
        if let Some(user) = lookup(claims, &cfg.subject_claim) {
            keys::set_filter_state(h, keys::USER, &value_text(user));
        }
        if let Some(team) = lookup(claims, &cfg.team_claim) {
            keys::set_filter_state(h, keys::TEAM, &value_text(team));
        }
        keys::set_filter_state(h, keys::AUTH_METHOD, identity.method);
        for name in &cfg.claims_to_filter_state {
            if let Some(v) = lookup(claims, name) {
                keys::set_filter_state(h, &keys::claim_key(name), &value_text(v));
            }
        }
        // RBAC.
        let policy = keys::route_metadata(h, "auth_policy").or_else(|| cfg.default_policy.clone());
        if let Some(name) = policy {
            match cfg.policies.get(&name) {
                None => {
                    log::warn!("{FILTER}: route names unknown auth_policy {name:?}");
                    return self.deny(h, &LocalReply::misconfigured(FILTER), "misconfigured");
                }
                Some(rule) if !rule.eval(claims) => return self.deny(h, &reply_rbac(), "rbac"),
                Some(_) => {}
            }
        }
        // Identity headers for the upstream, without any client-sent copy.
        for (header, claim) in &cfg.claims_to_headers {
            h.set_request_header(header, None);
            if let Some(v) = lookup(claims, claim) {
                let text: String = value_text(v).chars().filter(|c| !c.is_control()).collect();
                h.set_request_header(header, Some(text.as_bytes()));
            }
        }
        let keep = keys::route_metadata(h, "auth_keep_credentials").is_some_and(|v| v == "true");
        if cfg.strip_credentials && !keep {
            if let Some(src) = &self.credential {
                strip(h, src);
            }
        }
        // Model access.
        if let (Some(ma), Some(provider)) = (&cfg.model_access, keys::route_metadata(h, "provider")) {
            let path = String::from_utf8_lossy(&h.request_header(":path").unwrap_or_default()).into_owned();
            let path = path.split('?').next().unwrap_or("");
            let method = h.request_header(":method").unwrap_or_default();
            let allowed = allowed_models(lookup(claims, &ma.claim.replace("{provider}", &provider)));
            if method == b"GET" && path.ends_with(ma.models_path.as_str()) {
                self.filter_models = Some(allowed);
            } else if self.headers_end || self.body_end {
                let body = self.body.take();
                return self.check_model(h, &provider, &allowed, body.as_deref());
            } else {
                self.provider = Some(provider);
                self.need_body = true;
                return Step::Pause;
            }
        }
        self.count(h, "allow", identity.method);
        self.decided = true;
        Step::Continue
    }

    fn check_model<H: Host>(&mut self, h: &mut H, provider: &str, allowed: &[String], body: Option<&[u8]>) -> Step {
        let requested = match body {
            Some(b) if !b.is_empty() => match serde_json::from_slice::<Value>(b) {
                Ok(v) => match v.get("model") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(m)) => Some(m.clone()),
                    Some(_) => {
                        return self.deny(h, &LocalReply::invalid_json(FILTER, "model must be a string"), "body")
                    }
                },
                Err(e) => return self.deny(h, &LocalReply::invalid_json(FILTER, &e.to_string()), "body"),
            },
            _ => None,
        };
        let model = match requested.or_else(|| keys::route_metadata(h, "default_model")) {
            Some(m) => m,
            None if body.is_none_or(<[u8]>::is_empty) => {
                // No body, no default: nothing names a model (e.g. a GET); nothing to check.
                self.count(h, "allow", "no_model");
                self.decided = true;
                return Step::Continue;
            }
            None => {
                return self.deny(
                    h,
                    &LocalReply::openai_error(
                        400,
                        "invalid_request_error",
                        "model_required",
                        "auth: request names no model and the route has no default_model",
                    ),
                    "body",
                )
            }
        };
        if !model_allowed(allowed, &model) {
            return self.deny(h, &reply_model(&model, provider), "model");
        }
        keys::set_filter_state(h, keys::REQUESTED_MODEL, &model);
        self.count(h, "allow", "model");
        self.decided = true;
        Step::Continue
    }

    /// A request body chunk (`size` is the buffered total).
    pub fn on_request_body<H: Host>(&mut self, h: &mut H, size: usize, end_of_stream: bool) -> Step {
        if self.decided && !self.need_body {
            return Step::Continue;
        }
        if !self.need_body && self.pending.is_none() {
            return Step::Continue;
        }
        if size > self.cfg.max_body_bytes {
            return self.deny(h, &LocalReply::body_too_large(FILTER, self.cfg.max_body_bytes), "body_too_large");
        }
        if !end_of_stream {
            return Step::Pause;
        }
        self.body_end = true;
        let body = h.request_body(0, size).unwrap_or_default();
        if self.pending.is_some() {
            // Still verifying: keep the body for the decision the callout will make.
            self.body = Some(body);
            return Step::Pause;
        }
        self.need_body = false;
        let provider = self.provider.clone().unwrap_or_default();
        let allowed = match (&self.cfg.model_access, &self.identity) {
            (Some(ma), Some(id)) => allowed_models(lookup(&id.claims, &ma.claim.replace("{provider}", &provider))),
            _ => Vec::new(),
        };
        self.check_model(h, &provider, &allowed, Some(&body))
    }

    /// Whether an async decision may resume the request now (the body, if needed, is complete).
    pub fn waiting_for_body(&self) -> bool {
        self.need_body && !self.decided
    }

    /// Response headers: prepare to filter a models list.
    pub fn on_response_headers<H: Host>(&mut self, h: &mut H) -> Step {
        if self.filter_models.is_some() {
            if h.response_header(":status").as_deref() == Some(b"200") {
                h.set_response_header("content-length", None);
            } else {
                self.filter_models = None;
            }
        }
        Step::Continue
    }

    /// Response body: buffer and filter a models list (other responses pass).
    pub fn on_response_body<H: Host>(&mut self, h: &mut H, size: usize, end_of_stream: bool) -> Step {
        let Some(allowed) = &self.filter_models else { return Step::Continue };
        if !end_of_stream {
            return Step::Pause;
        }
        let body = h.response_body(0, size).unwrap_or_default();
        let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
            // Not a list we understand: do not leak it unfiltered.
            let empty = br#"{"object":"list","data":[]}"#;
            h.set_response_body(0, size, empty);
            return Step::Continue;
        };
        if let Some(Value::Array(data)) = v.get_mut("data") {
            data.retain(|m| m.get("id").and_then(Value::as_str).is_some_and(|id| model_allowed(allowed, id)));
        }
        let out = serde_json::to_vec(&v).unwrap_or_default();
        h.set_response_body(0, size, &out);
        Step::Continue
    }
}
