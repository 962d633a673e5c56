//! The upstream role: one instance per attempt, after Envoy picked the endpoint.
//!
//! Request headers: pick the model for this attempt (endpoint metadata, cluster metadata, or
//! a backup model by attempt number), apply the endpoint's provider profile (path,
//! authority, credential), drop the client's credential, and hold the headers while the
//! body arrives. Request body: rewrite `model` and `content-length`, or forward a body that
//! is not a JSON object unchanged. Response headers: a 429 is shown to the router as 503
//! (configurable) so outlier detection ejects the host and the retry policy moves on; the
//! original status travels in an internal header the downstream role puts back.

use crate::config::{
    validate_authority, validate_header_value, validate_path, AuthMode, Config, ProviderProfile, ORIGINAL_STATUS_HEADER,
};
use crate::retry_after::{format_seconds, provider_wait};
use crate::FILTER;
use serde_json::Value;
use sluice_core::config::validate_env_var_name;
use sluice_core::errors::LocalReply;
use sluice_core::host::{header_str, Host};
use sluice_core::keys;
use sluice_core::metrics::{tagged_name, MetricIds, MetricKind};

/// What the glue should return to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers while the body is buffered, or body chunks until the end).
    Pause,
    /// A local reply was sent; return Pause.
    Replied,
}

/// Metric base names.
pub mod metric {
    /// Attempts handled, by provider and model sent.
    pub const ATTEMPTS: &str = "sluice_failover_attempts";
    /// Provider 429s seen, by provider.
    pub const RATE_LIMITED: &str = "sluice_failover_rate_limited";
    /// Wait a provider asked for after a 429, in ms, by provider.
    pub const RETRY_AFTER_MS: &str = "sluice_failover_retry_after_ms";
    /// Bodies forwarded unchanged because they are not a JSON object, by reason.
    pub const BODY_PASSTHROUGH: &str = "sluice_failover_body_passthrough";
    /// Requests refused with 413.
    pub const BODY_TOO_LARGE: &str = "sluice_failover_body_too_large";
    /// Attempts sent without a provider credential that the endpoint asked for.
    pub const CREDENTIAL_MISSING: &str = "sluice_failover_credential_missing";
    /// Rate-limited statuses restored for the client by the downstream role.
    pub const STATUS_RESTORED: &str = "sluice_failover_status_restored";
}

/// Most distinct metric names one VM defines (labels are bounded by config anyway).
pub const MAX_METRIC_NAMES: usize = 512;

/// Count `by` on the counter `name`, defining it once per VM.
pub fn count<H: Host>(h: &mut H, ids: &mut MetricIds, name: &str, by: i64) {
    if let Some(id) = ids.get_or_define(name, |n| h.define_metric(MetricKind::Counter, n)) {
        h.increment_metric(id, by);
    }
}

/// Record `value` in the histogram `name`, defining it once per VM.
pub fn record<H: Host>(h: &mut H, ids: &mut MetricIds, name: &str, value: u64) {
    if let Some(id) = ids.get_or_define(name, |n| h.define_metric(MetricKind::Histogram, n)) {
        h.record_metric(id, value);
    }
}

/// The attempt number from `x-envoy-attempt-count` (1 when absent or unreadable).
pub fn attempt_number<H: Host>(h: &H) -> u32 {
    header_str(h.request_header("x-envoy-attempt-count"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// A `sluice` metadata value of the picked endpoint, else of its cluster.
pub fn endpoint_meta<H: Host>(h: &H, key: &str) -> Option<String> {
    let read = |path: [&str; 5]| {
        h.property(&path).map(|b| String::from_utf8_lossy(&b).trim().to_string()).filter(|s| !s.is_empty())
    };
    read(keys::host_metadata_path(key)).or_else(|| read(keys::cluster_metadata_path(key)))
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

/// The provider profile for this endpoint: the config's named profile, each field
/// overridden by endpoint (then cluster) metadata.
fn resolve_profile<H: Host>(config: &Config, h: &H, provider: Option<&str>) -> ProviderProfile {
    let base = provider.and_then(|p| config.providers.get(p)).cloned().unwrap_or_default();
    let auth = match endpoint_meta(h, "auth") {
        Some(v) => match AuthMode::parse(&v) {
            Some(m) => Some(m),
            None => {
                log::warn!("{FILTER}: endpoint metadata sluice.auth={v:?} is not provider|passthrough; using provider");
                Some(AuthMode::Provider)
            }
        },
        None => base.auth,
    };
    ProviderProfile {
        path: endpoint_meta(h, "path").or(base.path),
        authority: endpoint_meta(h, "authority").or(base.authority),
        credential_env: endpoint_meta(h, "credential_env").or(base.credential_env),
        credential_header: endpoint_meta(h, "credential_header").or(base.credential_header),
        credential_prefix: endpoint_meta(h, "credential_prefix").or(base.credential_prefix),
        auth,
    }
}

/// Per-attempt state of the upstream role.
#[derive(Debug, Default)]
pub struct UpstreamAttempt {
    /// Model this attempt should carry (`None`: leave the client's).
    pub target_model: Option<String>,
    /// Provider name for metrics and filter state.
    pub provider: String,
    /// Whether the body is being buffered.
    buffering: bool,
    /// A reply was sent; ignore later callbacks.
    done: bool,
}

impl UpstreamAttempt {
    /// A fresh attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Request headers of this attempt.
    pub fn on_request_headers<H: Host>(
        &mut self,
        config: &Config,
        h: &mut H,
        ids: &mut MetricIds,
        end_of_stream: bool,
    ) -> Step {
        let attempt = attempt_number(h);
        let provider_meta = endpoint_meta(h, "provider");
        self.provider = provider_meta
            .clone()
            .or_else(|| header_str(h.property(&["xds", "cluster_name"])))
            .unwrap_or_else(|| "unknown".to_string());
        self.target_model = model_for_attempt(config, attempt, endpoint_meta(h, "model"));
        let profile = resolve_profile(config, h, provider_meta.as_deref());
        self.apply_profile(&profile, h, ids);

        keys::set_filter_state(h, keys::PROVIDER, &self.provider);
        if let Some(m) = &self.target_model {
            keys::set_filter_state(h, keys::UPSTREAM_MODEL, m);
        }
        let model_label = self.target_model.clone().unwrap_or_else(|| "client".to_string());
        let name = tagged_name(
            metric::ATTEMPTS,
            &[("gen_ai_provider_name", &self.provider), ("gen_ai_request_model", &model_label)],
        );
        count(h, ids, &name, 1);
        log::debug!("{FILTER}: attempt {attempt} provider={} model={:?}", self.provider, self.target_model);

        if end_of_stream {
            return Step::Continue;
        }
        let declared = header_str(h.request_header("content-length")).and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > config.max_body_bytes) {
            return self.too_large(config, h, ids);
        }
        self.buffering = true;
        Step::Pause
    }

    fn apply_profile<H: Host>(&self, p: &ProviderProfile, h: &mut H, ids: &mut MetricIds) {
        if let Some(path) = &p.path {
            match validate_path(path) {
                Ok(()) => h.set_request_header(":path", Some(path.as_bytes())),
                Err(e) => log::warn!("{FILTER}: provider {}: ignoring metadata path: {e}", self.provider),
            }
        }
        if let Some(a) = &p.authority {
            match validate_authority(a) {
                Ok(()) => h.set_request_header(":authority", Some(a.as_bytes())),
                Err(e) => log::warn!("{FILTER}: provider {}: ignoring metadata authority: {e}", self.provider),
            }
        }
        if p.auth == Some(AuthMode::Passthrough) {
            return;
        }
        // The client's credential is for the gateway, never for a provider.
        let header = p.credential_header.clone().unwrap_or_else(|| "authorization".to_string());
        h.set_request_header("authorization", None);
        if header != "authorization" && !header.starts_with(':') {
            h.set_request_header(&header, None);
        }
        let Some(env) = &p.credential_env else {
            return;
        };
        let prefix = p.credential_prefix.clone().unwrap_or_else(|| {
            if header == "authorization" {
                "Bearer ".to_string()
            } else {
                String::new()
            }
        });
        let key = validate_env_var_name(env)
            .ok()
            .and_then(|()| h.env_var(env))
            .filter(|k| !k.is_empty() && validate_header_value(k).is_ok());
        let header_ok = sluice_core::config::validate_header_name(&header).is_ok() && !header.starts_with(':');
        match key {
            Some(k) if header_ok && validate_header_value(&prefix).is_ok() => {
                let value = format!("{prefix}{k}");
                h.set_request_header(&header, Some(value.as_bytes()));
            }
            _ => {
                // Never log the value; the name of the variable is not secret.
                log::warn!(
                    "{FILTER}: provider {}: credential from env {env:?} unavailable (not in host_env_keys, empty or invalid); sending no credential",
                    self.provider
                );
                let name = tagged_name(metric::CREDENTIAL_MISSING, &[("gen_ai_provider_name", &self.provider)]);
                count(h, ids, &name, 1);
            }
        }
    }

    fn too_large<H: Host>(&mut self, config: &Config, h: &mut H, ids: &mut MetricIds) -> Step {
        self.done = true;
        count(h, ids, metric::BODY_TOO_LARGE, 1);
        h.send_reply(&LocalReply::body_too_large(FILTER, config.max_body_bytes));
        Step::Replied
    }

    /// A request body chunk; `body_size` is the buffered size so far (the total at the end).
    pub fn on_request_body<H: Host>(
        &mut self,
        config: &Config,
        h: &mut H,
        ids: &mut MetricIds,
        body_size: usize,
        end_of_stream: bool,
    ) -> Step {
        if self.done || !self.buffering {
            return Step::Continue;
        }
        if body_size > config.max_body_bytes {
            return self.too_large(config, h, ids);
        }
        if !end_of_stream {
            return Step::Pause;
        }
        self.buffering = false;
        let body = h.request_body(0, body_size).unwrap_or_default();
        let mut doc = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return self.passthrough(h, ids, "not_object"),
            Err(_) if body.is_empty() => return Step::Continue,
            Err(_) => return self.passthrough(h, ids, "not_json"),
        };
        let requested = doc.get("model").and_then(Value::as_str).map(str::to_string);
        match &self.target_model {
            Some(target) if requested.as_deref() != Some(target.as_str()) => {
                doc.insert("model".to_string(), Value::String(target.clone()));
                let new_body = serde_json::to_vec(&Value::Object(doc)).unwrap_or(body);
                h.set_request_body(0, body_size, &new_body);
                // Headers are still held (allow_on_headers_stop_iteration), so this is legal.
                h.set_request_header("content-length", Some(new_body.len().to_string().as_bytes()));
            }
            Some(_) => {}
            None => {
                if let Some(m) = &requested {
                    keys::set_filter_state(h, keys::UPSTREAM_MODEL, m);
                }
            }
        }
        Step::Continue
    }

    fn passthrough<H: Host>(&mut self, h: &mut H, ids: &mut MetricIds, reason: &str) -> Step {
        log::warn!("{FILTER}: provider {}: request body is {reason}; forwarded unchanged", self.provider);
        let name = tagged_name(metric::BODY_PASSTHROUGH, &[("sluice_reason", reason)]);
        count(h, ids, &name, 1);
        Step::Continue
    }

    /// Response headers of this attempt.
    pub fn on_response_headers<H: Host>(&mut self, config: &Config, h: &mut H, ids: &mut MetricIds) -> Step {
        // A provider must not be able to speak for the gateway.
        h.set_response_header(ORIGINAL_STATUS_HEADER, None);
        let status = header_str(h.response_header(":status")).and_then(|s| s.trim().parse::<u32>().ok());
        if status != Some(429) {
            return Step::Continue;
        }
        let name = tagged_name(metric::RATE_LIMITED, &[("gen_ai_provider_name", &self.provider)]);
        count(h, ids, &name, 1);
        let now = h.now();
        let wait = provider_wait(|n| header_str(h.response_header(n)), now);
        if let Some(w) = wait {
            let secs = format_seconds(w.wait);
            keys::set_filter_state(h, keys::RETRY_AFTER, &secs);
            let ms = u64::try_from(w.wait.as_millis()).unwrap_or(u64::MAX);
            let name = tagged_name(metric::RETRY_AFTER_MS, &[("gen_ai_provider_name", &self.provider)]);
            record(h, ids, &name, ms);
        }
        log::info!(
            "{FILTER}: provider {} answered 429 (wait {} ms); shown to the router as {}",
            self.provider,
            wait.map_or(0, |w| w.wait.as_millis()),
            config.rate_limit_status_to
        );
        if config.rate_limit_status_to != 429 {
            h.set_response_header(":status", Some(config.rate_limit_status_to.to_string().as_bytes()));
            h.set_response_header(ORIGINAL_STATUS_HEADER, Some(b"429"));
        }
        Step::Continue
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::config::load;
    use sluice_core::host::FakeHost;
    use std::time::{Duration, UNIX_EPOCH};

    fn host(headers: &[(&str, &str)], body: &str) -> FakeHost {
        let mut h = FakeHost::with_request_headers(headers);
        h.req_body = body.as_bytes().to_vec();
        h
    }

    fn meta(h: &mut FakeHost, key: &str, v: &str) {
        h.set_prop(&keys::host_metadata_path(key), v);
    }

    fn run(cfg: &Config, h: &mut FakeHost) -> (Step, Step) {
        let mut ids = MetricIds::new(64);
        let mut a = UpstreamAttempt::new();
        let s1 = a.on_request_headers(cfg, h, &mut ids, false);
        let n = h.req_body.len();
        let s2 = a.on_request_body(cfg, h, &mut ids, n, true);
        (s1, s2)
    }

    fn body_json(h: &FakeHost) -> Value {
        serde_json::from_slice(&h.req_body).unwrap()
    }

    #[test]
    fn endpoint_model_replaces_body_model_and_content_length() {
        let cfg = Config::default();
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"model":"client","temperature":0.5}"#;
        let mut h = host(&[("content-length", &body.len().to_string()), ("x-envoy-attempt-count", "1")], body);
        meta(&mut h, "model", "qwen-1.8b");
        meta(&mut h, "provider", "ollama");
        assert_eq!(run(&cfg, &mut h), (Step::Pause, Step::Continue));
        let v = body_json(&h);
        assert_eq!(v["model"], "qwen-1.8b");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(h.req_header("content-length").unwrap(), h.req_body.len().to_string());
        assert_eq!(h.prop(&[keys::UPSTREAM_MODEL]).as_deref(), Some("qwen-1.8b"));
        assert_eq!(h.prop(&[keys::PROVIDER]).as_deref(), Some("ollama"));
        // Key order is preserved: messages stays first.
        assert!(String::from_utf8(h.req_body.clone()).unwrap().starts_with(r#"{"messages""#));
    }

    #[test]
    fn no_model_in_request_gets_one_and_cluster_metadata_is_the_fallback() {
        let cfg = Config::default();
        let mut h = host(&[], r#"{"messages":[]}"#);
        h.set_prop(&keys::cluster_metadata_path("model"), "from-cluster");
        run(&cfg, &mut h);
        assert_eq!(body_json(&h)["model"], "from-cluster");
    }

    #[test]
    fn without_metadata_the_body_is_untouched() {
        let cfg = Config::default();
        let body = r#"{"model":"gpt-4o","messages":[]}"#;
        let mut h = host(&[("content-length", "33")], body);
        h.set_prop(&["xds", "cluster_name"], "llm");
        run(&cfg, &mut h);
        assert_eq!(h.req_body, body.as_bytes());
        assert_eq!(h.req_header("content-length").as_deref(), Some("33"));
        assert_eq!(h.prop(&[keys::UPSTREAM_MODEL]).as_deref(), Some("gpt-4o"));
        assert_eq!(h.prop(&[keys::PROVIDER]).as_deref(), Some("llm"));
    }

    #[test]
    fn backup_models_by_attempt() {
        let cfg = load(br#"{"backup_models":["gpt-4.0-turbo","gpt-3.5-turbo"]}"#).unwrap();
        let want = ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo", "gpt-3.5-turbo"];
        for (i, w) in want.iter().enumerate() {
            let attempt = (i + 1).to_string();
            let mut h = host(&[("x-envoy-attempt-count", &attempt)], r#"{"model":"gpt-4o","messages":[]}"#);
            run(&cfg, &mut h);
            assert_eq!(body_json(&h)["model"], *w, "attempt {attempt}");
        }
        assert_eq!(model_for_attempt(&cfg, 1, Some("m".into())).as_deref(), Some("m"));
        assert_eq!(model_for_attempt(&cfg, u32::MAX, None).as_deref(), Some("gpt-3.5-turbo"));
        assert_eq!(model_for_attempt(&Config::default(), 3, None), None);
    }

    #[test]
    fn attempt_header_garbage_means_first() {
        for v in ["", "zero", "0", "-1", "99999999999999"] {
            let h = FakeHost::with_request_headers(&[("x-envoy-attempt-count", v)]);
            assert_eq!(attempt_number(&h), 1, "{v}");
        }
    }

    #[test]
    fn provider_credential_replaces_client_authorization() {
        let cfg = load(br#"{"providers":{"openai":{"credential_env":"OPENAI_API_KEY","authority":"api.openai.com","path":"/v1/chat/completions"}}}"#).unwrap();
        let mut h = host(&[(":path", "/openai"), (":authority", "gw"), ("authorization", "Bearer client-jwt")], "{}");
        h.env.insert("OPENAI_API_KEY".into(), "sk-test".into());
        meta(&mut h, "provider", "openai");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization").as_deref(), Some("Bearer sk-test"));
        assert_eq!(h.req_header(":authority").as_deref(), Some("api.openai.com"));
        assert_eq!(h.req_header(":path").as_deref(), Some("/v1/chat/completions"));
    }

    #[test]
    fn azure_style_header_from_metadata() {
        let cfg = Config::default();
        let mut h = host(&[("authorization", "Bearer client"), ("api-key", "client-key")], "{}");
        h.env.insert("AZURE_KEY".into(), "az".into());
        meta(&mut h, "credential_env", "AZURE_KEY");
        meta(&mut h, "credential_header", "api-key");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization"), None);
        assert_eq!(h.req_header("api-key").as_deref(), Some("az"));
    }

    #[test]
    fn missing_key_sends_no_credential_and_counts() {
        let cfg = Config::default();
        let mut h = host(&[("authorization", "Bearer client")], "{}");
        meta(&mut h, "provider", "openai");
        meta(&mut h, "credential_env", "OPENAI_API_KEY");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization"), None);
        assert_eq!(h.metric("sluice_failover_credential_missing.gen_ai_provider_name=.=openai;.;"), Some(1));
        // An invalid variable name in metadata is treated the same way.
        let mut h = host(&[], "{}");
        h.env.insert("BAD-NAME".into(), "x".into());
        meta(&mut h, "credential_env", "BAD-NAME");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization"), None);
    }

    #[test]
    fn client_authorization_never_reaches_a_provider_unless_passthrough() {
        let cfg = load(br#"{"providers":{"local":{"auth":"passthrough"}}}"#).unwrap();
        let mut h = host(&[("authorization", "Bearer client")], "{}");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization"), None);
        let mut h = host(&[("authorization", "Bearer client")], "{}");
        meta(&mut h, "provider", "local");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization").as_deref(), Some("Bearer client"));
        let mut h = host(&[("authorization", "Bearer client")], "{}");
        meta(&mut h, "auth", "passthrough");
        run(&cfg, &mut h);
        assert_eq!(h.req_header("authorization").as_deref(), Some("Bearer client"));
    }

    #[test]
    fn hostile_metadata_values_are_ignored() {
        let cfg = Config::default();
        let mut h = host(&[(":path", "/v1/chat/completions"), (":authority", "gw")], "{}");
        meta(&mut h, "path", "no-slash");
        meta(&mut h, "authority", "evil/host");
        run(&cfg, &mut h);
        assert_eq!(h.req_header(":path").as_deref(), Some("/v1/chat/completions"));
        assert_eq!(h.req_header(":authority").as_deref(), Some("gw"));
    }

    #[test]
    fn non_json_bodies_pass_unchanged_and_count() {
        let cfg = Config::default();
        for (body, reason) in [("not json", "not_json"), ("[1,2]", "not_object"), ("\u{ff}\u{fe}", "not_json")] {
            let mut h = host(&[], body);
            meta(&mut h, "model", "m");
            assert_eq!(run(&cfg, &mut h), (Step::Pause, Step::Continue));
            assert_eq!(h.req_body, body.as_bytes());
            assert_eq!(h.metric(&format!("sluice_failover_body_passthrough.sluice_reason=.={reason};.;")), Some(1));
        }
        let mut h = FakeHost { req_body: vec![0xff, 0x00, 0x80], ..FakeHost::default() };
        run(&cfg, &mut h);
        assert_eq!(h.req_body, vec![0xff, 0x00, 0x80]);
    }

    #[test]
    fn body_over_the_cap_gets_413() {
        let cfg = load(br#"{"max_body_bytes":10}"#).unwrap();
        let mut ids = MetricIds::new(8);
        // Declared length over the cap: refused before buffering.
        let mut h = host(&[("content-length", "11")], "");
        let mut a = UpstreamAttempt::new();
        assert_eq!(a.on_request_headers(&cfg, &mut h, &mut ids, false), Step::Replied);
        assert_eq!(h.replies[0].status, 413);
        let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
        // Chunked body growing over the cap.
        let mut h = host(&[], "");
        let mut a = UpstreamAttempt::new();
        assert_eq!(a.on_request_headers(&cfg, &mut h, &mut ids, false), Step::Pause);
        assert_eq!(a.on_request_body(&cfg, &mut h, &mut ids, 5, false), Step::Pause);
        assert_eq!(a.on_request_body(&cfg, &mut h, &mut ids, 11, false), Step::Replied);
        assert_eq!(h.replies.len(), 1);
        assert_eq!(a.on_request_body(&cfg, &mut h, &mut ids, 20, true), Step::Continue);
        assert_eq!(h.replies.len(), 1);
    }

    #[test]
    fn headers_only_request_continues() {
        let cfg = Config::default();
        let mut ids = MetricIds::new(8);
        let mut h = FakeHost::with_request_headers(&[(":method", "GET")]);
        meta(&mut h, "model", "m");
        let mut a = UpstreamAttempt::new();
        assert_eq!(a.on_request_headers(&cfg, &mut h, &mut ids, true), Step::Continue);
    }

    fn respond(cfg: &Config, headers: &[(&str, &str)]) -> FakeHost {
        let mut ids = MetricIds::new(16);
        let mut h = host(&[], "{}");
        meta(&mut h, "provider", "openai");
        meta(&mut h, "model", "gpt-4o");
        h.time = Some(UNIX_EPOCH + Duration::from_secs(1000));
        let mut a = UpstreamAttempt::new();
        a.on_request_headers(cfg, &mut h, &mut ids, true);
        h.resp_headers = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        assert_eq!(a.on_response_headers(cfg, &mut h, &mut ids), Step::Continue);
        h
    }

    #[test]
    fn a_429_is_shown_to_the_router_as_503() {
        let h = respond(&Config::default(), &[(":status", "429"), ("retry-after", "60")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER).as_deref(), Some("429"));
        assert_eq!(h.resp_header("retry-after").as_deref(), Some("60"));
        assert_eq!(h.prop(&[keys::RETRY_AFTER]).as_deref(), Some("60"));
        assert_eq!(h.metric("sluice_failover_rate_limited.gen_ai_provider_name=.=openai;.;"), Some(1));
        assert_eq!(h.metric("sluice_failover_retry_after_ms.gen_ai_provider_name=.=openai;.;"), Some(60_000));
    }

    #[test]
    fn a_429_without_wait_headers_and_mapping_disabled() {
        let cfg = load(br#"{"rate_limit_status_to":429}"#).unwrap();
        let h = respond(&cfg, &[(":status", "429")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("429"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
        assert_eq!(h.prop(&[keys::RETRY_AFTER]), None);
        let h = respond(&Config::default(), &[(":status", "429"), ("x-ratelimit-reset-requests", "1.5s")]);
        assert_eq!(h.prop(&[keys::RETRY_AFTER]).as_deref(), Some("1.5"));
    }

    #[test]
    fn other_statuses_pass_and_provider_cannot_forge_internal_headers() {
        let h = respond(&Config::default(), &[(":status", "503"), (ORIGINAL_STATUS_HEADER, "200")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
        assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
        let h = respond(&Config::default(), &[(":status", "200")]);
        assert_eq!(h.resp_header(":status").as_deref(), Some("200"));
        assert_eq!(h.prop(&[keys::PROVIDER]).as_deref(), Some("openai"));
    }
}
