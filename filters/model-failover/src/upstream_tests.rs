//! The upstream role through the core pipeline on the fake host.

use super::*;
use crate::config::load;
use crate::config::RETRY_MARKER_HEADER;
use serde_json::json;
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use sluice_core::stage::Plugin;
use std::time::UNIX_EPOCH;

fn plugin(cfg: &str) -> Box<dyn Plugin> {
    crate::assemble(cfg.as_bytes(), &|_| None).unwrap().pop().unwrap()
}

fn pipeline(p: &dyn Plugin) -> Pipeline {
    Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())))
}

/// An attempt: request headers, the endpoint `meta` (and `cluster` metadata), a body.
fn host(headers: &[(&str, &str)], meta: Value, cluster: Value) -> FakeHost {
    let mut h = FakeHost::with_request_headers(headers);
    h.properties.insert("xds/upstream_host_metadata".into(), test_encode_metadata("sluice", &meta));
    h.properties.insert("xds/cluster_metadata".into(), test_encode_metadata("sluice", &cluster));
    h.set_prop(&["xds", "cluster_name"], "llm");
    h.set_prop(&[keys::FAILOVER_DOWNSTREAM], "1");
    h.time = Some(UNIX_EPOCH + Duration::from_secs(1000));
    h
}

/// Headers, then the whole body at once; returns both acts.
fn run_on(pl: &mut Pipeline, h: &mut FakeHost, body: &str) -> (Act, Act) {
    let a = pl.on_request_headers(h, body.is_empty());
    if body.is_empty() {
        return (a, a);
    }
    h.phase = Phase::RequestBody;
    h.req_body = body.as_bytes().to_vec();
    let b = pl.on_request_body(h, body.len(), true);
    (a, b)
}

fn run(p: &dyn Plugin, h: &mut FakeHost, body: &str) -> (Act, Act) {
    run_on(&mut pipeline(p), h, body)
}

fn body_json(h: &FakeHost) -> Value {
    serde_json::from_slice(&h.req_body).unwrap()
}

/// The value of a metric summed over all its label sets.
fn total(h: &FakeHost, base: &str) -> i64 {
    h.metric_names(&format!("{base}.")).iter().filter_map(|n| h.metric(n)).sum()
}

#[test]
fn endpoint_model_replaces_the_body_model_in_every_format() {
    let p = plugin("{}");
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/messages"] {
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"model":"client","temperature":0.5}"#;
        let cl = body.len().to_string();
        let mut h = host(
            &[(":path", path), ("content-length", &cl), ("x-envoy-attempt-count", "1")],
            json!({"model": "qwen-1.8b", "provider": "ollama"}),
            json!({}),
        );
        assert_eq!(run(p.as_ref(), &mut h, body), (Act::Pause, Act::Continue), "{path}");
        let v = body_json(&h);
        assert_eq!(v["model"], "qwen-1.8b", "{path}");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()), "the new length (headers held)");
        assert!(String::from_utf8(h.req_body.clone()).unwrap().starts_with(r#"{"messages""#), "key order kept");
        assert_eq!(h.state(keys::UPSTREAM_MODEL).as_deref(), Some("qwen-1.8b"));
        assert_eq!(h.state(keys::PROVIDER).as_deref(), Some("ollama"));
        assert_eq!(h.state(keys::REQUESTED_MODEL), None, "the upstream role never publishes sluice.model");
        assert!(h.refused.is_empty(), "{:?}", h.refused);
    }
}

#[test]
fn request_trailers_end_the_body_and_the_model_is_rewritten() {
    let p = plugin("{}");
    let mut pl = pipeline(p.as_ref());
    let mut h = host(&[], json!({"model": "m"}), json!({}));
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    h.req_body = br#"{"model":"x"}"#.to_vec();
    assert_eq!(pl.on_request_body(&mut h, 13, false), Act::Pause);
    assert_eq!(pl.on_request_trailers(&mut h), Act::Continue);
    assert_eq!(body_json(&h)["model"], "m");
}

#[test]
fn no_model_in_request_gets_one_and_cluster_metadata_is_the_fallback() {
    let p = plugin("{}");
    let mut h = host(&[], json!({}), json!({"model": "from-cluster"}));
    run(p.as_ref(), &mut h, r#"{"messages":[]}"#);
    assert_eq!(body_json(&h)["model"], "from-cluster");
}

#[test]
fn without_metadata_the_body_and_its_length_are_untouched() {
    let p = plugin("{}");
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    let mut h = host(&[("content-length", "33")], json!({}), json!({}));
    run(p.as_ref(), &mut h, body);
    assert_eq!(h.req_body, body.as_bytes());
    assert_eq!(h.req_header("content-length").as_deref(), Some("33"));
    assert_eq!(h.state(keys::UPSTREAM_MODEL).as_deref(), Some("gpt-4o"));
    assert_eq!(h.state(keys::PROVIDER).as_deref(), Some("llm"), "the cluster name");
}

#[test]
fn backup_models_by_attempt() {
    let p = plugin(r#"{"backup_models":["gpt-4.0-turbo","gpt-3.5-turbo"]}"#);
    let want = ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo", "gpt-3.5-turbo"];
    for (i, w) in want.iter().enumerate() {
        let attempt = (i + 1).to_string();
        for path in ["/v1/chat/completions", "/v1/responses", "/v1/messages"] {
            let mut h = host(&[(":path", path), ("x-envoy-attempt-count", &attempt)], json!({}), json!({}));
            run(p.as_ref(), &mut h, r#"{"model":"gpt-4o","input":"x"}"#);
            assert_eq!(body_json(&h)["model"], *w, "attempt {attempt} {path}");
        }
    }
    let cfg = load(br#"{"backup_models":["a","b"]}"#).unwrap();
    assert_eq!(model_for_attempt(&cfg, 1, Some("m".into())).as_deref(), Some("m"));
    assert_eq!(model_for_attempt(&cfg, u32::MAX, None).as_deref(), Some("b"));
    assert_eq!(model_for_attempt(&Config::default(), 3, None), None);
}

#[test]
fn backup_models_without_the_downstream_role_are_refused() {
    let p = plugin(r#"{"backup_models":["b"]}"#);
    let mut h = host(&[("x-envoy-attempt-count", "2")], json!({}), json!({}));
    h.properties.remove(keys::FAILOVER_DOWNSTREAM);
    let (a, _) = run(p.as_ref(), &mut h, r#"{"model":"m"}"#);
    assert_eq!(a, Act::Pause);
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].status, 500);
    let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    assert_eq!(v["error"]["code"], "gateway_misconfigured");
    assert!(v["error"]["message"].as_str().unwrap().contains("backup_models"));
    assert_eq!(total(&h, metric::MISCONFIGURED), 1);
    // Without backup models the attempt count does not matter and nothing is required.
    let p = plugin("{}");
    let mut h = host(&[], json!({"model": "m"}), json!({}));
    h.properties.remove(keys::FAILOVER_DOWNSTREAM);
    run(p.as_ref(), &mut h, r#"{"model":"x"}"#);
    assert!(h.replies.is_empty());
}

#[test]
fn attempt_header_garbage_means_first() {
    for v in ["", "zero", "0", "-1", "99999999999999"] {
        assert_eq!(attempt_number(Some(v)), 1, "{v}");
    }
    assert_eq!(attempt_number(None), 1);
    assert_eq!(attempt_number(Some(" 3 ")), 3);
}

const CLIENT_CREDENTIALS: &[(&str, &str)] = &[
    ("authorization", "Bearer client-jwt"),
    ("proxy-authorization", "Basic cHJveHk="),
    ("cookie", "session=abc"),
    ("x-api-key", "client-anthropic"),
    ("api-key", "client-azure"),
    ("x-goog-api-key", "client-google"),
    ("x-amz-security-token", "client-aws"),
    ("x-other", "kept"),
];

fn credentials_run(cfg: &str, meta: Value) -> FakeHost {
    let p = plugin(cfg);
    let mut h = host(CLIENT_CREDENTIALS, meta, json!({}));
    h.env.insert("KEY".into(), "sk-gw".into());
    run(p.as_ref(), &mut h, "{}");
    h
}

fn client_credentials_left(h: &FakeHost) -> Vec<String> {
    CLIENT_CREDENTIALS
        .iter()
        .filter(|(k, v)| h.req_header(k).as_deref() == Some(*v))
        .map(|(k, _)| k.to_string())
        .collect()
}

#[test]
fn every_client_credential_is_removed_per_provider_profile() {
    let cfg = r#"{"providers":{
        "openai":{"credential_env":"KEY"},
        "azure":{"credential_env":"KEY","credential_header":"api-key","credential_prefix":""},
        "anthropic":{"credential_env":"KEY","credential_header":"x-api-key"},
        "local":{"auth":"passthrough"},
        "local-anthropic":{"auth":"passthrough","credential_header":"x-api-key"}}}"#;
    let h = credentials_run(cfg, json!({"provider": "openai"}));
    assert_eq!(h.req_header("authorization").as_deref(), Some("Bearer sk-gw"));
    assert_eq!(client_credentials_left(&h), ["x-other"]);
    let h = credentials_run(cfg, json!({"provider": "azure"}));
    assert_eq!(h.req_header("api-key").as_deref(), Some("sk-gw"));
    assert_eq!(h.req_header("authorization"), None);
    assert_eq!(client_credentials_left(&h), ["x-other"]);
    let h = credentials_run(cfg, json!({"provider": "anthropic"}));
    assert_eq!(h.req_header("x-api-key").as_deref(), Some("sk-gw"));
    assert_eq!(client_credentials_left(&h), ["x-other"]);
    let h = credentials_run(cfg, json!({"provider": "local"}));
    assert_eq!(client_credentials_left(&h), ["authorization", "x-other"], "passthrough keeps only its own header");
    let h = credentials_run(cfg, json!({"provider": "local-anthropic"}));
    assert_eq!(client_credentials_left(&h), ["x-api-key", "x-other"]);
    // No profile at all: nothing of the client's goes to a provider either.
    let h = credentials_run("{}", json!({}));
    assert_eq!(client_credentials_left(&h), ["x-other"]);
    // Endpoint metadata can switch a profile to passthrough.
    let h = credentials_run(cfg, json!({"provider": "openai", "auth": "passthrough"}));
    assert_eq!(client_credentials_left(&h), ["authorization", "x-other"]);
}

#[test]
fn the_credential_list_is_configurable_globally_and_per_profile() {
    let h = credentials_run(r#"{"client_credential_headers":["cookie","x-other"]}"#, json!({}));
    // authorization always goes to a provider-mode endpoint, whatever the list says.
    assert_eq!(
        client_credentials_left(&h),
        ["proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "x-amz-security-token"]
    );
    let h =
        credentials_run(r#"{"providers":{"p":{"client_credential_headers":["x-api-key"]}}}"#, json!({"provider": "p"}));
    assert!(!client_credentials_left(&h).contains(&"x-api-key".to_string()));
    assert!(client_credentials_left(&h).contains(&"cookie".to_string()));
}

#[test]
fn missing_key_sends_no_credential_and_counts() {
    let p = plugin("{}");
    let mut h = host(
        &[("authorization", "Bearer client")],
        json!({"provider": "openai", "credential_env": "OPENAI_API_KEY"}),
        json!({}),
    );
    run(p.as_ref(), &mut h, "{}");
    assert_eq!(h.req_header("authorization"), None);
    assert_eq!(
        h.metric("sluice_failover_credential_missing.gen_ai_provider_name=.=openai;.;gen_ai_request_model=.=client;.;"),
        Some(1)
    );
    // An invalid variable name in metadata is treated the same way.
    let p = plugin("{}");
    let mut h = host(&[], json!({"credential_env": "BAD-NAME"}), json!({}));
    h.env.insert("BAD-NAME".into(), "x".into());
    run(p.as_ref(), &mut h, "{}");
    assert_eq!(h.req_header("authorization"), None);
}

#[test]
fn profile_path_authority_and_hostile_metadata() {
    let p = plugin(r#"{"providers":{"openai":{"authority":"api.openai.com","path":"/v1/chat/completions"}}}"#);
    let mut h = host(&[(":path", "/openai"), (":authority", "gw")], json!({"provider": "openai"}), json!({}));
    run(p.as_ref(), &mut h, "{}");
    assert_eq!(h.req_header(":authority").as_deref(), Some("api.openai.com"));
    assert_eq!(h.req_header(":path").as_deref(), Some("/v1/chat/completions"));
    let p = plugin("{}");
    let mut h = host(
        &[(":path", "/v1/chat/completions"), (":authority", "gw")],
        json!({"path": "no-slash", "authority": "evil/host", "credential_header": "Bad Header"}),
        json!({}),
    );
    run(p.as_ref(), &mut h, "{}");
    assert_eq!(h.req_header(":path").as_deref(), Some("/v1/chat/completions"));
    assert_eq!(h.req_header(":authority").as_deref(), Some("gw"));
}

#[test]
fn non_json_bodies_pass_unchanged_and_count() {
    for (body, reason) in [("not json", "not_json"), ("[1,2]", "not_object"), ("\u{ff}\u{fe}", "not_json")] {
        let p = plugin("{}");
        let mut h = host(&[], json!({"model": "m"}), json!({}));
        assert_eq!(run(p.as_ref(), &mut h, body), (Act::Pause, Act::Continue));
        assert_eq!(h.req_body, body.as_bytes());
        assert_eq!(
            h.metric(&format!(
                "sluice_failover_body_passthrough.gen_ai_provider_name=.=llm;.;gen_ai_request_model=.=m;.;sluice_reason=.={reason};.;"
            )),
            Some(1)
        );
    }
}

#[test]
fn body_over_the_cap_gets_413_and_counts() {
    let p = plugin(r#"{"max_body_bytes":10}"#);
    let mut pl = pipeline(p.as_ref());
    let mut h = host(&[], json!({}), json!({}));
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    assert_eq!(pl.on_request_body(&mut h, 5, false), Act::Pause);
    assert_eq!(pl.on_request_body(&mut h, 11, false), Act::Pause);
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].status, 413);
    let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(pl.on_request_body(&mut h, 20, true), Act::Pause);
    assert_eq!(h.replies.len(), 1);
    h.phase = Phase::Log;
    pl.on_log(&mut h);
    assert_eq!(total(&h, metric::BODY_TOO_LARGE), 1);
}

#[test]
fn headers_only_request_continues() {
    let p = plugin("{}");
    let mut h = host(&[(":method", "GET")], json!({"model": "m"}), json!({}));
    assert_eq!(pipeline(p.as_ref()).on_request_headers(&mut h, true), Act::Continue);
}

fn respond(cfg: &str, headers: &[(&str, &str)]) -> FakeHost {
    let p = plugin(cfg);
    let mut pl = pipeline(p.as_ref());
    let mut h = host(&[], json!({"provider": "openai", "model": "gpt-4o"}), json!({}));
    run_on(&mut pl, &mut h, "");
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    assert_eq!(pl.on_response_headers(&mut h, false), Act::Continue);
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    h
}

const OPENAI_GPT4O: &str = ".gen_ai_provider_name=.=openai;.;gen_ai_request_model=.=gpt-4o;.;";

#[test]
fn a_429_stays_429_for_envoy_and_its_wait_becomes_the_cluster_cooldown() {
    let h = respond("{}", &[(":status", "429"), ("retry-after", "60")]);
    assert_eq!(h.resp_header(":status").as_deref(), Some("429"), "native: Envoy's error_matcher sees it");
    assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
    assert_eq!(h.resp_header("retry-after").as_deref(), Some("60"));
    assert_eq!(h.state(keys::RETRY_AFTER).as_deref(), Some("60"));
    assert_eq!(h.metric(&format!("sluice_failover_rate_limited{OPENAI_GPT4O}")), Some(1));
    assert_eq!(h.metric(&format!("sluice_failover_retry_after_ms{OPENAI_GPT4O}")), Some(60_000));
    assert_eq!(h.metric(&format!("sluice_failover_cooldown_recorded{OPENAI_GPT4O}")), Some(1));
    let t = crate::cooldown::read(&h);
    assert_eq!(t.remaining("llm", crate::cooldown::unix_ms(h.now())), Some(Duration::from_secs(60)));
}

#[test]
fn the_cooldown_is_capped_and_a_429_without_a_wait_records_none() {
    let h = respond(r#"{"max_cooldown":"10s"}"#, &[(":status", "429"), ("retry-after", "3600")]);
    let t = crate::cooldown::read(&h);
    assert_eq!(t.remaining("llm", crate::cooldown::unix_ms(h.now())), Some(Duration::from_secs(10)));
    let h = respond("{}", &[(":status", "429")]);
    assert!(crate::cooldown::read(&h).is_empty());
    assert_eq!(h.state(keys::RETRY_AFTER), None);
}

#[test]
fn with_rate_limit_status_to_503_a_429_is_shown_to_the_router_as_503() {
    let h = respond(r#"{"rate_limit_status_to":503}"#, &[(":status", "429"), ("retry-after", "60")]);
    assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
    assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER).as_deref(), Some("429"));
    assert_eq!(h.resp_header("retry-after").as_deref(), Some("60"));
    let h = respond("{}", &[(":status", "429"), ("x-ratelimit-reset-requests", "1.5s")]);
    assert_eq!(h.state(keys::RETRY_AFTER).as_deref(), Some("1.5"));
}

#[test]
fn other_statuses_pass_and_provider_cannot_forge_internal_headers() {
    let h =
        respond("{}", &[(":status", "503"), (ORIGINAL_STATUS_HEADER, "200"), (RETRY_MARKER_HEADER, "context-length")]);
    assert_eq!(h.resp_header(":status").as_deref(), Some("503"));
    assert_eq!(h.resp_header(ORIGINAL_STATUS_HEADER), None);
    assert_eq!(h.resp_header(RETRY_MARKER_HEADER), None, "a provider cannot make its answer retriable");
    let h = respond("{}", &[(":status", "200")]);
    assert_eq!(h.resp_header(":status").as_deref(), Some("200"));
    assert_eq!(h.state(keys::PROVIDER).as_deref(), Some("openai"));
}

/// An error answer through the upstream role: headers (held or not), then the body.
fn error_answer(cfg: &str, status: &str, ctype: &str, body: &str) -> (Act, FakeHost) {
    let p = plugin(cfg);
    let mut pl = pipeline(p.as_ref());
    let mut h = host(&[], json!({"provider": "vllm", "model": "small"}), json!({}));
    run_on(&mut pl, &mut h, "");
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers =
        vec![(":status".into(), status.as_bytes().to_vec()), ("content-type".into(), ctype.as_bytes().to_vec())];
    let act = pl.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    h.resp_headers_held = act == Act::Pause;
    h.resp_body = body.as_bytes().to_vec();
    assert_eq!(pl.on_response_body(&mut h, body.len(), true), Act::Continue);
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    (act, h)
}

const OPENAI_OVERFLOW: &str = r#"{"error":{"message":"This model's maximum context length is 20 tokens. However, your messages resulted in 40 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
const ANTHROPIC_OVERFLOW: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208310 tokens > 200000 maximum"}}"#;
const VLLM_OVERFLOW: &str = r#"{"object":"error","message":"This model's maximum context length is 8192 tokens. However, you requested 8203 tokens (7691 in the messages, 512 in the completion). Please reduce the length of the messages or completion.","type":"BadRequestError","param":null,"code":400}"#;
const LLAMACPP_OVERFLOW: &str = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#;

#[test]
fn a_context_window_error_is_held_read_and_marked_retriable() {
    let on = r#"{"retry_context_overflow":true}"#;
    for body in [OPENAI_OVERFLOW, ANTHROPIC_OVERFLOW, VLLM_OVERFLOW, LLAMACPP_OVERFLOW] {
        let (act, h) = error_answer(on, "400", "application/json", body);
        assert_eq!(act, Act::Pause, "headers held until the body was read");
        assert_eq!(h.resp_header(RETRY_MARKER_HEADER).as_deref(), Some(RETRY_MARKER_CONTEXT), "{body}");
        assert_eq!(h.resp_body, body.as_bytes(), "the provider's body is untouched");
        assert_eq!(
            h.metric("sluice_failover_context_overflow.gen_ai_provider_name=.=vllm;.;gen_ai_request_model=.=small;.;"),
            Some(1)
        );
    }
    // Another 400 is not retriable; nothing is held when the feature is off or for a 200/SSE.
    let (act, h) = error_answer(on, "400", "application/json", r#"{"error":{"code":"invalid_mock_fail"}}"#);
    assert_eq!((act, h.resp_header(RETRY_MARKER_HEADER)), (Act::Pause, None));
    let (act, h) = error_answer("{}", "400", "application/json", OPENAI_OVERFLOW);
    assert_eq!((act, h.resp_header(RETRY_MARKER_HEADER)), (Act::Continue, None));
    let (act, _) = error_answer(on, "400", "text/event-stream", OPENAI_OVERFLOW);
    assert_eq!(act, Act::Continue);
    let (act, _) = error_answer(on, "200", "application/json", OPENAI_OVERFLOW);
    assert_eq!(act, Act::Continue);
    // Custom markers replace the defaults.
    let (_, h) = error_answer(
        r#"{"retry_context_overflow":true,"context_overflow_markers":["Too Many Tokens"]}"#,
        "422",
        "application/json",
        r#"{"detail":"too many tokens"}"#,
    );
    assert_eq!(h.resp_header(RETRY_MARKER_HEADER).as_deref(), Some(RETRY_MARKER_CONTEXT));
}

#[test]
fn every_upstream_metric_carries_provider_and_model() {
    // Envoy 1.39+ emits upstream filters' stats in the root scope, without the cluster name.
    let p = plugin(r#"{"max_body_bytes":10,"retry_context_overflow":true}"#);
    let mut names = Vec::new();
    // 429 with a wait (attempts, rate_limited, retry_after_ms, cooldown_recorded).
    let h = respond("{}", &[(":status", "429"), ("retry-after", "1")]);
    names.extend(h.metric_names("sluice_failover_"));
    // context overflow
    let (_, h) = error_answer(r#"{"retry_context_overflow":true}"#, "400", "application/json", OPENAI_OVERFLOW);
    names.extend(h.metric_names("sluice_failover_"));
    // passthrough
    let mut h = host(&[], json!({"model": "m", "provider": "p"}), json!({}));
    run(plugin("{}").as_ref(), &mut h, "not json");
    names.extend(h.metric_names("sluice_failover_"));
    // too large, credential missing
    let mut pl = pipeline(p.as_ref());
    let mut h = host(&[], json!({"model": "m", "provider": "p", "credential_env": "NOPE"}), json!({}));
    pl.on_request_headers(&mut h, false);
    h.phase = Phase::RequestBody;
    pl.on_request_body(&mut h, 11, false);
    h.phase = Phase::Log;
    pl.on_log(&mut h);
    names.extend(h.metric_names("sluice_failover_"));
    // misconfigured
    let mut h = host(&[], json!({}), json!({}));
    h.properties.remove(keys::FAILOVER_DOWNSTREAM);
    run(plugin(r#"{"backup_models":["b"]}"#).as_ref(), &mut h, "{}");
    names.extend(h.metric_names("sluice_failover_"));
    for base in [
        metric::ATTEMPTS,
        metric::RATE_LIMITED,
        metric::RETRY_AFTER_MS,
        metric::COOLDOWN_RECORDED,
        metric::CONTEXT_OVERFLOW,
        metric::BODY_PASSTHROUGH,
        metric::BODY_TOO_LARGE,
        metric::CREDENTIAL_MISSING,
        metric::MISCONFIGURED,
    ] {
        let of: Vec<&String> = names.iter().filter(|n| n.starts_with(&format!("{base}."))).collect();
        assert!(!of.is_empty(), "{base} not emitted: {names:?}");
        for n in of {
            assert!(n.contains("gen_ai_provider_name=.=") && n.contains("gen_ai_request_model=.="), "{n}");
        }
    }
}

/// Value-returning host calls per attempt, with just this stage:
/// - pipeline: the request headers (1 map read), the route name (+ its metadata on the first
///   request of a route, cached per VM), the body (1), the response headers (1 map read);
/// - stage: the cluster name and the endpoint's whole metadata (the endpoint cache key), plus,
///   on the first attempt to an endpoint in 10 s, the cluster's whole metadata (1); with
///   `backup_models`, the downstream role's mark (1).
///
/// Never one read per metadata key, and never a read of filter state this role wrote.
#[test]
fn host_call_budget() {
    let p = plugin(
        r#"{"backup_models":["b"],"providers":{"openai":{"credential_env":"K","path":"/v1/chat/completions"}}}"#,
    );
    let routes = Rc::new(RefCell::new(RouteCache::default())); // per VM, like the glue's
    let attempt = |p: &dyn Plugin, first: bool| {
        let mut pl = Pipeline::new(1, vec![Slot::of(p)], Rc::clone(&routes));
        let mut h = CountingHost::new(host(
            &[("x-envoy-attempt-count", "2"), ("authorization", "Bearer c")],
            json!({"provider": "openai", "model": "gpt-4o"}),
            json!({"x": "y"}),
        ));
        h.inner.set_prop(&["xds", "route_name"], "chat");
        let body = r#"{"model":"client","messages":[{"role":"user","content":"hi"}]}"#;
        pl.on_request_headers(&mut h, false);
        h.inner.phase = Phase::RequestBody;
        h.inner.req_body = body.as_bytes().to_vec();
        assert_eq!(pl.on_request_body(&mut h, body.len(), true), Act::Continue);
        h.inner.req_headers_sent = true;
        h.inner.phase = Phase::ResponseHeaders;
        h.inner.resp_headers = vec![(":status".into(), b"200".to_vec())];
        pl.on_response_headers(&mut h, false);
        assert_eq!(serde_json::from_slice::<Value>(&h.inner.req_body).unwrap()["model"], "b");
        assert_eq!(h.count(CallKind::HeaderMap), 2);
        assert_eq!(h.count(CallKind::Body), 1);
        let budget = if first { 9 } else { 7 };
        assert!(h.total() <= budget, "first={first}: {} ({:?})", h.total(), h.property_reads.borrow());
    };
    attempt(p.as_ref(), true);
    attempt(p.as_ref(), false);
}

/// A rate-limited attempt costs one more read: the cooldown table (read, then a CAS write
/// that returns nothing); nothing is read on a 429 without a wait.
#[test]
fn host_call_budget_of_a_429() {
    let p = plugin("{}");
    let mut pl = pipeline(p.as_ref());
    let mut h = CountingHost::new(host(&[], json!({"provider": "openai", "model": "gpt-4o"}), json!({})));
    pl.on_request_headers(&mut h, true);
    h.reset();
    h.inner.req_headers_sent = true;
    h.inner.phase = Phase::ResponseHeaders;
    h.inner.resp_headers = vec![(":status".into(), b"429".to_vec()), ("retry-after".into(), b"2".to_vec())];
    pl.on_response_headers(&mut h, false);
    assert_eq!(h.count(CallKind::SharedData), 1);
    assert_eq!(h.total(), 2, "the response headers and the cooldown table");
    assert_eq!(h.inner.shared_writes, 1);
}

/// Issue 16 §6: a large body (several hundred KB, many chunks) is rewritten byte-exact.
#[test]
fn large_multi_chunk_body_is_rewritten_exactly() {
    let p = plugin("{}");
    let mut pl = pipeline(p.as_ref());
    let text: String = (0..60_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect::<String>() + "é日本";
    let client = json!({"model": "client", "messages": [{"role": "user", "content": text}], "n": 1});
    let raw = serde_json::to_vec(&client).unwrap();
    let mut h = host(&[], json!({"model": "gpt-4o"}), json!({}));
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    let mut sent = 0;
    for chunk in raw.chunks(16 * 1024) {
        sent += chunk.len();
        h.req_body.extend_from_slice(chunk);
        let act = pl.on_request_body(&mut h, sent, sent == raw.len());
        assert_eq!(act, if sent == raw.len() { Act::Continue } else { Act::Pause });
    }
    let mut want = client.clone();
    want["model"] = json!("gpt-4o");
    assert_eq!(h.req_body, serde_json::to_vec(&want).unwrap());
}

#[test]
fn endpoints_sharing_an_address_keep_their_own_metadata() {
    let p = plugin("{}");
    for model in ["gpt-4o", "gpt-4.0-turbo", "gpt-4o"] {
        let mut h = host(&[], json!({"model": model}), json!({}));
        run(p.as_ref(), &mut h, r#"{"model":"x"}"#);
        assert_eq!(body_json(&h)["model"], model);
    }
}

const ANTHROPIC_CFG: &str =
    r#"{"providers":{"claude":{"api":"anthropic","credential_env":"ANTHROPIC_KEY","max_tokens":333}}}"#;

/// A chat attempt that lands on an Anthropic endpoint; returns the pipeline mid-exchange.
fn anthropic_attempt(p: &dyn Plugin, body: &str) -> (Pipeline, FakeHost) {
    let mut pl = pipeline(p);
    let cl = body.len().to_string();
    let mut h = host(
        &[(":path", "/v1/chat/completions"), ("content-length", &cl), ("authorization", "Bearer client")],
        json!({"provider": "claude", "model": "claude-sonnet-4"}),
        json!({}),
    );
    h.env.insert("ANTHROPIC_KEY".into(), "sk-ant".into());
    assert_eq!(run_on(&mut pl, &mut h, body), (Act::Pause, Act::Continue));
    (pl, h)
}

/// The answer: headers, then each body chunk (the last ends the stream).
fn answer(pl: &mut Pipeline, h: &mut FakeHost, status: &str, ctype: &str, chunks: &[&str]) -> Vec<u8> {
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers =
        vec![(":status".into(), status.as_bytes().to_vec()), ("content-type".into(), ctype.as_bytes().to_vec())];
    pl.on_response_headers(h, false);
    h.phase = Phase::ResponseBody;
    let mut out = Vec::new();
    let mut buffered = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let end = i + 1 == chunks.len();
        buffered.extend_from_slice(c.as_bytes());
        h.resp_body = buffered.clone();
        if pl.on_response_body(h, buffered.len(), end) == Act::Continue {
            out.extend_from_slice(&h.resp_body);
            buffered.clear();
        }
    }
    out
}

const CHAT: &str = r#"{"model":"gpt-4o","max_tokens":50,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"lookup","parameters":{"type":"object"}}}]}"#;

#[test]
fn a_chat_attempt_on_an_anthropic_endpoint_is_translated() {
    let p = plugin(ANTHROPIC_CFG);
    let (_, h) = anthropic_attempt(p.as_ref(), CHAT);
    assert_eq!(h.req_header(":path").as_deref(), Some("/v1/messages"));
    assert_eq!(h.req_header("anthropic-version").as_deref(), Some("2023-06-01"));
    assert_eq!(h.req_header("x-api-key").as_deref(), Some("sk-ant"));
    assert_eq!(h.req_header("authorization"), None, "the client's credential never reaches the provider");
    assert_eq!(h.req_header("accept-encoding"), None);
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()));
    let v = body_json(&h);
    assert_eq!(v["model"], "claude-sonnet-4");
    assert_eq!(v["max_tokens"], 50);
    assert_eq!(v["system"][0]["text"], "Be brief.");
    assert_eq!(v["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]));
    assert_eq!(v["tools"][0]["input_schema"], json!({"type": "object"}));
    assert!(v.get("stream_options").is_none());
    assert_eq!(total(&h, metric::TRANSLATED), 1);
    let (_, h) = anthropic_attempt(p.as_ref(), r#"{"messages":[{"role":"user","content":"x"}]}"#);
    assert_eq!(body_json(&h)["max_tokens"], 333, "the profile's max_tokens when the client set no cap");
}

#[test]
fn metadata_api_and_native_messages_requests() {
    let p = plugin("{}");
    // Endpoint metadata alone says anthropic.
    let mut h = host(&[(":path", "/v1/chat/completions")], json!({"api": "anthropic", "model": "c"}), json!({}));
    run(p.as_ref(), &mut h, r#"{"messages":[{"role":"user","content":"x"}]}"#);
    assert_eq!(h.req_header(":path").as_deref(), Some("/v1/messages"));
    assert_eq!(body_json(&h)["max_tokens"], crate::config::DEFAULT_MAX_TOKENS);
    // A native Messages request to an Anthropic endpoint is not translated.
    let body = r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#;
    let mut h = host(&[(":path", "/v1/messages")], json!({"api": "anthropic", "model": "c"}), json!({}));
    run(p.as_ref(), &mut h, body);
    assert_eq!(h.req_body, body.as_bytes());
    assert_eq!(h.req_header(":path").as_deref(), Some("/v1/messages"));
    // Unknown metadata: ignored (no translation).
    let mut h = host(&[(":path", "/v1/chat/completions")], json!({"api": "gemini", "model": "c"}), json!({}));
    run(p.as_ref(), &mut h, r#"{"messages":[]}"#);
    assert!(body_json(&h).get("max_tokens").is_none());
}

#[test]
fn an_untranslatable_request_is_refused_with_400() {
    let p = plugin(ANTHROPIC_CFG);
    let mut pl = pipeline(p.as_ref());
    let body = r#"{"n":3,"messages":[{"role":"user","content":"x"}]}"#;
    let mut h = host(&[(":path", "/v1/chat/completions")], json!({"provider": "claude"}), json!({}));
    let (_, b) = run_on(&mut pl, &mut h, body);
    assert_eq!(b, Act::Pause);
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].status, 400);
    let e: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    assert_eq!(e["error"]["code"], "untranslatable_request");
    assert!(e["error"]["message"].as_str().unwrap().contains("n > 1"));
}

#[test]
fn json_answers_and_errors_are_translated_back() {
    let p = plugin(ANTHROPIC_CFG);
    let (mut pl, mut h) = anthropic_attempt(p.as_ref(), CHAT);
    let msg = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"toolu_1","name":"lookup","input":{"q":1}}],"stop_reason":"tool_use","usage":{"input_tokens":7,"output_tokens":3,"cache_read_input_tokens":2}}"#;
    let (a, b) = msg.split_at(40);
    let out: Value = serde_json::from_slice(&answer(&mut pl, &mut h, "200", "application/json", &[a, b])).unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["choices"][0]["message"]["content"], "Hi");
    assert_eq!(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], r#"{"q":1}"#);
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(out["usage"]["prompt_tokens"], 9);
    assert_eq!(h.resp_header("content-length"), None);
    assert_eq!(h.state(keys::USAGE).as_deref(), Some("9,3,12,2,0,0,0,0,0"));

    let (mut pl, mut h) = anthropic_attempt(p.as_ref(), CHAT);
    let err = r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#;
    let out: Value = serde_json::from_slice(&answer(&mut pl, &mut h, "529", "application/json", &[err])).unwrap();
    assert_eq!(
        out,
        json!({"error": {"message": "busy", "type": "overloaded_error", "param": null, "code": "overloaded_error"}})
    );
}

#[test]
fn sse_answers_are_translated_event_by_event_across_chunks() {
    let p = plugin(ANTHROPIC_CFG);
    let (mut pl, mut h) =
        anthropic_attempt(p.as_ref(), &CHAT.replace("\"max_tokens\":50", "\"max_tokens\":50,\"stream\":true"));
    assert_eq!(body_json(&h)["stream"], true);
    let events = [
        r#"{"type":"message_start","message":{"id":"msg_2","model":"claude-sonnet-4","usage":{"input_tokens":11,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let wire: String = events
        .iter()
        .map(|e| {
            let kind: Value = serde_json::from_str(e).unwrap();
            format!("event: {}\ndata: {e}\n\n", kind["type"].as_str().unwrap())
        })
        .collect();
    // Network chunks that split events anywhere.
    let pieces: Vec<&str> = vec![wire.get(..17).unwrap(), wire.get(17..200).unwrap(), wire.get(200..).unwrap()];
    let out = String::from_utf8(answer(&mut pl, &mut h, "200", "text/event-stream", &pieces)).unwrap();
    assert!(!out.contains("event:"), "{out}");
    let datas: Vec<&str> = out.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> =
        datas.iter().filter(|d| **d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello");
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens"], 11);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
    assert_eq!(h.state(keys::USAGE).as_deref(), Some("11,4,15,0,0,0,0,0,0"), "usage read as Messages");
}
