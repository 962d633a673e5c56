//! The composed gateway as the demo runs it: the `sluice.gateway` configuration of
//! envoy/envoy.yaml, one allowed chat request and one stream through every stage on a
//! counting fake host, held to a budget of host calls for the filter as a whole (issue 15:
//! each crate's `host_call_budget` covers its stage alone; this covers what they add up to).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use super::*;
use serde_json::{json, Value};
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::keys;
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// The demo bootstrap: the test reads the gateway's configuration from it, so the budget
/// follows the demo's stages and their settings.
const ENVOY_YAML: &str = include_str!("../../../envoy/envoy.yaml");

/// The stages the demo composes, in order (a stage added to the demo fails here first: then
/// measure again and set the budgets below).
const DEMO_STAGES: &[&str] = &[
    "auth",
    "prompt_enrichment",
    "prompt_guard",
    "semantic_cache",
    "rag",
    "token_ratelimit",
    "usage_metrics",
    "model_failover",
];

/// The test caller's API key (the demo's callers carry RS256 JWTs from a JWKS served over a
/// callout; an API key with the same claims admits the same identity without one).
const API_KEY: &str = "sk-demo-alice";

/// The `configuration.value` of the `sluice.gateway` filter in envoy/envoy.yaml: the
/// literal block (`value: |`) after the filter's name, every line indented deeper than the
/// `value:` key. Read without a YAML crate; the asserts say what moved if the file changes.
fn demo_config() -> Value {
    let mut lines = ENVOY_YAML.lines().skip_while(|l| l.trim() != "- name: sluice.gateway");
    assert!(lines.next().is_some(), "envoy/envoy.yaml: no `- name: sluice.gateway` filter");
    let mut lines = lines.take_while(|l| !l.trim_start().starts_with("- name:")).skip_while(|l| l.trim() != "value: |");
    let key = lines.next().expect("envoy/envoy.yaml: sluice.gateway has no `value: |` configuration block");
    let indent = key.len() - key.trim_start().len();
    let block: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent).collect();
    let doc: Value = serde_json::from_str(&block.join("\n")).expect("the configuration block is JSON");
    let names: Vec<&str> = doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_object().unwrap().keys().next().unwrap().as_str())
        .collect();
    assert_eq!(names, DEMO_STAGES, "the demo's stages changed: measure again and update the budgets");
    doc
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The demo configuration with an API key for Alice (the claims `scripts/demo.py` mints into
/// her JWT: team dev, org acme, openai/gpt-4o-mini).
fn config() -> Vec<u8> {
    let mut doc = demo_config();
    doc["stages"][0]["auth"]["api_keys"] = json!({"keys": [{
        "sha256": hex(&sluice_auth::jwt::sha256(API_KEY.as_bytes())),
        "subject": "alice", "team": "dev",
        "claims": {"org": "acme", "llms": {"openai": ["gpt-4o-mini"]}}
    }]});
    doc.to_string().into_bytes()
}

/// One VM: the plugins `on_configure` builds and the route cache the glue keeps beside them.
struct Vm {
    plugins: Vec<Box<dyn Plugin>>,
    routes: Rc<RefCell<RouteCache>>,
}

impl Vm {
    fn new() -> Self {
        let env = |n: &str| (n == "OPENAI_API_KEY").then(|| "sk-demo".to_string());
        let plugins = assemble(&config(), &env).unwrap();
        Self { plugins, routes: Rc::default() }
    }

    /// A stream's pipeline, as `create_http_context` makes it.
    fn pipeline(&self) -> Pipeline {
        let slots = self.plugins.iter().map(|p| Slot::of(p.as_ref())).collect();
        Pipeline::new(7, slots, Rc::clone(&self.routes))
    }
}

const NOW: u64 = 1_800_000_000;

/// A request on the demo's `chat` route (its metadata mirrors envoy/envoy.yaml's route
/// `chat`), authenticated with Alice's key, on a VM whose shared data and metrics are `vm`'s
/// (what an earlier stream of the same VM left).
fn host(vm: &FakeHost, body: &[u8]) -> CountingHost<FakeHost> {
    let len = body.len().to_string();
    let mut h = FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "localhost:10000"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("content-length", &len),
        ("user-agent", "curl/8.5.0"),
        ("x-api-key", API_KEY),
    ]);
    h.set_prop(&["xds", "route_name"], "chat");
    h.properties.insert(
        "xds/route_metadata".into(),
        test_encode_metadata(
            "sluice",
            // The demo's `chat` route, with the cache switched off and no RAG collection (as
            // on its `budget` route): their embeddings and store callouts are budgeted in their
            // own crates' tests; what the two stages cost when a route does not use them is
            // counted here.
            &json!({"provider": "openai", "default_model": "gpt-4o-mini", "ratelimit": "standard", "semantic_cache": false}),
        ),
    );
    h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW));
    h.req_body = body.to_vec();
    h.shared.clone_from(&vm.shared);
    h.shared_version = vm.shared_version;
    h.metric_defs.clone_from(&vm.metric_defs);
    h.metric_values.clone_from(&vm.metric_values);
    CountingHost::new(h)
}

fn at(h: &mut CountingHost<FakeHost>, ms: u64) {
    h.inner.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW) + Duration::from_millis(ms));
}

/// The request through every stage; returns the body sent upstream.
fn request(p: &mut Pipeline, h: &mut CountingHost<FakeHost>) -> Value {
    h.inner.phase = Phase::RequestHeaders;
    assert_eq!(p.on_request_headers(h, false), Act::Pause, "auth holds the headers until the body is checked");
    h.inner.phase = Phase::RequestBody;
    let n = h.inner.req_body.len();
    assert_eq!(p.on_request_body(h, n, true), Act::Continue);
    assert!(h.inner.replies.is_empty(), "allowed: {:?}", h.inner.replies);
    h.inner.req_headers_sent = true;
    serde_json::from_slice(&h.inner.req_body).unwrap()
}

/// The provider's answer in `chunks`, then access-log time; returns what the client got.
/// Like Envoy, a chunk the filter paused on stays buffered: the next callback sees it and
/// the new chunk together, `size` their total.
fn respond(p: &mut Pipeline, h: &mut CountingHost<FakeHost>, ctype: &str, chunks: &[&[u8]]) -> Vec<u8> {
    h.inner.phase = Phase::ResponseHeaders;
    h.inner.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), ctype.into())];
    p.on_response_headers(h, false);
    h.inner.phase = Phase::ResponseBody;
    let mut out = Vec::new();
    let mut buffered = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        at(h, 40 + 10 * i as u64);
        buffered.extend_from_slice(c);
        h.inner.resp_body = std::mem::take(&mut buffered);
        let n = h.inner.resp_body.len();
        match p.on_response_body(h, n, i + 1 == chunks.len()) {
            Act::Continue => out.extend_from_slice(&h.inner.resp_body),
            Act::Pause => buffered = std::mem::take(&mut h.inner.resp_body),
        }
    }
    assert!(buffered.is_empty(), "the end of the response is never held");
    h.inner.phase = Phase::Log;
    p.on_log(h);
    out
}

/// What every stage leaves behind on an allowed request.
fn assert_every_stage_ran(h: &CountingHost<FakeHost>, sent: &Value) {
    let f = &h.inner;
    assert!(f.refused.is_empty(), "calls Envoy would refuse: {:?}", f.refused);
    // auth: the key's identity, its claim, the credential stripped.
    assert_eq!(f.state(keys::USER).as_deref(), Some("alice"));
    assert_eq!(f.state(keys::TEAM).as_deref(), Some("dev"));
    assert_eq!(f.state(keys::AUTH_METHOD).as_deref(), Some("api_key"));
    assert_eq!(f.state(&keys::claim_key("org")).as_deref(), Some("acme"));
    assert_eq!(f.req_header("x-api-key"), None, "the credential never reaches the provider");
    // prompt-enrichment: the house system prompt with Alice's identity, the defaults.
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["messages"][0]["content"], "You are the ACME assistant. You answer for alice of team dev.");
    assert_eq!(sent["messages"][1]["content"], "Hello there");
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(f.state(keys::REQUESTED_MODEL).as_deref(), Some("gpt-4o-mini"));
    // prompt-guard: looked and allowed.
    assert_eq!(f.state(keys::GUARD).as_deref(), Some("allow"));
    // token-ratelimit: admitted on the route's `standard` rule set, headers on the answer.
    assert_eq!(f.state(keys::RATELIMIT).as_deref(), Some("ok"));
    assert_eq!(f.resp_header("x-ratelimit-limit-tokens").as_deref(), Some("5000"));
    // usage-metrics: the provider's usage recorded.
    assert_eq!(f.state(keys::INPUT_TOKENS).as_deref(), Some("21"));
    assert_eq!(f.state(keys::OUTPUT_TOKENS).as_deref(), Some("4"));
    assert_eq!(f.state(keys::USAGE_ESTIMATED).as_deref(), Some("false"));
    assert_eq!(f.state(keys::OPERATION).as_deref(), Some("chat"));
    // model-failover (downstream): the mark for the upstream role.
    assert_eq!(f.state(keys::FAILOVER_DOWNSTREAM).as_deref(), Some("1"));
}

fn reads(h: &CountingHost<FakeHost>) -> String {
    let kinds = [
        CallKind::HeaderMap,
        CallKind::Header,
        CallKind::Body,
        CallKind::Property,
        CallKind::SharedData,
        CallKind::Callout,
        CallKind::Foreign,
    ];
    let counts: Vec<String> = kinds.iter().map(|k| format!("{k:?}={}", h.count(*k))).collect();
    format!(
        "total {} [{}] properties read {:?}; filter state written {:?}",
        h.total(),
        counts.join(" "),
        h.property_reads.borrow(),
        h.property_writes.borrow()
    )
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there"}]}"#;

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hi Alice!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":4,"total_tokens":25}}"#;

#[test]
fn demo_config_is_read_from_envoy_yaml() {
    let doc = demo_config();
    assert_eq!(doc["stages"][6]["usage_metrics"]["inject_include_usage"], true);
    let env = |_: &str| None;
    let names: Vec<&str> = assemble(doc.to_string().as_bytes(), &env).unwrap().iter().map(|p| p.name()).collect();
    assert_eq!(names.len(), DEMO_STAGES.len(), "{names:?}");
}

/// One allowed non-streaming chat request on `vm` (after the streams that left `prev`).
fn chat(vm: &Vm, prev: &FakeHost) -> CountingHost<FakeHost> {
    let mut p = vm.pipeline();
    let mut h = host(prev, CHAT.as_bytes());
    let sent = request(&mut p, &mut h);
    let (a, b) = ANSWER.as_bytes().split_at(60);
    let out = respond(&mut p, &mut h, "application/json", &[a, b]);
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], "Hi Alice!");
    assert_every_stage_ran(&h, &sent);
    assert_eq!(h.inner.state(keys::RESPONSE_MODEL).as_deref(), Some("gpt-4o-mini-2024-07-18"));
    h
}

/// One allowed stream on `vm`: SSE in three network chunks (events split across them), the
/// usage chunk usage-metrics asked for, `[DONE]`.
fn stream(vm: &Vm, prev: &FakeHost) -> CountingHost<FakeHost> {
    let mut p = vm.pipeline();
    let body = CHAT.replace(r#""messages""#, r#""stream":true,"messages""#);
    let mut h = host(prev, body.as_bytes());
    let sent = request(&mut p, &mut h);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true, "usage-metrics asks for the usage chunk");
    let event = |delta: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{delta}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let usage = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":4,\"total_tokens\":25}}\n\n";
    let all = format!("{}{}{usage}data: [DONE]\n\n", event("Hi "), event("Alice!"));
    let (a, rest) = all.as_bytes().split_at(90);
    let (b, c) = rest.split_at(120);
    let out = String::from_utf8(respond(&mut p, &mut h, "text/event-stream", &[a, b, c])).unwrap();
    assert!(out.contains("Hi ") && out.contains("Alice!") && out.ends_with("data: [DONE]\n\n"), "{out}");
    assert!(!out.contains("\"usage\":{"), "the usage chunk the client did not ask for is hidden: {out}");
    assert_every_stage_ran(&h, &sent);
    assert_eq!(h.inner.state(keys::USAGE).as_deref(), Some("21,4,25,0,0,0,0,0,0"), "published for every stage");
    h
}

/// Value-returning host calls of one allowed non-streaming chat request through the whole
/// demo gateway, once the VM has seen the route and the caller (steady state): 9.
/// - request headers: 1 header-map read (every stage uses the pipeline's copy);
/// - route: 1 property read, `xds.route_name` (its `sluice` metadata is cached per VM);
/// - request body: 1 read at its end (auth, enrichment, guard, rate limit and usage share
///   the one parse);
/// - token-ratelimit: 2 shared-data reads of Alice's counter bucket, to reserve and settle;
/// - response headers: 1 header-map read;
/// - response body: 1 read of the whole answer at its end (buffered: the guard's response
///   rule masks JSON answers whole);
/// - usage-metrics, at log time: 2 property reads, `sluice.provider` and
///   `sluice.upstream_model`, which the upstream role (model-failover, another filter) writes
///   per attempt; absent here, so usage-metrics publishes the route's provider itself.
///
/// The first request of a VM adds 4: the route's `xds.route_metadata` (1) and, creating the
/// caller's counter, the live-counter count (1) and the anchor key before and after it is
/// created (2). No single-header reads, no filter state read back, no callouts, no foreign
/// calls.
///
/// Filter-state writes (no value returned, not in the total, but each a host call): 23 —
/// auth 6 (identity, auth_method, user, team, key_id, claim.org), semantic-cache 1 (cache:
/// skip), model-failover 1
/// (failover_downstream), prompt-guard 1 (guard), token-ratelimit 1 (ratelimit), the
/// pipeline 2 (model, usage), usage-metrics 11 (operation, input/output/total/cached
/// input/reasoning tokens, usage_estimated, response_model, ttft_ms, cost, provider; cost
/// because the demo's price table prices gpt-4o-mini).
#[test]
fn host_call_budget_of_a_chat_request() {
    let vm = Vm::new();
    let first = chat(&vm, &FakeHost::default());
    assert_eq!(first.total(), 13, "first request of the VM: {}", reads(&first));
    let h = chat(&vm, &first.inner);
    assert_eq!(h.total(), 9, "{}", reads(&h));
    assert_eq!(h.count(CallKind::HeaderMap), 2, "request and response headers, each once");
    assert_eq!(h.count(CallKind::Header), 0, "headers are read once as a map");
    assert_eq!(h.count(CallKind::Body), 2, "the request body once, the answer once");
    assert_eq!(h.count(CallKind::SharedData), 2, "the counter to reserve and to settle");
    assert_eq!((h.count(CallKind::Callout), h.count(CallKind::Foreign)), (0, 0));
    assert_eq!(h.property_reads.borrow().as_slice(), PROPERTY_READS, "{}", reads(&h));
    assert_eq!(h.writes(), 23, "filter-state writes: {:?}", h.property_writes.borrow());
}

/// The properties a steady-state request reads: the route name, then (usage-metrics) what the
/// upstream role published. Nothing this filter wrote itself.
const PROPERTY_READS: &[&str] = &["xds.route_name", "sluice.provider", "sluice.upstream_model"];

/// The same for a stream: 11 in steady state (15 for the first request of a VM). As the
/// chat request, except the response body: one read per network chunk (3 here; the events
/// split across them are carried by the parser, never re-read), nothing buffered. Writes:
/// 24, the chat request's plus usage-metrics' `tpot_ms`.
#[test]
fn host_call_budget_of_a_stream() {
    let vm = Vm::new();
    let first = stream(&vm, &FakeHost::default());
    assert_eq!(first.total(), 15, "first request of the VM: {}", reads(&first));
    let h = stream(&vm, &first.inner);
    assert_eq!(h.total(), 11, "{}", reads(&h));
    assert_eq!(h.count(CallKind::HeaderMap), 2, "request and response headers, each once");
    assert_eq!(h.count(CallKind::Header), 0, "headers are read once as a map");
    assert_eq!(h.count(CallKind::Body), 4, "the request body once, each of the 3 chunks once");
    assert_eq!(h.count(CallKind::SharedData), 2, "the counter to reserve and to settle");
    assert_eq!((h.count(CallKind::Callout), h.count(CallKind::Foreign)), (0, 0));
    assert_eq!(h.property_reads.borrow().as_slice(), PROPERTY_READS, "{}", reads(&h));
    assert_eq!(h.writes(), 24, "filter-state writes: {:?}", h.property_writes.borrow());
}
