//! usage-metrics through the core pipeline on the fake host.

use super::*;
use crate::config::Config;
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use std::cell::RefCell;
use std::time::Duration;

fn plugin(cfg: &str) -> UsagePlugin {
    UsagePlugin::new(Config::parse(cfg.as_bytes()).unwrap())
}

fn pipeline(p: &UsagePlugin) -> Pipeline {
    let slots = vec![Slot::of(p)];
    Pipeline::new(1, slots, Rc::new(RefCell::new(RouteCache::default())))
}

fn host(path: &str) -> FakeHost {
    let mut h = FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/json"),
        ("content-length", "99"),
    ]);
    h.set_prop(&["xds", "route_name"], "chat");
    h.properties.insert(
        "xds/route_metadata".into(),
        test_encode_metadata("sluice", &serde_json::json!({"provider": "openai", "default_model": "gpt-4o"})),
    );
    h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
    h
}

fn at(h: &mut FakeHost, ms: u64) {
    h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000) + Duration::from_millis(ms));
}

/// Run the request with `body`; returns what was sent upstream.
fn request(p: &mut Pipeline, h: &mut FakeHost, body: &str) -> Vec<u8> {
    assert_eq!(p.on_request_headers(h, false), Act::Continue, "headers go on, the body waits");
    h.phase = Phase::RequestBody;
    h.req_body = body.as_bytes().to_vec();
    let n = h.req_body.len();
    assert_eq!(p.on_request_body(h, n, true), Act::Continue);
    h.req_headers_sent = true;
    h.req_body.clone()
}

fn respond(p: &mut Pipeline, h: &mut FakeHost, status: &str, ctype: &str, chunks: &[&[u8]]) -> Vec<u8> {
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), status.into()), ("content-type".into(), ctype.into())];
    assert_eq!(p.on_response_headers(h, false), Act::Continue);
    h.phase = Phase::ResponseBody;
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        h.resp_body = c.to_vec();
        assert_eq!(p.on_response_body(h, c.len(), i + 1 == chunks.len()), Act::Continue);
        out.extend_from_slice(&h.resp_body);
    }
    h.phase = Phase::Log;
    p.on_log(h);
    out
}

fn labels(model: &str) -> RequestLabels {
    RequestLabels {
        operation: "chat".into(),
        provider: "openai".into(),
        request_model: model.into(),
        response_model: model.into(),
        user: None,
        team: None,
    }
}

fn chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
    )
}

fn usage_chunk(p: u64, c: u64) -> String {
    format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
        p + c
    )
}

const KNOWN: &str = r#"{"known_models":["gpt-4o"]}"#;

#[test]
fn non_streaming_usage_is_counted_exactly() {
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    let sent = request(&mut p, &mut h, r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(sent, br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#, "untouched");
    let body = r#"{"id":"x","model":"gpt-4o-2024","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"}}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":2}}}"#;
    let (a, b) = body.as_bytes().split_at(40);
    at(&mut h, 25);
    let seen = respond(&mut p, &mut h, "200", "application/json", &[a, b]);
    assert_eq!(seen, body.as_bytes(), "responses pass untouched");
    let mut l = labels("gpt-4o");
    l.response_model = "gpt-4o-2024".into();
    assert_eq!(h.metric(&l.token_usage("input")), Some(7));
    assert_eq!(h.metric(&l.token_usage("output")), Some(3));
    assert_eq!(h.metric(&l.token_usage("cached_input")), Some(2));
    assert_eq!(h.metric(&labels("gpt-4o").requests("2xx")), Some(1));
    for (k, v) in [
        (keys::INPUT_TOKENS, "7"),
        (keys::OUTPUT_TOKENS, "3"),
        (keys::TOTAL_TOKENS, "10"),
        (keys::CACHED_INPUT_TOKENS, "2"),
        (keys::USAGE_ESTIMATED, "false"),
        (keys::RESPONSE_MODEL, "gpt-4o-2024"),
        (keys::TTFT_MS, "25"),
        (keys::PROVIDER, "openai"),
        (keys::USAGE, "7,3,10,2,0,0,0,0,0"),
    ] {
        assert_eq!(h.state(k).as_deref(), Some(v), "{k}");
    }
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn injected_usage_chunk_is_counted_and_hidden_from_the_client() {
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    let sent =
        request(&mut p, &mut h, r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
    let sent: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let stream = format!("{}{}{}data: [DONE]\n\n", chunk("Hel"), chunk("lo"), usage_chunk(9, 2));
    let (a, b) = stream.as_bytes().split_at(100);
    let seen = String::from_utf8(respond(&mut p, &mut h, "200", "text/event-stream", &[a, b])).unwrap();
    assert!(!seen.contains("\"usage\":{"), "the usage chunk we asked for is hidden: {seen}");
    assert!(seen.contains("Hel") && seen.ends_with("data: [DONE]\n\n"));
    assert_eq!(h.metric(&labels("gpt-4o").token_usage("input")), Some(9));
    assert_eq!(h.metric(&labels("gpt-4o").token_usage("output")), Some(2));
    assert_eq!(h.state(keys::USAGE).as_deref(), Some("9,2,11,0,0,0,0,0,0"), "published before it was hidden");
}

#[test]
fn a_client_that_asked_for_usage_sees_it_and_other_apis_are_never_injected() {
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    assert_eq!(request(&mut p, &mut h, body), body.as_bytes());
    let stream = format!("{}{}data: [DONE]\n\n", chunk("x"), usage_chunk(1, 1));
    let seen = String::from_utf8(respond(&mut p, &mut h, "200", "text/event-stream", &[stream.as_bytes()])).unwrap();
    assert!(seen.contains("\"usage\":{"));

    for path in ["/v1/responses", "/v1/messages"] {
        let mut p = pipeline(&p0);
        let mut h = host(path);
        let body = r#"{"model":"gpt-4o","stream":true,"input":"hi"}"#;
        assert_eq!(request(&mut p, &mut h, body), body.as_bytes(), "{path} passes unchanged");
    }
}

#[test]
fn a_stream_without_usage_is_estimated_from_its_output() {
    let p0 = plugin(r#"{"inject_include_usage":false,"known_models":["gpt-4o"]}"#);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    request(&mut p, &mut h, r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"12345678"}]}"#);
    let stream = format!("{}{}data: [DONE]\n\n", chunk("abcd"), chunk("efgh"));
    respond(&mut p, &mut h, "200", "text/event-stream", &[stream.as_bytes()]);
    assert_eq!(h.state(keys::INPUT_TOKENS).as_deref(), Some("2"));
    assert_eq!(h.state(keys::OUTPUT_TOKENS).as_deref(), Some("2"));
    assert_eq!(h.state(keys::USAGE_ESTIMATED).as_deref(), Some("true"));
    assert_eq!(h.metric(&labels("gpt-4o").estimated("no_usage")), Some(1));
}

#[test]
fn an_aborted_stream_is_still_usage() {
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    request(&mut p, &mut h, r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"12345678"}]}"#);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    let c = chunk("abcdefgh");
    h.resp_body = c.clone().into_bytes();
    p.on_response_body(&mut h, c.len(), false);
    h.phase = Phase::Log;
    p.on_log(&mut h); // client reset: no end of stream
    assert_eq!(h.state(keys::OUTPUT_TOKENS).as_deref(), Some("2"));
    assert_eq!(h.metric(&labels("gpt-4o").estimated("incomplete")), Some(1));
}

#[test]
fn unknown_models_share_one_label() {
    let p0 = plugin(KNOWN);
    let mut h = host("/v1/chat/completions");
    for i in 0..50 {
        let mut p = pipeline(&p0);
        h.req_headers_sent = false;
        h.phase = Phase::RequestHeaders;
        request(&mut p, &mut h, &format!(r#"{{"model":"random-{i}","messages":[]}}"#));
        respond(
            &mut p,
            &mut h,
            "200",
            "application/json",
            &[br#"{"model":"random","usage":{"prompt_tokens":1,"completion_tokens":1}}"#],
        );
        assert_eq!(h.metric(&labels("other").token_usage("input")), Some(i + 1), "{:?}", h.metric_names(""));
    }
    assert_eq!(h.metric_names("gen_ai_client_token_usage").len(), 2, "one series per type, not per model");
    // The route's default model is learnt from trusted config.
    let mut p = pipeline(&p0);
    h.req_headers_sent = false;
    h.phase = Phase::RequestHeaders;
    request(&mut p, &mut h, r#"{"messages":[]}"#);
    respond(&mut p, &mut h, "200", "application/json", &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#]);
    assert_eq!(h.metric(&labels("gpt-4o").token_usage("input")), Some(1));
}

#[test]
fn errors_count_requests_but_no_tokens() {
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    request(&mut p, &mut h, r#"{"model":"gpt-4o","messages":[]}"#);
    respond(&mut p, &mut h, "429", "application/json", &[br#"{"error":{}}"#]);
    assert_eq!(h.metric(&labels("gpt-4o").requests("4xx")), Some(1));
    assert_eq!(h.metric(&labels("gpt-4o").token_usage("input")), None);
}

#[test]
fn cost_follows_the_price_table() {
    let p0 = plugin(
        r#"{"known_models":["gpt-4o"],"prices":[{"model":"gpt-4o*","input":2.5,"cached_input":1.25,"output":10}]}"#,
    );
    let mut p = pipeline(&p0);
    let mut h = host("/v1/chat/completions");
    request(&mut p, &mut h, r#"{"model":"gpt-4o","messages":[]}"#);
    respond(
        &mut p,
        &mut h,
        "200",
        "application/json",
        &[br#"{"usage":{"prompt_tokens":1000,"completion_tokens":100,"prompt_tokens_details":{"cached_tokens":400}}}"#],
    );
    // 600 × 2.5 + 400 × 1.25 + 100 × 10 = 1500 + 500 + 1000 micro-USD
    assert_eq!(h.state(keys::COST).as_deref(), Some("3000"));
    assert_eq!(h.metric(&labels("gpt-4o").cost(COST, "USD")), Some(3000));
}

#[test]
fn host_call_budget() {
    // Per tracked non-streaming request: request headers (1), route name + metadata (2),
    // body (1), response headers (1), body chunk (1), provider (1), upstream model (1),
    // identity (1): the reads that remain, each needed once.
    let p0 = plugin(KNOWN);
    let mut p = pipeline(&p0);
    let mut h = CountingHost::new(host("/v1/chat/completions"));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    h.inner.req_body = br#"{"model":"gpt-4o","messages":[]}"#.to_vec();
    let n = h.inner.req_body.len();
    p.on_request_body(&mut h, n, true);
    h.inner.phase = Phase::ResponseHeaders;
    h.inner.resp_headers = vec![(":status".into(), "200".into())];
    p.on_response_headers(&mut h, false);
    h.inner.phase = Phase::ResponseBody;
    h.inner.resp_body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#.to_vec();
    let n = h.inner.resp_body.len();
    p.on_response_body(&mut h, n, true);
    p.on_log(&mut h);
    assert!(h.total() <= 9, "value-returning host calls: {} ({:?})", h.total(), h.property_reads.borrow());
    assert_eq!(h.count(CallKind::Header), 0, "headers are read once as a map");
}
