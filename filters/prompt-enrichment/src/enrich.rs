//! The enrichment itself: pick a profile in the headers phase, buffer the body, rewrite it
//! at end of stream. Pure logic over [`Host`]; `filter.rs` only maps [`Step`] to actions.

use crate::config::{Config, OnMissing, Profile};
use crate::template::{ValueTemplate, Variable};
use crate::FILTER_NAME;
use serde_json::{Map, Value};
use sluice_core::config::FailureMode;
use sluice_core::errors::LocalReply;
use sluice_core::host::{header_str, Host};
use sluice_core::keys;
use sluice_core::metrics::{tagged_name, MetricIds, MetricKind};
use sluice_core::wire::ChatRequest;

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

/// Per-VM metric ids.
#[derive(Debug)]
pub struct Metrics {
    ids: MetricIds,
}

impl Default for Metrics {
    fn default() -> Self {
        Self { ids: MetricIds::new(256) }
    }
}

impl Metrics {
    /// Count one request.
    pub fn count<H: Host>(&mut self, host: &mut H, profile: &str, verdict: Verdict, reason: &str) {
        let name = tagged_name(
            REQUESTS_METRIC,
            &[("sluice_rule", profile), ("sluice_action", verdict.as_str()), ("sluice_reason", reason)],
        );
        if let Some(id) = self.ids.get_or_define(&name, |n| host.define_metric(MetricKind::Counter, n)) {
            host.increment_metric(id, 1);
        }
    }
}

/// What the glue should return to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Let the request go on.
    Continue,
    /// Hold it (buffering, or a local reply was sent).
    Pause,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Phase {
    /// Nothing to do for this request (or not decided yet).
    #[default]
    Idle,
    /// Buffering the body for this profile.
    Buffering(String),
    /// Finished (rewritten, passed or refused).
    Done,
}

/// State of one HTTP request.
#[derive(Debug, Default)]
pub struct RequestState {
    phase: Phase,
    /// Envoy's context id, for logs.
    id: u32,
}

/// The result of enriching one body.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// New body bytes, and the model it names.
    Rewritten { body: Vec<u8>, model: Option<String> },
    /// Nothing to change; the model the body names.
    /// With `normalized`: the same request re-serialized (duplicate keys collapsed), to forward
    /// when the profile has caps, so the provider cannot read a different duplicate than we did.
    Unchanged { model: Option<String>, normalized: Option<Vec<u8>> },
    /// Not JSON (or not UTF-8, or not an object): cannot be enriched.
    NotJson(&'static str),
    /// Refused: reply and metric reason.
    Refused(LocalReply, &'static str),
}

impl RequestState {
    /// State for the request with this context id.
    pub fn new(id: u32) -> Self {
        Self { phase: Phase::Idle, id }
    }

    /// Headers phase: choose the profile; decide whether to buffer.
    pub fn on_request_headers<H: Host>(
        &mut self,
        host: &mut H,
        cfg: &Config,
        metrics: &mut Metrics,
        end_of_stream: bool,
    ) -> Step {
        self.phase = Phase::Done;
        let named = keys::route_metadata(host, &cfg.profile_metadata_key);
        let Some(name) = named.or_else(|| cfg.default_profile.clone()) else {
            metrics.count(host, "none", Verdict::Passthrough, "no_profile");
            return Step::Continue;
        };
        let Some(profile) = cfg.profile(&name) else {
            log::warn!("{FILTER_NAME}[{}]: route names unknown profile {name:?}", self.id);
            return match cfg.failure_mode {
                FailureMode::Allow => {
                    metrics.count(host, &name, Verdict::Passthrough, "unknown_profile");
                    Step::Continue
                }
                FailureMode::Deny => {
                    metrics.count(host, &name, Verdict::Refused, "unknown_profile");
                    host.send_reply(&LocalReply::misconfigured(FILTER_NAME));
                    Step::Pause
                }
            };
        };
        if end_of_stream {
            metrics.count(host, &profile.name, Verdict::Passthrough, "no_body");
            return Step::Continue;
        }
        if let Some(ct) = header_str(host.request_header("content-type")) {
            if !ct.to_ascii_lowercase().contains("json") {
                return self.not_json(host, cfg, metrics, &profile.name, "content-type is not JSON");
            }
        }
        let declared = header_str(host.request_header("content-length")).and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > cfg.max_body_bytes) {
            return self.too_large(host, cfg, metrics, &profile.name);
        }
        // The body may change length: Envoy must not forward the client's content-length.
        host.set_request_header("content-length", None);
        self.phase = Phase::Buffering(profile.name.clone());
        Step::Pause
    }

    /// Body phase: buffer to end of stream, then rewrite.
    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        cfg: &Config,
        metrics: &mut Metrics,
        body_size: usize,
        end_of_stream: bool,
    ) -> Step {
        let Phase::Buffering(name) = &self.phase else {
            return Step::Continue;
        };
        let name = name.clone();
        if body_size > cfg.max_body_bytes {
            return self.too_large(host, cfg, metrics, &name);
        }
        if !end_of_stream {
            return Step::Pause;
        }
        self.phase = Phase::Done;
        let Some(profile) = cfg.profile(&name) else {
            return Step::Continue;
        };
        if body_size == 0 {
            metrics.count(host, &name, Verdict::Passthrough, "no_body");
            return Step::Continue;
        }
        let body = host.request_body(0, body_size).unwrap_or_default();
        let outcome = {
            let h: &H = host;
            let mut lookup = |v: &Variable| lookup_variable(h, v);
            enrich_body(&body, profile, &mut lookup)
        };
        match outcome {
            Outcome::Rewritten { body: new, model } => {
                host.set_request_body(0, body_size, &new);
                note_model(host, model.as_deref());
                metrics.count(host, &name, Verdict::Enriched, "ok");
                Step::Continue
            }
            Outcome::Unchanged { model, normalized } => {
                if let Some(n) = normalized {
                    host.set_request_body(0, body_size, &n);
                }
                note_model(host, model.as_deref());
                metrics.count(host, &name, Verdict::Passthrough, "unchanged");
                Step::Continue
            }
            Outcome::NotJson(why) => self.not_json(host, cfg, metrics, &name, why),
            Outcome::Refused(reply, reason) => {
                log::info!("{FILTER_NAME}[{}]: refused ({reason}) with profile {name}", self.id);
                metrics.count(host, &name, Verdict::Refused, reason);
                host.send_reply(&reply);
                Step::Pause
            }
        }
    }

    /// Trailers while still buffering (rare for chat requests): forward unchanged.
    pub fn on_request_trailers<H: Host>(&mut self, host: &mut H, metrics: &mut Metrics) -> Step {
        if let Phase::Buffering(name) = std::mem::replace(&mut self.phase, Phase::Done) {
            log::info!("{FILTER_NAME}[{}]: request has trailers; forwarded without enrichment", self.id);
            metrics.count(host, &name, Verdict::Passthrough, "trailers");
        }
        Step::Continue
    }

    fn not_json<H: Host>(&mut self, host: &mut H, cfg: &Config, metrics: &mut Metrics, name: &str, why: &str) -> Step {
        self.phase = Phase::Done;
        match cfg.failure_mode {
            FailureMode::Allow => {
                log::debug!("{FILTER_NAME}[{}]: passing a body that is not JSON: {why}", self.id);
                metrics.count(host, name, Verdict::Passthrough, "not_json");
                Step::Continue
            }
            FailureMode::Deny => {
                metrics.count(host, name, Verdict::Refused, "not_json");
                host.send_reply(&LocalReply::invalid_json(FILTER_NAME, why));
                Step::Pause
            }
        }
    }

    fn too_large<H: Host>(&mut self, host: &mut H, cfg: &Config, metrics: &mut Metrics, name: &str) -> Step {
        self.phase = Phase::Done;
        metrics.count(host, name, Verdict::Refused, "too_large");
        host.send_reply(&LocalReply::body_too_large(FILTER_NAME, cfg.max_body_bytes));
        Step::Pause
    }
}

/// The value of a template variable for this request.
pub fn lookup_variable<H: Host + ?Sized>(host: &H, v: &Variable) -> Option<String> {
    match v {
        Variable::User => keys::filter_state(host, keys::USER),
        Variable::Team => keys::filter_state(host, keys::TEAM),
        Variable::Claim(name) => keys::filter_state(host, &keys::claim_key(name)),
        Variable::Header(name) => header_str(host.request_header(name)),
        Variable::Route(key) => keys::route_metadata(host, key),
    }
}

/// Record the requested model for later filters and the access log, unless a filter before
/// us already did.
fn note_model<H: Host>(host: &mut H, model: Option<&str>) {
    if let Some(m) = model.filter(|m| !m.is_empty()) {
        if keys::filter_state(host, keys::REQUESTED_MODEL).is_none() {
            keys::set_filter_state(host, keys::REQUESTED_MODEL, m);
        }
    }
}

fn missing_variable(profile: &Profile, v: &Variable) -> Outcome {
    let msg = format!(
        "{FILTER_NAME}: template variable {{{{{v}}}}} has no value for this request (profile {})",
        profile.name
    );
    Outcome::Refused(
        LocalReply::openai_error(400, "invalid_request_error", "missing_template_variable", &msg),
        "missing_variable",
    )
}

fn invalid_request(msg: &str) -> Outcome {
    Outcome::Refused(
        LocalReply::openai_error(400, "invalid_request_error", "invalid_request", &format!("{FILTER_NAME}: {msg}")),
        "invalid_request",
    )
}

/// Apply `profile` to a request body.
///
/// The client's body is first checked as a typed chat request (a known field of the wrong
/// type is refused); then field defaults (set when absent or `null`), overrides, caps, and
/// the messages are applied.
/// `stream_options` is only set on streaming requests (providers reject it otherwise).
/// A body without `messages` gets the field changes only.
pub fn enrich_body(body: &[u8], profile: &Profile, lookup: &mut dyn FnMut(&Variable) -> Option<String>) -> Outcome {
    let Ok(text) = std::str::from_utf8(body) else {
        return Outcome::NotJson("body is not valid UTF-8");
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Outcome::NotJson("body is not valid JSON");
    };
    let Value::Object(mut map) = value else {
        return Outcome::NotJson("body is not a JSON object");
    };
    // The client's request must be a chat request of the right shape: a known field of the
    // wrong type is refused here (as the provider would), never forwarded past a cap. Checked
    // before any change so error paths name the client's own message indexes.
    if let Err(e) = ChatRequest::parse(body) {
        return invalid_request(&format!("request body has an unexpected shape: {e}"));
    }
    let refuse = profile.on_missing == OnMissing::Refuse;
    let mut changed = false;

    // Fields. stream_options last, once `stream` is final.
    let ops =
        profile.defaults.iter().map(|(k, t)| (k, t, false)).chain(profile.overrides.iter().map(|(k, t)| (k, t, true)));
    let (plain, stream_opts): (Vec<_>, Vec<_>) = ops.partition(|(k, _, _)| k.as_str() != "stream_options");
    for (field, template, always) in plain.into_iter().chain(stream_opts) {
        if field == "stream_options" && map.get("stream") != Some(&Value::Bool(true)) {
            continue;
        }
        if !always && !map.get(field.as_str()).is_none_or(Value::is_null) {
            continue;
        }
        match set_field(&mut map, field, template, lookup, refuse) {
            Ok(c) => changed |= c,
            Err(v) => return missing_variable(profile, &v),
        }
    }
    for (field, cap) in &profile.caps {
        match map.get(field.as_str()) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                if let (Some(have), Some(max)) = (n.as_f64(), cap.as_f64()) {
                    if have > max {
                        map.insert(field.clone(), Value::Number(cap.clone()));
                        changed = true;
                    }
                }
            }
            Some(_) => {
                return invalid_request(&format!("field {field} must be a number (the gateway caps it at {cap})"))
            }
        }
    }

    if profile.has_message_ops() {
        if let Some(Value::Array(messages)) = map.get_mut("messages") {
            let pre = match render_messages(&profile.prepend, lookup, refuse) {
                Ok(m) => m,
                Err(v) => return missing_variable(profile, &v),
            };
            let post = match render_messages(&profile.append, lookup, refuse) {
                Ok(m) => m,
                Err(v) => return missing_variable(profile, &v),
            };
            messages.splice(0..0, pre);
            messages.extend(post);
            changed = true;
        }
    }

    // What the gateway adds was type-checked at config load (fields, messages, integer caps),
    // so the result is still a valid chat request. The body goes out as the JSON object it
    // came in (client key order kept), re-serialized only when something changed.
    let model = map.get("model").and_then(Value::as_str).map(str::to_string);
    if changed {
        Outcome::Rewritten { body: serde_json::to_vec(&map).unwrap_or_default(), model }
    } else {
        // `{"max_tokens": 5000, "max_tokens": 10}` parses as 10 (last wins); a provider reading
        // the first would get 5000 past the cap. Forward what we checked.
        let normalized = (!profile.caps.is_empty()).then(|| serde_json::to_vec(&map).unwrap_or_default());
        Outcome::Unchanged { model, normalized }
    }
}

/// Set `field` to the rendered template; `Ok(true)` when the value changed.
fn set_field(
    map: &mut Map<String, Value>,
    field: &str,
    template: &ValueTemplate,
    lookup: &mut dyn FnMut(&Variable) -> Option<String>,
    refuse: bool,
) -> Result<bool, Variable> {
    let value = template.render(lookup, refuse)?;
    if map.get(field) == Some(&value) {
        return Ok(false);
    }
    map.insert(field.to_string(), value);
    Ok(true)
}

fn render_messages(
    templates: &[ValueTemplate],
    lookup: &mut dyn FnMut(&Variable) -> Option<String>,
    refuse: bool,
) -> Result<Vec<Value>, Variable> {
    templates.iter().map(|t| t.render(lookup, refuse)).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::host::FakeHost;

    const SYSTEM: &str = "Parse the unstructured text into CSV format. Respond only with the CSV data.";

    fn config(v: Value) -> Config {
        Config::from_json(v.to_string().as_bytes()).unwrap()
    }

    fn seed_config() -> Config {
        config(json!({
            "default_profile": "csv",
            "max_body_bytes": 2048,
            "profiles": {
                "csv": {"prepend": [{"role": "system", "content": SYSTEM}]},
                "team": {
                    "prepend": [{"role": "system", "content": "You answer for team {{team}} ({{header.x-team}}, {{route.tier}}, {{claim.org}}, {{user}})."}],
                    "append": [{"role": "user", "content": [{"type": "text", "text": "Reply in {{header.x-lang}}."}]}]
                },
                "strict": {
                    "prepend": [{"role": "system", "content": "Team {{claim.team}}"}],
                    "on_missing_variable": "refuse"
                },
                "fields": {
                    "defaults": {"temperature": 0.2, "max_tokens": 256, "user": "{{user}}", "stream_options": {"include_usage": true}},
                    "overrides": {"top_p": 0.5, "metadata": {"team": "{{team}}"}},
                    "caps": {"max_tokens": 1024, "max_completion_tokens": 512, "temperature": 1.5}
                }
            }
        }))
    }

    fn body(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn parsed(h: &FakeHost) -> Value {
        serde_json::from_slice(&h.req_body).unwrap()
    }

    /// Run headers + one body callback with the whole body; returns (headers step, body step).
    fn run(h: &mut FakeHost, cfg: &Config, req: &[u8]) -> (Step, Step) {
        let mut m = Metrics::default();
        run_with(h, cfg, &mut m, req)
    }

    fn run_with(h: &mut FakeHost, cfg: &Config, m: &mut Metrics, req: &[u8]) -> (Step, Step) {
        h.req_body = req.to_vec();
        if !h.req_headers.iter().any(|(k, _)| k == "content-length") {
            h.req_headers.push(("content-length".into(), req.len().to_string().into_bytes()));
        }
        let mut st = RequestState::default();
        let s1 = st.on_request_headers(h, cfg, m, req.is_empty());
        let s2 = st.on_request_body(h, cfg, m, req.len(), true);
        (s1, s2)
    }

    fn host(route_profile: Option<&str>) -> FakeHost {
        let mut h = FakeHost::with_request_headers(&[(":method", "POST"), ("content-type", "application/json")]);
        if let Some(p) = route_profile {
            h.set_prop(&keys::route_metadata_path("enrichment_profile"), p);
        }
        h
    }

    fn metric(h: &FakeHost, profile: &str, verdict: &str, reason: &str) -> i64 {
        let name = tagged_name(
            REQUESTS_METRIC,
            &[("sluice_rule", profile), ("sluice_action", verdict), ("sluice_reason", reason)],
        );
        h.metric(&name).unwrap_or(0)
    }

    #[test]
    fn seed_004_system_prompt_first_client_fields_untouched() {
        let cfg = seed_config();
        let mut h = host(None);
        let client = json!({
            "model": "gpt-4o-mini", "max_tokens": 128, "temperature": 0.7, "vendor_x": {"k": [1, 2]},
            "messages": [{"role": "user", "content": "Seattle, Los Angeles, and Chicago are cities in the United States."}]
        });
        assert_eq!(run(&mut h, &cfg, &body(&client)), (Step::Pause, Step::Continue));
        assert_eq!(h.req_header("content-length"), None, "content-length removed in the headers phase");
        let got = parsed(&h);
        let mut want = client.clone();
        want["messages"] = json!([{"role": "system", "content": SYSTEM}, client["messages"][0]]);
        assert_eq!(got, want);
        assert_eq!(metric(&h, "csv", "enriched", "ok"), 1);
        assert_eq!(h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("gpt-4o-mini"));
        assert!(h.replies.is_empty());
    }

    #[test]
    fn streaming_and_parts_content_kept() {
        let cfg = seed_config();
        let mut h = host(Some("csv"));
        let client = json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "client system"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "r"}
            ]
        });
        run(&mut h, &cfg, &body(&client));
        let got = parsed(&h);
        assert_eq!(got["messages"].as_array().unwrap().len(), 5);
        assert_eq!(got["messages"][0], json!({"role": "system", "content": SYSTEM}));
        assert_eq!(got["messages"].as_array().unwrap()[1..], client["messages"].as_array().unwrap()[..]);
        assert_eq!(got["stream"], json!(true));
        assert_eq!(got["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn templates_from_identity_headers_and_route() {
        let cfg = seed_config();
        let mut h = host(Some("team"));
        h.set_prop(&[keys::TEAM], "dev");
        h.set_prop(&[keys::USER], "alice");
        h.set_prop(&[&keys::claim_key("org")], "acme");
        h.set_prop(&keys::route_metadata_path("tier"), "gold");
        h.req_headers.push(("x-team".into(), b"ops".to_vec()));
        h.req_headers.push(("x-lang".into(), b"French".to_vec()));
        run(&mut h, &cfg, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
        let got = parsed(&h);
        assert_eq!(got["messages"][0]["content"], "You answer for team dev (ops, gold, acme, alice).");
        assert_eq!(got["messages"][1], json!({"role": "user", "content": "hi"}));
        assert_eq!(
            got["messages"][2],
            json!({"role": "user", "content": [{"type": "text", "text": "Reply in French."}]})
        );
    }

    #[test]
    fn missing_variable_empty_or_refused() {
        let cfg = seed_config();
        let mut h = host(Some("team"));
        run(&mut h, &cfg, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
        assert_eq!(parsed(&h)["messages"][0]["content"], "You answer for team  (, , , ).");

        let mut h = host(Some("strict"));
        let (_, s) = run(&mut h, &cfg, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
        assert_eq!(s, Step::Pause);
        assert_eq!(h.replies.len(), 1);
        let r = &h.replies[0];
        assert_eq!(r.status, 400);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "missing_template_variable");
        assert!(v["error"]["message"].as_str().unwrap().contains("{{claim.team}}"), "{v}");
        assert_eq!(metric(&h, "strict", "refused", "missing_variable"), 1);

        let mut h = host(Some("strict"));
        h.set_prop(&[&keys::claim_key("team")], "dev");
        run(&mut h, &cfg, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
        assert!(h.replies.is_empty());
        assert_eq!(parsed(&h)["messages"][0]["content"], "Team dev");
    }

    #[test]
    fn defaults_overrides_caps() {
        let cfg = seed_config();
        let cases = [
            // (client fields, expected fields; absent = null here)
            (
                json!({}),
                json!({"temperature": 0.2, "max_tokens": 256, "user": "alice", "top_p": 0.5, "metadata": {"team": "dev"}}),
            ),
            (
                json!({"temperature": 0.9, "max_tokens": 50, "user": "bob", "top_p": 1, "metadata": {"x": 1}}),
                json!({"temperature": 0.9, "max_tokens": 50, "user": "bob", "top_p": 0.5, "metadata": {"team": "dev"}}),
            ),
            (
                json!({"max_tokens": 5000, "max_completion_tokens": 9000, "temperature": 2}),
                json!({"max_tokens": 1024, "max_completion_tokens": 512, "temperature": 1.5}),
            ),
            (json!({"max_tokens": null, "temperature": null}), json!({"max_tokens": 256, "temperature": 0.2})),
            (json!({"stream": true}), json!({"stream_options": {"include_usage": true}})),
            (
                json!({"stream": true, "stream_options": {"include_usage": false}}),
                json!({"stream_options": {"include_usage": false}}),
            ),
            (json!({"stream": false}), json!({"stream_options": null})),
        ];
        for (client, want) in cases {
            let mut h = host(Some("fields"));
            h.set_prop(&[keys::TEAM], "dev");
            h.set_prop(&[keys::USER], "alice");
            let mut req = client.clone();
            req["messages"] = json!([{"role": "user", "content": "x"}]);
            run(&mut h, &cfg, &body(&req));
            let got = parsed(&h);
            for (k, v) in want.as_object().unwrap() {
                let have = got.get(k).cloned().unwrap_or(Value::Null);
                assert_eq!(&have, v, "client {client}: field {k} in {got}");
            }
            assert_eq!(
                got["messages"],
                json!([{"role": "user", "content": "x"}]),
                "fields-only profile keeps messages"
            );
        }
    }

    #[test]
    fn cap_refuses_non_numbers() {
        let cfg = seed_config();
        let mut h = host(Some("fields"));
        run(&mut h, &cfg, &body(&json!({"temperature": "2", "messages": []})));
        assert_eq!(h.replies[0].status, 400);
        let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(v["error"]["message"].as_str().unwrap().contains("temperature must be a number"));
    }

    #[test]
    fn duplicate_keys_cannot_dodge_a_cap() {
        let cfg = config(json!({"default_profile": "c", "profiles": {"c": {"caps": {"max_tokens": 10}}}}));
        let mut h = host(None);
        run(&mut h, &cfg, br#"{"max_tokens":5000,"max_tokens":5,"messages":[]}"#);
        assert_eq!(h.req_body, br#"{"max_tokens":5,"messages":[]}"#.to_vec());
    }

    #[test]
    fn unchanged_body_is_not_rewritten() {
        let cfg = config(json!({"default_profile": "c", "profiles": {"c": {"defaults": {"max_tokens": 10}}}}));
        let mut h = host(None);
        let raw = br#"{ "max_tokens" : 5, "messages":[{"content":"x","role":"user"}] }"#;
        run(&mut h, &cfg, raw);
        assert_eq!(h.req_body, raw.to_vec());
        assert_eq!(metric(&h, "c", "passthrough", "unchanged"), 1);
    }

    #[test]
    fn body_without_messages_gets_fields_only() {
        let cfg = config(json!({"default_profile": "c", "profiles": {"c": {
            "prepend": [{"role": "system", "content": "s"}], "defaults": {"user": "u"}}}}));
        let mut h = host(None);
        run(&mut h, &cfg, br#"{"input":"embed me","model":"e"}"#);
        assert_eq!(parsed(&h), json!({"input": "embed me", "model": "e", "user": "u"}));
        let mut h = host(None);
        run(&mut h, &cfg, br#"{"messages":[]}"#);
        assert_eq!(parsed(&h), json!({"messages": [{"role": "system", "content": "s"}], "user": "u"}));
    }

    #[test]
    fn not_json_passes_and_is_counted() {
        let cfg = seed_config();
        let bad: &[&[u8]] = &[b"not json", b"\xff\xfe{}", b"[1,2]", b"\"s\"", b"{\"a\":", &b"[".repeat(200)];
        let mut m = Metrics::default();
        let mut h = host(None);
        for b in bad {
            h.req_headers.retain(|(k, _)| k != "content-length");
            let (s1, s2) = run_with(&mut h, &cfg, &mut m, b);
            assert_eq!((s1, s2), (Step::Pause, Step::Continue), "{b:?}");
            assert_eq!(h.req_body, b.to_vec(), "unchanged");
        }
        assert!(h.replies.is_empty());
        assert_eq!(metric(&h, "csv", "passthrough", "not_json"), bad.len() as i64);

        // A non-JSON content-type is not even buffered.
        let mut h = FakeHost::with_request_headers(&[
            ("content-type", "multipart/form-data; boundary=x"),
            ("content-length", "5"),
        ]);
        let mut m = Metrics::default(); // metric ids are per host (per VM)
        let mut st = RequestState::default();
        assert_eq!(st.on_request_headers(&mut h, &cfg, &mut m, false), Step::Continue);
        assert_eq!(h.req_header("content-length").as_deref(), Some("5"));
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 5, true), Step::Continue);
        assert_eq!(metric(&h, "csv", "passthrough", "not_json"), 1);
    }

    #[test]
    fn not_json_refused_when_deny() {
        let cfg = config(
            json!({"default_profile": "c", "failure_mode": "deny", "profiles": {"c": {"caps": {"max_tokens": 1}}}}),
        );
        let mut h = host(None);
        let (_, s) = run(&mut h, &cfg, b"nope");
        assert_eq!(s, Step::Pause);
        assert_eq!(h.replies[0].status, 400);
        assert_eq!(metric(&h, "c", "refused", "not_json"), 1);
    }

    #[test]
    fn wrong_shape_is_refused() {
        let cfg = seed_config();
        for b in [
            json!({"messages": 3}),
            json!({"messages": [{"content": "x"}]}),
            json!({"max_tokens": "ten", "messages": []}),
        ] {
            let mut h = host(None);
            run(&mut h, &cfg, &body(&b));
            assert_eq!(h.replies.len(), 1, "{b}");
            assert_eq!(h.replies[0].status, 400);
            let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
            assert_eq!(v["error"]["code"], "invalid_request", "{b}");
            assert_eq!(metric(&h, "csv", "refused", "invalid_request"), 1);
            if b["messages"].is_array() && b["messages"].as_array().unwrap().len() == 1 {
                let msg = v["error"]["message"].as_str().unwrap();
                assert!(msg.contains("messages[0].role: missing required field"), "{msg}");
            }
        }
    }

    #[test]
    fn size_cap() {
        let cfg = seed_config();
        // Declared too large: refused in the headers phase.
        let mut h = FakeHost::with_request_headers(&[("content-length", "4096")]);
        let mut m = Metrics::default();
        let mut st = RequestState::default();
        assert_eq!(st.on_request_headers(&mut h, &cfg, &mut m, false), Step::Pause);
        assert_eq!(h.replies[0].status, 413);
        // Chunked: refused once the buffered size passes the cap, never again after.
        let mut h = FakeHost::with_request_headers(&[("transfer-encoding", "chunked")]);
        let mut m = Metrics::default();
        let mut st = RequestState::default();
        assert_eq!(st.on_request_headers(&mut h, &cfg, &mut m, false), Step::Pause);
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 1000, false), Step::Pause);
        assert!(h.replies.is_empty());
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 3000, false), Step::Pause);
        assert_eq!(h.replies.len(), 1);
        assert_eq!(h.replies[0].status, 413);
        let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 3000, true), Step::Continue);
        assert_eq!(h.replies.len(), 1);
        assert_eq!(metric(&h, "csv", "refused", "too_large"), 1);
    }

    #[test]
    fn profile_selection() {
        let cfg = seed_config();
        // Unknown route profile: allow -> untouched, no buffering.
        let mut h = host(Some("nope"));
        h.req_headers.push(("content-length".into(), b"10".to_vec()));
        let mut st = RequestState::default();
        assert_eq!(st.on_request_headers(&mut h, &cfg, &mut Metrics::default(), false), Step::Continue);
        assert_eq!(h.req_header("content-length").as_deref(), Some("10"));
        assert_eq!(metric(&h, "nope", "passthrough", "unknown_profile"), 1);
        // ... deny -> 500.
        let deny = config(json!({"failure_mode": "deny", "profiles": {"c": {"caps": {"a": 1}}}}));
        let mut h = host(Some("nope"));
        assert_eq!(
            RequestState::default().on_request_headers(&mut h, &deny, &mut Metrics::default(), false),
            Step::Pause
        );
        assert_eq!(h.replies[0].status, 500);
        // No route profile and no default: untouched.
        let mut h = host(None);
        assert_eq!(
            RequestState::default().on_request_headers(&mut h, &deny, &mut Metrics::default(), false),
            Step::Continue
        );
        assert_eq!(metric(&h, "none", "passthrough", "no_profile"), 1);
        // No body.
        let mut h = host(None);
        assert_eq!(
            RequestState::default().on_request_headers(&mut h, &cfg, &mut Metrics::default(), true),
            Step::Continue
        );
        assert_eq!(metric(&h, "csv", "passthrough", "no_body"), 1);
        // A custom metadata key.
        let keyed = config(json!({"profile_metadata_key": "prompt", "profiles": {"c": {"defaults": {"user": "u"}}}}));
        let mut h = host(None);
        h.set_prop(&keys::route_metadata_path("prompt"), "c");
        run(&mut h, &keyed, br#"{"messages":[]}"#);
        assert_eq!(parsed(&h)["user"], "u");
    }

    #[test]
    fn chunked_body_is_buffered_until_end() {
        let cfg = seed_config();
        let mut h = host(None);
        let mut m = Metrics::default();
        let mut st = RequestState::default();
        let full = body(&json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(st.on_request_headers(&mut h, &cfg, &mut m, false), Step::Pause);
        h.req_body = full[..5].to_vec();
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 5, false), Step::Pause);
        h.req_body = full.clone();
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, full.len(), true), Step::Continue);
        assert_eq!(parsed(&h)["messages"][0]["role"], "system");
        // Later callbacks (none expected) do nothing.
        assert_eq!(st.on_request_body(&mut h, &cfg, &mut m, 1, true), Step::Continue);
        assert_eq!(st.on_request_trailers(&mut h, &mut m), Step::Continue);
    }

    #[test]
    fn trailers_while_buffering_pass() {
        let cfg = seed_config();
        let mut h = host(None);
        let mut m = Metrics::default();
        let mut st = RequestState::default();
        st.on_request_headers(&mut h, &cfg, &mut m, false);
        st.on_request_body(&mut h, &cfg, &mut m, 3, false);
        assert_eq!(st.on_request_trailers(&mut h, &mut m), Step::Continue);
        assert_eq!(metric(&h, "csv", "passthrough", "trailers"), 1);
    }

    #[test]
    fn requested_model_not_overwritten() {
        let cfg = seed_config();
        let mut h = host(None);
        h.set_prop(&[keys::REQUESTED_MODEL], "earlier");
        run(&mut h, &cfg, br#"{"model":"m","messages":[]}"#);
        assert_eq!(h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("earlier"));
    }

    #[test]
    fn hostile_values_stay_inside_strings() {
        let cfg = seed_config();
        let mut h = host(Some("team"));
        h.set_prop(&[keys::TEAM], "\"}],\"model\":\"evil\",\"x\":[{\"a\":\"\u{0}\n");
        run(&mut h, &cfg, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let got = parsed(&h);
        assert_eq!(got["model"], "m");
        assert!(got["messages"][0]["content"].as_str().unwrap().contains("\"model\":\"evil\""));
        assert_eq!(got.as_object().unwrap().len(), 2);
    }

    /// Deterministic pseudo-random bodies (mutations of a valid request): never a panic,
    /// always one of the documented outcomes.
    #[test]
    fn mutated_bodies_never_panic() {
        let cfg = seed_config();
        let seed_body = body(&json!({
            "model": "m", "stream": true, "max_tokens": 5000, "temperature": 3,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo 日本"}]}]
        }));
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,0123456789.-eE truefalsnl\\u\xff\xc3";
        for round in 0..3000 {
            let mut b = seed_body.clone();
            for _ in 0..(1 + next() % 4) {
                let pos = (next() as usize) % (b.len() + 1);
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if pos < b.len() => b[pos] = byte,
                    1 if pos < b.len() => {
                        b.remove(pos);
                    }
                    _ => b.insert(pos, byte),
                }
            }
            let profile = ["csv", "team", "strict", "fields"][round % 4];
            let mut h = host(Some(profile));
            let (_, step) = run(&mut h, &cfg, &b);
            match h.replies.as_slice() {
                [] => assert_eq!(step, Step::Continue),
                [r] => {
                    assert!([400, 413].contains(&r.status), "{}", r.status);
                    assert_eq!(step, Step::Pause);
                }
                _ => panic!("two replies"),
            }
            if h.replies.is_empty() && h.req_body != b {
                // Rewritten: still valid JSON, and a chat request.
                assert!(ChatRequest::parse(&h.req_body).is_ok());
            }
        }
    }
}
