//! The upstream role: one stage per attempt, after Envoy picked the endpoint.
//!
//! Request headers: resolve the picked endpoint (its whole `sluice` metadata and its
//! cluster's, each one host call, resolved once per endpoint and cached per VM), pick the model for this attempt
//! (a backup model by attempt number, else endpoint/cluster metadata), apply the provider
//! profile (path, authority, credential), remove every client credential header, and ask for
//! the body. Request (end of stream or trailers): rewrite `model` through
//! `x.request.json_mut()` + `api::set_model` (every format keeps it top-level), or forward a
//! body that is not a JSON object unchanged. Response headers: a 429 is counted, its wait
//! recorded as the cluster's cooldown (shared data, read by the downstream role) and, only
//! when `rate_limit_status_to` asks for it (Envoy without `error_matcher`), shown to the
//! router as 503 with the original status in an internal header the downstream role puts
//! back. With `retry_context_overflow`, a 400/413/422 JSON error is held (headers and its
//! small body) and, when the body says the prompt exceeds the context window, marked
//! `x-sluice-retry: context-length` for the route's `retriable_headers`.
//!
//! The attempt number comes from `x-envoy-attempt-count`, which a client can send too when
//! the virtual host lacks `include_request_attempt_count: true`. With `backup_models` the
//! stage therefore requires the downstream role's mark (`sluice.failover_downstream`: the
//! client's copy was removed) and refuses the attempt without it (500, naming the field).

use crate::config::{
    validate_authority, validate_credential_header, validate_header_value, validate_path, AuthMode, Config,
    ATTEMPT_COUNT_HEADER, CONTEXT_OVERFLOW_STATUSES, DEFAULT_MAX_TOKENS, ORIGINAL_STATUS_HEADER, RETRY_MARKER_CONTEXT,
    RETRY_MARKER_HEADER,
};
use crate::cooldown;
use crate::retry_after::{format_seconds, provider_wait};
use crate::stage::metric;
use crate::NAME;
use serde_json::{Map, Value};
use sluice_core::api;
use sluice_core::config::validate_env_var_name;
use sluice_core::encoding::metadata_namespace;
use sluice_core::errors::LocalReply;
use sluice_core::exchange::{BodyKind, BodyUse, Chunk, Event, Exchange, ResponseUse};
use sluice_core::host::Host;
use sluice_core::json::{lossy, JsonError};
use sluice_core::keys;
use sluice_core::metrics::Metrics;
use sluice_core::sse::SseEvent;
use sluice_core::stage::{Flow, Stage};
use sluice_core::translate::{self, Dialect, RequestOptions, ResponseContext, StreamOut, StreamTranslate, Translator};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// How long a resolved endpoint is kept (EDS may change its metadata).
pub const ENDPOINT_TTL: Duration = Duration::from_secs(10);
/// Most endpoints cached per VM.
const MAX_ENDPOINTS: usize = 1024;
/// Largest error body held to look for a context-window error (declared `content-length`).
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// What an attempt to one endpoint carries, resolved from its metadata and the profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Provider name (metadata `provider`, else the cluster name): metrics, filter state.
    pub provider: String,
    /// The endpoint's model (endpoint metadata, else cluster metadata).
    pub model: Option<String>,
    /// Replacement `:path`.
    pub path: Option<String>,
    /// Replacement `:authority`.
    pub authority: Option<String>,
    /// Client headers to remove.
    pub remove: Vec<String>,
    /// The provider credential to send: header and value.
    pub credential: Option<(String, String)>,
    /// The endpoint asked for a credential (`credential_env`) that is unavailable.
    pub credential_missing: bool,
    /// The API the provider speaks (metadata or profile `api`).
    pub api: Dialect,
    /// `max_tokens` for a translated request without an output cap.
    pub max_tokens: u64,
}

/// A `sluice` metadata string of the endpoint, else of its cluster (non-empty, trimmed).
fn meta(host: &Map<String, Value>, cluster: &Map<String, Value>, key: &str) -> Option<String> {
    let get = |m: &Map<String, Value>| {
        m.get(key).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
    };
    get(host).or_else(|| get(cluster))
}

/// Resolve an endpoint: the config's profile named by its `provider`, each field overridden by
/// endpoint (then cluster) metadata; invalid metadata values are ignored with a warning.
pub fn resolve(
    config: &Config,
    host_meta: &Map<String, Value>,
    cluster_meta: &Map<String, Value>,
    cluster_name: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Endpoint {
    let m = |k: &str| meta(host_meta, cluster_meta, k);
    let provider_meta = m("provider");
    let provider = provider_meta
        .clone()
        .or_else(|| cluster_name.filter(|c| !c.is_empty()).map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    let base = provider_meta.as_deref().and_then(|p| config.providers.get(p)).cloned().unwrap_or_default();
    let checked = |key: &str, v: Option<String>, check: fn(&str) -> Result<(), String>| {
        v.filter(|v| match check(v) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{NAME}: provider {provider}: ignoring metadata {key}: {e}");
                false
            }
        })
    };
    let api = match m("api") {
        Some(v) => Dialect::parse(&v).unwrap_or_else(|| {
            log::warn!("{NAME}: provider {provider}: ignoring metadata api={v:?}: expected one of openai, anthropic");
            base.api.unwrap_or_default()
        }),
        None => base.api.unwrap_or_default(),
    };
    let translator = translate::translator(api::Api::Chat, api);
    let path = checked("path", m("path"), validate_path).or(base.path);
    let authority = checked("authority", m("authority"), validate_authority).or(base.authority);
    let header = checked("credential_header", m("credential_header"), validate_credential_header)
        .or(base.credential_header)
        .unwrap_or_else(|| translator.map_or("authorization", |t| t.credential.0).to_string());
    let auth = match m("auth") {
        Some(v) => AuthMode::parse(&v).unwrap_or_else(|| {
            log::warn!("{NAME}: endpoint metadata sluice.auth={v:?} is not provider|passthrough; using provider");
            AuthMode::Provider
        }),
        None => base.auth.unwrap_or_default(),
    };
    let listed = base.client_credential_headers.as_ref().unwrap_or(&config.client_credential_headers);
    let mut remove: Vec<String> = Vec::with_capacity(listed.len() + 2);
    let mut add = |h: &str| {
        if !remove.iter().any(|x| x == h) {
            remove.push(h.to_string());
        }
    };
    let max_tokens = base.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let mut ep = Endpoint { provider, model: m("model"), path, authority, api, max_tokens, ..Endpoint::default() };
    match auth {
        AuthMode::Passthrough => {
            // The client's credential for this provider stays; every other one goes.
            for h in listed.iter().filter(|h| **h != header) {
                add(h);
            }
        }
        AuthMode::Provider => {
            add("authorization");
            add(&header);
            for h in listed {
                add(h);
            }
            if let Some(var) = m("credential_env").or(base.credential_env) {
                let prefix = m("credential_prefix").or(base.credential_prefix).unwrap_or_else(|| {
                    if header == "authorization" {
                        "Bearer ".to_string()
                    } else {
                        String::new()
                    }
                });
                let key = validate_env_var_name(&var)
                    .ok()
                    .and_then(|()| env(&var))
                    .filter(|k| !k.is_empty() && validate_header_value(k).is_ok());
                match key {
                    Some(k) if validate_header_value(&prefix).is_ok() => {
                        ep.credential = Some((header.clone(), format!("{prefix}{k}")));
                    }
                    _ => {
                        // Never log the value; the name of the variable is not secret.
                        log::warn!(
                            "{NAME}: provider {}: credential from env {var:?} unavailable (not in host_env_keys, empty or invalid); sending no credential",
                            ep.provider
                        );
                        ep.credential_missing = true;
                    }
                }
            }
        }
    }
    ep.remove = remove;
    ep
}

/// The attempt number from Envoy's `x-envoy-attempt-count` (1 when absent or unreadable).
pub fn attempt_number(value: Option<&str>) -> u32 {
    value.and_then(|v| v.trim().parse::<u32>().ok()).filter(|n| *n >= 1).unwrap_or(1)
}

/// The model for attempt `attempt`: a backup by attempt number (attempts past the list keep
/// the last backup), else the endpoint's or cluster's `model`, else `None` (leave the body).
pub fn model_for_attempt(config: &Config, attempt: u32, endpoint_model: Option<String>) -> Option<String> {
    if attempt >= 2 && !config.backup_models.is_empty() {
        let i = usize::try_from(attempt - 2).unwrap_or(usize::MAX).min(config.backup_models.len() - 1);
        return config.backup_models.get(i).cloned();
    }
    endpoint_model
}

/// An endpoint's cache key: the cluster name and the endpoint's serialized metadata.
type EndpointKey = (String, Vec<u8>);

/// Per-VM state of the upstream role.
pub struct UpstreamShared {
    /// The configuration.
    pub config: Rc<Config>,
    /// Metrics.
    pub metrics: Metrics,
    endpoints: RefCell<HashMap<EndpointKey, (Rc<Endpoint>, SystemTime)>>,
    warned_no_attempt_count: Cell<bool>,
}

impl UpstreamShared {
    /// Shared state for `config`.
    pub fn new(config: Rc<Config>) -> Self {
        Self {
            config,
            metrics: Metrics::new(crate::stage::MAX_METRIC_NAMES),
            endpoints: RefCell::new(HashMap::new()),
            warned_no_attempt_count: Cell::new(false),
        }
    }

    /// The endpoint Envoy picked for this attempt: 2 property reads (the cluster name and the
    /// endpoint's whole metadata, together the cache key) on a cache hit, 1 more (the
    /// cluster's metadata) on a miss. The key is the metadata itself rather than the address:
    /// one address may serve several endpoints with different metadata (seed 001: three
    /// priorities, three models, one host).
    fn endpoint(&self, h: &dyn Host) -> (String, Rc<Endpoint>) {
        let cluster = h.property(&["xds", "cluster_name"]).map(|b| lossy(&b)).unwrap_or_default();
        let host_bytes = h.property(&["xds", "upstream_host_metadata"]).unwrap_or_default();
        let key = (cluster, host_bytes);
        let now = h.now();
        if let Ok(cache) = self.endpoints.try_borrow() {
            if let Some((ep, at)) = cache.get(&key) {
                if now.duration_since(*at).is_ok_and(|d| d < ENDPOINT_TTL) {
                    return (key.0.clone(), Rc::clone(ep));
                }
            }
        }
        let host_meta = metadata_namespace(&key.1, keys::METADATA_NAMESPACE).unwrap_or_default();
        let cluster_meta = h
            .property(&["xds", "cluster_metadata"])
            .and_then(|b| metadata_namespace(&b, keys::METADATA_NAMESPACE))
            .unwrap_or_default();
        let env = |n: &str| h.env_var(n);
        let ep = Rc::new(resolve(&self.config, &host_meta, &cluster_meta, Some(&key.0), &env));
        // A busy cache (never expected: no borrow is held across calls) only costs a re-read.
        if let Ok(mut cache) = self.endpoints.try_borrow_mut() {
            if cache.len() >= MAX_ENDPOINTS {
                cache.clear();
            }
            cache.insert(key.clone(), (Rc::clone(&ep), now));
        }
        (key.0, ep)
    }
}

/// One attempt.
pub struct UpstreamStage {
    shared: Rc<UpstreamShared>,
    cluster: String,
    endpoint: Option<Rc<Endpoint>>,
    target: Option<String>,
    wanted_body: bool,
    decided: bool,
    checking_overflow: bool,
    counted_too_large: bool,
    /// This attempt's provider speaks another API: the translation table row.
    translator: Option<&'static Translator>,
    /// What the answer's translation needs (set once the request was translated).
    answer: Option<ResponseContext>,
    /// A translated SSE answer.
    stream: Option<Box<dyn StreamTranslate>>,
    /// A translated JSON answer (buffered to its end).
    translate_json: bool,
}

impl UpstreamStage {
    /// A stage for one attempt.
    pub fn new(shared: Rc<UpstreamShared>) -> Self {
        Self {
            shared,
            cluster: String::new(),
            endpoint: None,
            target: None,
            wanted_body: false,
            decided: false,
            checking_overflow: false,
            counted_too_large: false,
            translator: None,
            answer: None,
            stream: None,
            translate_json: false,
        }
    }

    fn provider(&self) -> &str {
        self.endpoint.as_ref().map_or("unknown", |e| e.provider.as_str())
    }

    /// The labels every upstream metric carries: the provider and the model sent (`client`
    /// when the body's model was kept). Envoy 1.39+ puts stats of upstream filters in the
    /// root scope, without the cluster name, so these labels are all that tells them apart.
    fn count(&self, h: &mut dyn Host, name: &str, extra: &[(&str, &str)]) {
        let model = self.target.as_deref().unwrap_or("client");
        let mut tags = vec![("gen_ai_provider_name", self.provider()), ("gen_ai_request_model", model)];
        tags.extend_from_slice(extra);
        self.shared.metrics.count(h, name, &tags, 1);
    }

    fn passthrough(&self, h: &mut dyn Host, reason: &str) -> Flow {
        log::warn!("{NAME}: provider {}: request body is {reason}; forwarded unchanged", self.provider());
        self.count(h, metric::BODY_PASSTHROUGH, &[("sluice_reason", reason)]);
        Flow::Continue
    }

    /// A 429: count it, record the wait as the cluster's cooldown, rewrite if configured.
    fn rate_limited(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        let shared = Rc::clone(&self.shared);
        let provider = self.provider().to_string();
        self.count(h, metric::RATE_LIMITED, &[]);
        let headers = &x.response.headers;
        let now = h.now();
        let wait = provider_wait(|n| headers.iter().find(|(k, _)| k == n).map(|(_, v)| lossy(v)), now);
        if let Some(w) = wait {
            keys::set_filter_state(h, keys::RETRY_AFTER, &format_seconds(w.wait));
            let ms = u64::try_from(w.wait.as_millis()).unwrap_or(u64::MAX);
            let model = self.target.as_deref().unwrap_or("client");
            let tags = [("gen_ai_provider_name", provider.as_str()), ("gen_ai_request_model", model)];
            shared.metrics.record(h, metric::RETRY_AFTER_MS, &tags, ms);
            let cool = w.wait.min(shared.config.max_cooldown);
            if !cool.is_zero() && !self.cluster.is_empty() {
                let now_ms = cooldown::unix_ms(now);
                let until = now_ms.saturating_add(u64::try_from(cool.as_millis()).unwrap_or(u64::MAX));
                if cooldown::record(h, &self.cluster, until, now_ms) {
                    self.count(h, metric::COOLDOWN_RECORDED, &[]);
                } else {
                    log::warn!("{NAME}: could not record the cooldown of cluster {}", self.cluster);
                }
            }
        }
        let to = shared.config.rate_limit_status_to;
        log::info!(
            "{NAME}: provider {provider} (cluster {}) answered 429 (wait {} ms){}",
            self.cluster,
            wait.map_or(0, |w| w.wait.as_millis()),
            if to == 429 { String::new() } else { format!("; shown to the router as {to}") }
        );
        if to != 429 {
            h.set_response_header(":status", Some(to.to_string().as_bytes()));
            h.set_response_header(ORIGINAL_STATUS_HEADER, Some(b"429"));
            x.response.status = to;
        }
    }

    /// A held error answer: mark a context-window overflow retriable.
    fn check_overflow(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &Chunk) {
        if !self.checking_overflow || !c.end {
            return;
        }
        self.checking_overflow = false;
        if x.response_headers_held() && is_context_overflow(&c.bytes, &self.shared.config.context_overflow_markers) {
            log::info!(
                "{NAME}: provider {} (cluster {}) answered {}: the prompt exceeds the model's context window; marked retriable",
                self.provider(),
                self.cluster,
                x.response.status
            );
            h.set_response_header(RETRY_MARKER_HEADER, Some(RETRY_MARKER_CONTEXT.as_bytes()));
            self.count(h, metric::CONTEXT_OVERFLOW, &[]);
        }
    }

    /// The client's chat request → the provider's API (its model already rewritten). A
    /// request the provider's API cannot express is refused with 400 naming what.
    fn translate_request(&mut self, t: &'static Translator, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let created = h.now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let Some(body) = x.request.json() else { return Flow::Continue };
        let opts =
            RequestOptions { default_max_tokens: self.endpoint.as_ref().map_or(DEFAULT_MAX_TOKENS, |e| e.max_tokens) };
        let ctx = ResponseContext::of(body, created);
        match (t.request)(body, &opts) {
            Ok(new) => {
                if let Some(v) = x.request.json_mut() {
                    *v = new;
                }
                // The wire now speaks the provider's API: usage tracking reads its answer so.
                x.request.api = t.dialect_api();
                self.answer = Some(ctx);
                self.count(h, metric::TRANSLATED, &[]);
                Flow::Continue
            }
            Err(e) => {
                log::info!(
                    "{NAME}: provider {} speaks {}: cannot translate the request: {}",
                    self.provider(),
                    t.dialect.name(),
                    e.0
                );
                self.count(h, metric::UNTRANSLATABLE, &[]);
                Flow::Reply(LocalReply::openai_error(
                    400,
                    "invalid_request_error",
                    "untranslatable_request",
                    &format!("{NAME}: provider {} speaks the {} API: {}", self.provider(), t.dialect.name(), e.0),
                ))
            }
        }
    }

    /// A whole JSON answer (or error) of the provider's API → the OpenAI chat form.
    fn translate_answer(&mut self, x: &mut Exchange) {
        let (Some(t), Some(ctx)) = (self.translator, self.answer.as_ref()) else { return };
        let ok = x.response.ok();
        let Some(body) = x.response.json() else { return };
        let new = if ok { Some((t.response)(body, ctx)) } else { (t.error)(body) };
        if let Some(new) = new {
            if let Some(v) = x.response.json_mut() {
                *v = new;
            }
        }
    }

    /// Whether a provider error should be held and read for a context-window overflow.
    fn may_be_overflow(&self, x: &Exchange) -> bool {
        let small = x
            .response
            .header("content-length")
            .and_then(|v| lossy(v).trim().parse::<usize>().ok())
            .is_none_or(|n| n <= MAX_ERROR_BODY);
        self.shared.config.retry_context_overflow
            && !x.response.local
            && CONTEXT_OVERFLOW_STATUSES.contains(&x.response.status)
            && matches!(x.response.kind, BodyKind::Json | BodyKind::Other)
            && !x.response.encoded
            && small
    }
}

/// Replace a chunk's provider events by their translation (`[DONE]` and non-JSON events of
/// the provider are dropped: the translator emits the client's own end).
fn translate_events(stream: &mut dyn StreamTranslate, c: &mut Chunk) {
    let mut out = Vec::with_capacity(c.events.len());
    for ev in c.events.drain(..) {
        if let Some(data) = ev.json.as_ref() {
            out.extend(stream.event(ev.sse.event.as_deref(), data));
        }
    }
    if c.end {
        out.extend(stream.finish());
    }
    c.events = out
        .into_iter()
        .map(|o| match o {
            StreamOut::Data(v) => Event::from_json(None, v),
            StreamOut::Done => Event::new(SseEvent::data_event("[DONE]")),
        })
        .collect();
    c.events_changed = true;
}

/// Whether an error body says the prompt exceeds the model's context window.
pub fn is_context_overflow(body: &[u8], markers: &[String]) -> bool {
    let text = lossy(body.get(..MAX_ERROR_BODY.min(body.len())).unwrap_or(body)).to_ascii_lowercase();
    markers.iter().any(|m| text.contains(m.as_str()))
}

/// The reply when `backup_models` is configured without the downstream role.
pub fn misconfigured_backup_models() -> LocalReply {
    LocalReply::openai_error(
        500,
        "server_error",
        "gateway_misconfigured",
        &format!(
            "{NAME}: backup_models needs the model-failover downstream role (role: downstream, in the connection \
             manager before the router): without it x-envoy-attempt-count may come from the client"
        ),
    )
}

impl Stage for UpstreamStage {
    fn on_request_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        let shared = Rc::clone(&self.shared);
        let config = &shared.config;
        let (cluster, ep) = shared.endpoint(h);
        self.cluster = cluster;
        self.endpoint = Some(Rc::clone(&ep));
        let mut attempt = 1;
        if !config.backup_models.is_empty() {
            if keys::filter_state(h, keys::FAILOVER_DOWNSTREAM).is_none() {
                log::error!(
                    "{NAME}: backup_models is configured but the downstream role did not run; refusing the attempt"
                );
                self.count(h, metric::MISCONFIGURED, &[]);
                return Flow::Reply(misconfigured_backup_models());
            }
            let header = x.request.header_str(ATTEMPT_COUNT_HEADER);
            if header.is_none() && !shared.warned_no_attempt_count.replace(true) {
                log::warn!(
                    "{NAME}: no x-envoy-attempt-count: set include_request_attempt_count: true on the virtual host, or backup_models are never used"
                );
            }
            attempt = attempt_number(header.as_deref());
        }
        self.target = model_for_attempt(config, attempt, ep.model.clone());

        self.translator = translate::translator(x.request.api, ep.api);
        if let Some(p) = ep.path.as_deref().or(self.translator.map(|t| t.path)) {
            x.set_request_header(h, ":path", Some(p.as_bytes()));
        }
        if let Some(t) = self.translator {
            for (name, value) in t.headers {
                x.set_request_header(h, name, Some(value.as_bytes()));
            }
            // Read the answer to translate it back; ask for an uncompressed one.
            x.want_response(ResponseUse::Track);
        }
        if let Some(a) = &ep.authority {
            x.set_request_header(h, ":authority", Some(a.as_bytes()));
        }
        for name in &ep.remove {
            if x.request.header(name).is_some() {
                x.set_request_header(h, name, None);
            }
        }
        if let Some((name, value)) = &ep.credential {
            x.set_request_header(h, name, Some(value.as_bytes()));
        }
        if ep.credential_missing {
            self.count(h, metric::CREDENTIAL_MISSING, &[]);
        }

        keys::set_filter_state(h, keys::PROVIDER, &ep.provider);
        if let Some(m) = &self.target {
            keys::set_filter_state(h, keys::UPSTREAM_MODEL, m);
        }
        self.count(h, metric::ATTEMPTS, &[]);
        log::debug!("{NAME} #{}: attempt {attempt} provider={} model={:?}", x.id, ep.provider, self.target);

        if !x.request.no_body {
            // A declared length over the cap: the pipeline refuses with 413 right after these
            // headers. Counted here, because Envoy runs no access-log callback (`on_done`) for
            // upstream filters and the 413 does not pass back through this filter.
            let declared = x.request.header_str("content-length").and_then(|v| v.trim().parse::<usize>().ok());
            if declared.is_some_and(|n| n > config.max_body_bytes) {
                self.counted_too_large = true;
                self.count(h, metric::BODY_TOO_LARGE, &[]);
            }
            self.wanted_body = true;
            let modify = self.target.is_some() || self.translator.is_some();
            x.want_body(if modify { BodyUse::Modify } else { BodyUse::Json });
        }
        Flow::Continue
    }

    fn on_request(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        if !self.wanted_body {
            return Flow::Continue;
        }
        self.decided = true;
        if x.request.body.as_ref().is_none_or(Vec::is_empty) {
            return Flow::Continue;
        }
        let Some(requested) = x.request.json().map(|v| api::model(v).map(str::to_string)) else {
            return match x.request.json_error() {
                Some(JsonError::NotObject) => self.passthrough(h, "not_object"),
                _ => self.passthrough(h, "not_json"),
            };
        };
        match &self.target {
            Some(target) if requested.as_deref() != Some(target.as_str()) => {
                // `sluice.model` stays the client's: this role never publishes it
                // (`FailoverPlugin::publishes_model`).
                if let Some(v) = x.request.json_mut() {
                    api::set_model(v, target);
                }
            }
            Some(_) => {}
            None => {
                if let Some(m) = &requested {
                    keys::set_filter_state(h, keys::UPSTREAM_MODEL, m);
                }
            }
        }
        match self.translator {
            Some(t) => self.translate_request(t, x, h),
            None => Flow::Continue,
        }
    }

    fn on_response_headers(&mut self, x: &mut Exchange, h: &mut dyn Host) -> Flow {
        // A provider must not be able to speak for the gateway.
        for name in [ORIGINAL_STATUS_HEADER, RETRY_MARKER_HEADER] {
            if x.response.header(name).is_some() {
                h.set_response_header(name, None);
                x.response.headers.retain(|(k, _)| k != name);
            }
        }
        if x.response.local {
            return Flow::Continue;
        }
        if x.response.status == 429 {
            self.rate_limited(x, h);
        } else if self.may_be_overflow(x) {
            // Hold the headers until the (small) error body is read: only then can it be
            // marked retriable, before the router decides.
            self.checking_overflow = true;
            x.hold_response_headers();
        }
        if let (Some(t), Some(ctx)) = (self.translator, self.answer.as_ref()) {
            match x.response.kind {
                BodyKind::Sse => {
                    self.stream = Some((t.stream)(ctx.clone()));
                    x.want_response(ResponseUse::Modify);
                }
                BodyKind::Json if !x.response.encoded => {
                    self.translate_json = true;
                    x.want_response(ResponseUse::Buffer);
                }
                _ => {}
            }
        }
        Flow::Continue
    }

    fn on_response_body(&mut self, x: &mut Exchange, h: &mut dyn Host, c: &mut Chunk) -> Flow {
        self.check_overflow(x, h, c);
        if let Some(stream) = self.stream.as_mut() {
            translate_events(stream.as_mut(), c);
        } else if self.translate_json && c.end {
            self.translate_json = false;
            self.translate_answer(x);
        }
        Flow::Continue
    }

    fn on_done(&mut self, x: &mut Exchange, h: &mut dyn Host) {
        // The pipeline refused the body for its size (413) while buffering it (a body without
        // a declared length). Only where the host runs this callback: Envoy does not for
        // upstream filters.
        if crate::stage::refused_too_large(x, self.wanted_body, self.decided) && !self.counted_too_large {
            self.counted_too_large = true;
            self.count(h, metric::BODY_TOO_LARGE, &[]);
        }
    }
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
