//! semantic-cache through the core pipeline on the fake host: hits, misses, scopes, failures,
//! the SSE replay, the store hand-off to the root context and the host-call budget.

use super::*;
use crate::config::Config;
use serde_json::json;
use sluice_core::exchange::Identity;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;

const CFG: &str = r#"{"embeddings":{"cluster":"emb","model":"embed-1"},"store":{"cluster":"chroma"},
                      "max_distance":0.2,"ttl":"60s"}"#;
const COLL: &str = "ba149481-12d2-4fc3-ad05-39a7ad3450a2";
const ANSWER: &str = "Paris is the capital of France.";

fn plugin(cfg: &str) -> CachePlugin {
    CachePlugin::new(Config::parse(cfg.as_bytes()).unwrap())
}

fn pipeline(p: &CachePlugin) -> Pipeline {
    Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())))
}

fn host(user: Option<&str>) -> FakeHost {
    let mut h = FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
    ]);
    h.set_prop(&["xds", "route_name"], "chat");
    if let Some(u) = user {
        let id =
            Identity { method: "jwt".into(), user: Some(u.into()), team: Some("dev".into()), ..Identity::default() };
        keys::set_filter_state(&mut h, keys::IDENTITY, &id.encode());
    }
    h.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
    h
}

/// A second request on the same VM: shared data, queues and clock carried over.
fn next(prev: &FakeHost, user: Option<&str>) -> FakeHost {
    let mut h = host(user);
    h.shared = prev.shared.clone();
    h.shared_version = prev.shared_version;
    h.queues = prev.queues.clone();
    h.time = prev.time;
    h.metric_defs = prev.metric_defs.clone();
    h.metric_values = prev.metric_values.clone();
    h
}

fn body(text: &str, extra: Value) -> String {
    let mut b = json!({"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

/// Send the request; returns what the pipeline told Envoy at the end of the body.
fn request(p: &mut Pipeline, h: &mut FakeHost, body: &str) -> Act {
    assert_eq!(p.on_request_headers(h, false), Act::Pause, "headers held until the decision");
    h.phase = Phase::RequestBody;
    h.req_body = body.as_bytes().to_vec();
    let n = h.req_body.len();
    p.on_request_body(h, n, true)
}

fn answer_call(p: &mut Pipeline, h: &mut FakeHost, status: u16, body: &str) {
    h.phase = Phase::Callout;
    h.call_resp_headers = vec![(":status".into(), status.to_string().into_bytes())];
    h.call_resp_body = body.as_bytes().to_vec();
    let token = u32::try_from(h.calls.len()).unwrap();
    let n = h.call_resp_body.len();
    p.on_callout(h, token, None, n);
}

fn embedding(v: &[f32]) -> String {
    json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": v}], "model": "embed-1"})
        .to_string()
}

fn query_answer(matches: &[(&str, f32, &Answer, u64)]) -> String {
    json!({
        "ids": [matches.iter().map(|m| m.0).collect::<Vec<_>>()],
        "distances": [matches.iter().map(|m| m.1).collect::<Vec<_>>()],
        "documents": [matches.iter().map(|m| m.2.encode()).collect::<Vec<_>>()],
        "metadatas": [matches.iter().map(|m| json!({"scope": "s", "exp": m.3})).collect::<Vec<_>>()],
    })
    .to_string()
}

fn provider_json(text: &str) -> String {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}})
    .to_string()
}

fn respond_json(p: &mut Pipeline, h: &mut FakeHost, status: &str, body: &str) {
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), status.into()), ("content-type".into(), "application/json".into())];
    assert_eq!(p.on_response_headers(h, false), Act::Continue);
    h.phase = Phase::ResponseBody;
    h.resp_body = body.as_bytes().to_vec();
    assert_eq!(p.on_response_body(h, body.len(), true), Act::Continue, "the answer is never held");
    h.phase = Phase::Log;
    p.on_log(h);
}

fn stored_answer() -> Answer {
    Answer {
        model: "gpt-4o-2024".into(),
        text: ANSWER.into(),
        finish_reason: "stop".into(),
        input_tokens: 11,
        output_tokens: 6,
    }
}

fn now(h: &FakeHost) -> u64 {
    now_ms(h)
}

/// A full miss: embed, open the collection, query (nothing), forward, store.
fn miss_and_store(p0: &CachePlugin, h: &mut FakeHost, text: &str) {
    let mut p = pipeline(p0);
    assert_eq!(request(&mut p, h, &body(text, json!({}))), Act::Pause, "embedding first");
    assert_eq!(h.calls.last().unwrap().cluster, "emb");
    answer_call(&mut p, h, 200, &embedding(&[1.0, 0.0]));
    if h.calls.last().unwrap().headers.iter().any(|(k, v)| k == ":path" && v.ends_with("/collections")) {
        answer_call(&mut p, h, 200, &json!({"id": COLL, "name": "sluice-cache"}).to_string());
    }
    let q = h.calls.last().unwrap().clone();
    assert_eq!(q.cluster, "chroma");
    assert!(q.headers.iter().any(|(k, v)| k == ":path" && v.ends_with(&format!("{COLL}/query"))), "{q:?}");
    answer_call(&mut p, h, 200, &query_answer(&[]));
    assert_eq!(h.resumed_requests, 1, "a miss goes on to the provider");
    assert_eq!(h.state(keys::CACHE).as_deref(), Some("miss"));
    respond_json(&mut p, h, "200", &provider_json(ANSWER));
    assert_eq!(h.resp_header("x-sluice-cache").as_deref(), Some("miss"));
}

#[test]
fn miss_stores_then_the_same_prompt_is_an_exact_hit() {
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    p0.on_start(&mut h);
    miss_and_store(&p0, &mut h, "What is the capital of France?");
    assert_eq!(h.metric("sluice_cache_stores.sluice_phase=.=exact;.;"), Some(1));
    assert_eq!(h.queues[0].1.len(), 1, "the semantic entry went to the root context's queue");
    let job = StoreJob::decode(&h.queues[0].1[0]).unwrap();
    assert_eq!(job.vector, vec![1.0, 0.0], "the lookup's vector is reused: no second embedding");
    assert_eq!(Answer::decode(&job.document).unwrap(), stored_answer());
    assert_eq!(job.expires_ms, now(&h) + 60_000);

    let mut h2 = next(&h, Some("alice"));
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h2, &body("What  is the capital of France?\n", json!({}))), Act::Pause);
    assert!(h2.calls.is_empty(), "exact hit: no callout at all");
    let r = &h2.replies[0];
    assert_eq!(r.status, 200);
    assert!(r.headers.contains(&("x-sluice-cache".into(), "hit-exact".into())));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert!(p.x.served_locally);
    assert_eq!(h2.state(keys::CACHE).as_deref(), Some("hit_exact"));
    assert_eq!(h2.metric("sluice_cache_hits.sluice_phase=.=exact;.;"), Some(1));
    assert_eq!(h2.metric("sluice_cache_saved_tokens.gen_ai_token_type=.=output;.;"), Some(6));
    assert_eq!(h2.metric("sluice_cache_saved_tokens.gen_ai_token_type=.=input;.;"), Some(11));
}

#[test]
fn paraphrase_is_a_semantic_hit_within_the_scope_and_fills_the_exact_tier() {
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("Tell me the capital city of France", json!({})));
    answer_call(&mut p, &mut h, 200, &embedding(&[0.9, 0.1]));
    answer_call(&mut p, &mut h, 200, &json!({"id": COLL}).to_string());
    let q: Value = serde_json::from_slice(h.calls.last().unwrap().body.as_ref().unwrap()).unwrap();
    let key = CacheKey::new("chat", "gpt-4o", "user:alice", "Tell me the capital city of France");
    assert_eq!(q["where"]["$and"][0], json!({"scope": {"$eq": key.scope}}), "only this route, model and tenant");
    assert_eq!(q["where"]["$and"][1]["exp"]["$gt"], now(&h));
    assert_eq!(q["n_results"], 1);
    let a = stored_answer();
    let t = now(&h);
    answer_call(&mut p, &mut h, 200, &query_answer(&[("k", 0.07, &a, t + 5000)]));
    let r = &h.replies[0];
    assert!(r.headers.contains(&("x-sluice-cache".into(), "hit-semantic; distance=0.070".into())), "{:?}", r.headers);
    assert_eq!(h.state(keys::CACHE).as_deref(), Some("hit_semantic:0.070"));
    assert_eq!(h.resumed_requests, 0, "never forwarded");
    assert_eq!(h.metric("sluice_cache_hits.sluice_phase=.=semantic;.;"), Some(1));
    assert_eq!(h.histogram_samples.len(), 1, "lookup latency recorded");

    // The same paraphrase again: the exact tier answers now.
    let mut h2 = next(&h, Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("Tell me the capital city of France", json!({})));
    assert!(h2.calls.is_empty());
    assert!(h2.replies[0].headers.contains(&("x-sluice-cache".into(), "hit-exact".into())));
}

#[test]
fn a_far_match_is_a_miss() {
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("How do volcanoes form?", json!({})));
    answer_call(&mut p, &mut h, 200, &embedding(&[0.0, 1.0]));
    answer_call(&mut p, &mut h, 200, &json!({"id": COLL}).to_string());
    let t = now(&h);
    answer_call(&mut p, &mut h, 200, &query_answer(&[("k", 0.9, &stored_answer(), t + 5000)]));
    assert!(h.replies.is_empty());
    assert_eq!(h.resumed_requests, 1);
    assert_eq!(h.metric("sluice_cache_misses"), Some(1));
    // An expired match (the store's filter should have dropped it) is a miss too.
    let mut h = next(&h, Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("How do volcanoes form?", json!({})));
    answer_call(&mut p, &mut h, 200, &embedding(&[0.0, 1.0]));
    assert!(
        h.calls.last().unwrap().headers.iter().any(|(k, v)| k == ":path" && v.ends_with("/query")),
        "collection id remembered"
    );
    let t = now(&h);
    answer_call(&mut p, &mut h, 200, &query_answer(&[("k", 0.01, &stored_answer(), t)]));
    assert!(h.replies.is_empty());
}

#[test]
fn tenants_never_share_entries() {
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    miss_and_store(&p0, &mut h, "What is the capital of France?");
    // Bob, same text: the exact tier misses (another key) and the semantic query is filtered to Bob.
    let mut h2 = next(&h, Some("bob"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("What is the capital of France?", json!({})));
    assert!(h2.replies.is_empty(), "no exact hit for another user");
    answer_call(&mut p, &mut h2, 200, &embedding(&[1.0, 0.0]));
    let q: Value = serde_json::from_slice(h2.calls.last().unwrap().body.as_ref().unwrap()).unwrap();
    let bob = CacheKey::new("chat", "gpt-4o", "user:bob", "x").scope;
    assert_eq!(q["where"]["$and"][0]["scope"]["$eq"], bob);

    // No identity under a user scope: not cached at all.
    let mut h3 = next(&h, None);
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h3, &body("What is the capital of France?", json!({}))), Act::Continue);
    assert!(h3.calls.is_empty() && h3.replies.is_empty());
    assert_eq!(h3.state(keys::CACHE).as_deref(), Some("skip:no_identity"));
    respond_json(&mut p, &mut h3, "200", &provider_json(ANSWER));
    assert_eq!(h3.shared.len(), h.shared.len(), "nothing stored for an anonymous caller");
}

#[test]
fn global_and_team_scopes_share_within_the_scope() {
    let p0 = plugin(r#"{"semantic":false,"scope":"team"}"#);
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h, &body("Q", json!({}))), Act::Continue, "exact-only miss: no callout");
    respond_json(&mut p, &mut h, "200", &provider_json(ANSWER));
    assert!(h.queues.is_empty(), "exact only: no queue");
    let mut h2 = next(&h, Some("carol")); // same team "dev"
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("Q", json!({})));
    assert_eq!(h2.replies.len(), 1, "a teammate shares the entry");
}

#[test]
fn request_shapes_that_are_not_cached() {
    let p0 = plugin(&CFG.replace("\"ttl\"", "\"skip_nonzero_temperature\":true,\"ttl\""));
    for (extra, why) in [
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}], "temperature": 0}), "skip:tools"),
        (json!({"n": 2, "temperature": 0}), "skip:n"),
        (json!({"temperature": 0.5}), "skip:temperature"),
        (json!({}), "skip:temperature"),
        (json!({"temperature": 0, "logprobs": true}), "skip:logprobs"),
    ] {
        let mut h = host(Some("alice"));
        let mut p = pipeline(&p0);
        assert_eq!(request(&mut p, &mut h, &body("Q", extra.clone())), Act::Continue, "{extra}");
        assert!(h.calls.is_empty(), "{extra}");
        assert_eq!(h.state(keys::CACHE).as_deref(), Some(why), "{extra}");
    }
    // Other APIs pass untouched; the route can turn the cache off.
    let mut h = host(Some("alice"));
    h.req_headers = vec![(":method".into(), b"POST".to_vec()), (":path".into(), b"/v1/responses".to_vec())];
    let mut p = pipeline(&p0);
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.state(keys::CACHE).as_deref(), Some("skip:api"));
    let mut h = host(Some("alice"));
    h.properties.insert(
        "xds/route_metadata".into(),
        sluice_core::encoding::test_encode_metadata("sluice", &json!({"semantic_cache": false})),
    );
    let mut p = pipeline(&p0);
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.state(keys::CACHE).as_deref(), Some("skip:route"));
}

#[test]
fn embeddings_down_forwards_or_refuses() {
    for (mode, replies) in [("allow", 0), ("deny", 1)] {
        let p0 = plugin(&CFG.replace("\"ttl\"", &format!("\"failure_mode\":\"{mode}\",\"ttl\"")));
        let mut h = host(Some("alice"));
        let mut p = pipeline(&p0);
        request(&mut p, &mut h, &body("Q", json!({})));
        h.phase = Phase::Callout;
        h.call_resp_headers = Vec::new();
        p.on_callout(&mut h, 1, None, 0); // timeout: no response at all
        assert_eq!(h.replies.len(), replies, "{mode}");
        assert_eq!(h.state(keys::CACHE).as_deref(), Some("error:embeddings"));
        assert_eq!(h.metric("sluice_cache_errors.sluice_reason=.=embeddings;.;"), Some(1));
        if mode == "deny" {
            assert_eq!(h.replies[0].status, 503);
            assert_eq!(h.resumed_requests, 0);
        } else {
            assert_eq!(h.resumed_requests, 1, "forwarded uncached");
            respond_json(&mut p, &mut h, "200", &provider_json(ANSWER));
            assert_eq!(h.resp_header("x-sluice-cache").as_deref(), Some("error"));
            assert!(h.queues.iter().all(|(_, q)| q.is_empty()), "no vector: nothing for the semantic tier");
        }
    }
    // A cluster Envoy does not know: refused at dispatch, same failure path.
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    h.fail_calls = true;
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h, &body("Q", json!({}))), Act::Continue);
    assert_eq!(h.state(keys::CACHE).as_deref(), Some("error:embeddings"));
}

#[test]
fn store_down_forwards_or_refuses_and_a_stale_collection_is_forgotten() {
    for (mode, replies) in [("allow", 0), ("deny", 1)] {
        let p0 = plugin(&CFG.replace("\"ttl\"", &format!("\"failure_mode\":\"{mode}\",\"ttl\"")));
        let mut h = host(Some("alice"));
        let mut p = pipeline(&p0);
        request(&mut p, &mut h, &body("Q", json!({})));
        answer_call(&mut p, &mut h, 200, &embedding(&[1.0]));
        answer_call(&mut p, &mut h, 503, "upstream connect error");
        assert_eq!(h.replies.len(), replies, "{mode}");
        assert_eq!(h.state(keys::CACHE).as_deref(), Some("error:store"));
    }
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    miss_and_store(&p0, &mut h, "first");
    let mut h2 = next(&h, Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("second", json!({})));
    answer_call(&mut p, &mut h2, 200, &embedding(&[1.0]));
    answer_call(&mut p, &mut h2, 400, r#"{"error":"InvalidArgumentError","message":"Collection x does not exist."}"#);
    assert_eq!(h2.resumed_requests, 1);
    assert_eq!(shared_collection(&h2, "sluice-cache"), None, "every worker re-opens it next time");
    assert!(p0.vm.borrow().collection.is_none());
}

fn sse(pieces: &[&str], usage: bool) -> Vec<u8> {
    let mut s = String::new();
    let head = r#""id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024""#;
    s.push_str(&format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"));
    for p in pieces {
        s.push_str(&format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{p}\"}},\"finish_reason\":null}}]}}\n\n"));
    }
    s.push_str(&format!(
        "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    ));
    if usage {
        s.push_str(&format!("data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":6,\"total_tokens\":17}}}}\n\n"));
    }
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

#[test]
fn a_stream_is_stored_from_its_assembled_text_and_replayed_as_sse() {
    let p0 = plugin(r#"{"semantic":false}"#);
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    let req = body("Q", json!({"stream": true, "stream_options": {"include_usage": true}}));
    assert_eq!(request(&mut p, &mut h, &req), Act::Continue);
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    let stream = sse(&["Paris is ", "the capital ", "of France."], true);
    let (a, b) = stream.split_at(100);
    for (chunk, end) in [(a, false), (b, true)] {
        h.resp_body = chunk.to_vec();
        assert_eq!(p.on_response_body(&mut h, chunk.len(), end), Act::Continue, "streams pass at once");
        assert_eq!(h.resp_body, chunk, "untouched");
    }
    p.on_log(&mut h);
    assert_eq!(h.metric("sluice_cache_stores.sluice_phase=.=exact;.;"), Some(1));

    // Non-streaming client, same question: JSON from the stored stream.
    let mut h2 = next(&h, Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("Q", json!({})));
    let v: Value = serde_json::from_slice(&h2.replies[0].body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER);
    assert_eq!(v["usage"]["total_tokens"], 17);

    // Streaming client: SSE, with the usage chunk only because it asked.
    for include in [true, false] {
        let mut h3 = next(&h, Some("alice"));
        let mut p = pipeline(&p0);
        let extra = if include {
            json!({"stream": true, "stream_options": {"include_usage": true}})
        } else {
            json!({"stream": true})
        };
        request(&mut p, &mut h3, &body("Q", extra));
        let r = &h3.replies[0];
        assert!(r.headers.contains(&("content-type".into(), "text/event-stream".into())));
        let text = String::from_utf8(r.body.clone()).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(text.contains("\"total_tokens\":17"), include, "{text}");
    }
}

#[test]
fn incomplete_or_unusable_answers_are_not_stored() {
    let p0 = plugin(r#"{"semantic":false}"#);
    for (status, body_text) in [
        ("500", provider_json(ANSWER)),
        ("200", provider_json(ANSWER).replace("\"stop\"", "\"length\"")),
        ("200", "{not json".to_string()),
    ] {
        let mut h = host(Some("alice"));
        let mut p = pipeline(&p0);
        request(&mut p, &mut h, &body("Q", json!({})));
        respond_json(&mut p, &mut h, status, &body_text);
        assert!(h.shared.is_empty(), "{status} {body_text}");
    }
    // A stream cut before [DONE] (reset): on_done only, nothing stored.
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("Q", json!({"stream": true})));
    h.req_headers_sent = true;
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    p.on_response_headers(&mut h, false);
    h.phase = Phase::ResponseBody;
    let s = sse(&["Par"], false);
    h.resp_body = s[..60].to_vec();
    p.on_response_body(&mut h, 60, false);
    p.on_log(&mut h);
    assert!(h.shared.is_empty());
}

#[test]
fn entries_expire_after_the_ttl() {
    let p0 = plugin(r#"{"semantic":false,"ttl":"2s"}"#);
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("Q", json!({})));
    respond_json(&mut p, &mut h, "200", &provider_json(ANSWER));
    let mut h2 = next(&h, Some("alice"));
    h2.time = h.time.map(|t| t + Duration::from_millis(1999));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h2, &body("Q", json!({})));
    assert_eq!(h2.replies.len(), 1);
    let mut h3 = next(&h, Some("alice"));
    h3.time = h.time.map(|t| t + Duration::from_secs(2));
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h3, &body("Q", json!({}))), Act::Continue);
    assert!(h3.replies.is_empty(), "expired");
}

#[test]
fn client_cache_control() {
    let p0 = plugin(r#"{"semantic":false}"#);
    let mut h = host(Some("alice"));
    h.req_headers.push(("cache-control".into(), b"no-store".to_vec()));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("Q", json!({})));
    respond_json(&mut p, &mut h, "200", &provider_json(ANSWER));
    assert!(h.shared.is_empty(), "no-store");
    let mut h = host(Some("alice"));
    let mut p = pipeline(&p0);
    request(&mut p, &mut h, &body("Q", json!({})));
    respond_json(&mut p, &mut h, "200", &provider_json(ANSWER));
    let mut h2 = next(&h, Some("alice"));
    h2.req_headers.push(("cache-control".into(), b"no-cache".to_vec()));
    let mut p = pipeline(&p0);
    assert_eq!(request(&mut p, &mut h2, &body("Q", json!({}))), Act::Continue, "no-cache: not answered from the cache");
    assert_eq!(h2.state(keys::CACHE).as_deref(), Some("skip:client"));
}

#[test]
fn the_root_context_upserts_queued_entries() {
    let p0 = plugin(CFG);
    let mut root = FakeHost { phase: Phase::Root, ..FakeHost::default() };
    p0.on_start(&mut root);
    assert_eq!(root.queues.len(), 1);
    assert_eq!(root.queues[0].0, "sluice.semantic_cache.sluice-cache");
    let job = StoreJob {
        id: "k1".into(),
        vector: vec![0.5, 0.5],
        document: stored_answer().encode(),
        scope: "s".into(),
        expires_ms: 99,
    };
    assert!(root.enqueue(0, &job.encode()));
    assert!(root.enqueue(0, b"garbage"));
    p0.on_queue_ready(&mut root, 7); // not ours
    assert!(root.calls.is_empty());
    p0.on_queue_ready(&mut root, 0);
    assert_eq!(root.calls.len(), 1, "the collection is opened first");
    assert!(root.calls[0]
        .headers
        .contains(&(":path".into(), "/api/v2/tenants/default_tenant/databases/default_database/collections".into())));
    let open = CalloutResponse {
        token: 1,
        status: Some(200),
        body: Some(json!({"id": COLL}).to_string().into_bytes()),
        ..Default::default()
    };
    assert!(p0.on_root_callout(&mut root, &open));
    assert_eq!(root.calls.len(), 2);
    let up: Value = serde_json::from_slice(root.calls[1].body.as_ref().unwrap()).unwrap();
    assert_eq!(up["ids"], json!(["k1"]));
    assert_eq!(up["metadatas"], json!([{"scope": "s", "exp": 99}]));
    assert!(root.calls[1].headers.iter().any(|(k, v)| k == ":path" && v.ends_with(&format!("{COLL}/upsert"))));
    let ok = CalloutResponse { token: 2, status: Some(200), body: Some(b"{}".to_vec()), ..Default::default() };
    assert!(p0.on_root_callout(&mut root, &ok));
    assert_eq!(root.metric("sluice_cache_stores.sluice_phase=.=semantic;.;"), Some(1));
    assert!(!p0.on_root_callout(&mut root, &ok), "answered once");
    assert_eq!(shared_collection(&root, "sluice-cache").as_deref(), Some(COLL), "shared with the other workers");

    // Cleanup of expired entries: one worker per interval wins the CAS.
    assert_eq!(p0.tick_period(), Some(Duration::from_secs(60)));
    root.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
    p0.on_tick(&mut root);
    assert_eq!(root.calls.len(), 3);
    let del: Value = serde_json::from_slice(root.calls[2].body.as_ref().unwrap()).unwrap();
    assert_eq!(del, json!({"where": {"exp": {"$lt": 1_000_000_000u64}}}));
    p0.on_tick(&mut root);
    assert_eq!(root.calls.len(), 3, "not again within the interval");
}

#[test]
fn store_jobs_round_trip_exactly() {
    let job = StoreJob {
        id: "k".into(),
        vector: vec![0.1, -2.5e-8, 1.0, f32::MIN_POSITIVE],
        document: "{}".into(),
        scope: "s".into(),
        expires_ms: 7,
    };
    assert_eq!(StoreJob::decode(&job.encode()), Some(job.clone()));
    let text = String::from_utf8(job.encode()).unwrap();
    assert!(text.contains("\"vector\":\"cdcccc3d"), "{text}");
    for bad in [
        r#"{"id":"k","vector":"abc","document":"d","scope":"s","exp":1}"#,
        r#"{"id":"k","vector":"zzzzzzzz","document":"d","scope":"s","exp":1}"#,
        r#"{"id":"k","vector":[1.0],"document":"d","scope":"s","exp":1}"#,
    ] {
        assert_eq!(StoreJob::decode(bad.as_bytes()), None, "{bad}");
    }
}

#[test]
fn distances_print_with_three_decimals() {
    assert_eq!(thousandths(0.07), "0.070");
    assert_eq!(thousandths(0.1844), "0.184");
    assert_eq!(thousandths(0.0), "0.000");
    assert_eq!(thousandths(1.9996), "2.000");
    assert_eq!(thousandths(-0.5), "0.000");
}

#[test]
fn host_call_budget_of_an_exact_hit() {
    let p0 = plugin(CFG);
    let mut h = host(Some("alice"));
    miss_and_store(&p0, &mut h, "Q");
    let mut counting = CountingHost::new(next(&h, Some("alice")));
    let mut p = pipeline(&p0);
    assert_eq!(p.on_request_headers(&mut counting, false), Act::Pause);
    counting.inner.phase = Phase::RequestBody;
    counting.inner.req_body = body("Q", json!({})).into_bytes();
    let n = counting.inner.req_body.len();
    assert_eq!(p.on_request_body(&mut counting, n, true), Act::Pause);
    assert_eq!(counting.inner.replies.len(), 1);
    // Budget: request headers (1), route name + route metadata (2, a fresh route cache), the
    // body (1), identity (1 filter-state read), the exact slot (1 shared-data read).
    assert_eq!(counting.count(CallKind::SharedData), 1);
    assert!(counting.total() <= 6, "{} host calls: {:?}", counting.total(), counting.property_reads.borrow());
}
