//! rag through the core pipeline on the fake host.

use super::*;
use crate::config::Config;
use serde_json::{json, Value};
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;

const CFG: &str =
    r#"{"embeddings":{"cluster":"emb","model":"embed-1"},"store":{"cluster":"chroma"},"top_k":2,"max_distance":0.8}"#;
const COLL: &str = "383772b2-03ff-4c89-b88a-01926108cbdc";
const CHEESE: &str = "France produces between 1,000 and 1,600 varieties of cheese.";

fn plugin(cfg: &str) -> RagPlugin {
    RagPlugin::new(Config::parse(cfg.as_bytes()).unwrap())
}

fn pipeline(p: &RagPlugin) -> Pipeline {
    Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())))
}

fn host(path: &str, rag: Option<Value>) -> FakeHost {
    let mut h = FakeHost::with_request_headers(&[
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/json"),
        ("content-length", "10"),
    ]);
    h.set_prop(&["xds", "route_name"], "cheese");
    let meta = match rag {
        Some(r) => json!({"rag": r}),
        None => json!({}),
    };
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &meta));
    h
}

fn send(p: &mut Pipeline, h: &mut FakeHost, body: &Value) -> Act {
    p.on_request_headers(h, false);
    h.phase = Phase::RequestBody;
    h.req_body = body.to_string().into_bytes();
    let n = h.req_body.len();
    p.on_request_body(h, n, true)
}

fn answer(p: &mut Pipeline, h: &mut FakeHost, status: u16, body: &str) {
    h.phase = Phase::Callout;
    h.call_resp_headers = vec![(":status".into(), status.to_string().into_bytes())];
    h.call_resp_body = body.as_bytes().to_vec();
    let t = u32::try_from(h.calls.len()).unwrap();
    let n = h.call_resp_body.len();
    p.on_callout(h, t, None, n);
}

fn emb() -> String {
    json!({"data": [{"index": 0, "embedding": [0.1, 0.9]}]}).to_string()
}

fn results(items: &[(&str, f32, &str)]) -> String {
    json!({"ids": [items.iter().map(|i| i.0).collect::<Vec<_>>()], "distances": [items.iter().map(|i| i.1).collect::<Vec<_>>()],
           "documents": [items.iter().map(|i| i.2).collect::<Vec<_>>()],
           "metadatas": [items.iter().map(|i| json!({"source": format!("{}.md", i.0)})).collect::<Vec<_>>()]})
    .to_string()
}

fn chat(q: &str) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": q}]})
}

fn sent(h: &FakeHost) -> Value {
    serde_json::from_slice(&h.req_body).unwrap()
}

#[test]
fn adds_the_nearest_passages_as_a_system_message() {
    let p0 = plugin(CFG);
    let mut h = host("/v1/chat/completions", Some(json!({"collection": "french-cheeses"})));
    let mut p = pipeline(&p0);
    assert_eq!(send(&mut p, &mut h, &chat("How many cheeses are there in France?")), Act::Pause);
    let e: Value = serde_json::from_slice(h.calls[0].body.as_ref().unwrap()).unwrap();
    assert_eq!(e, json!({"model": "embed-1", "input": "How many cheeses are there in France?"}));
    answer(&mut p, &mut h, 200, &emb());
    assert!(h.calls[1].headers.contains(&(
        ":path".into(),
        "/api/v2/tenants/default_tenant/databases/default_database/collections/french-cheeses".into()
    )));
    answer(&mut p, &mut h, 200, &json!({"id": COLL, "name": "french-cheeses"}).to_string());
    let q: Value = serde_json::from_slice(h.calls[2].body.as_ref().unwrap()).unwrap();
    assert_eq!(q["n_results"], 2);
    assert!(q.get("where").is_none());
    answer(
        &mut p,
        &mut h,
        200,
        &results(&[("p1", 0.3, CHEESE), ("p2", 0.5, "Brie comes from Seine-et-Marne."), ("p3", 0.95, "far")]),
    );
    assert_eq!(h.resumed_requests, 1);
    let body = sent(&h);
    let sys = body["messages"][0].clone();
    assert_eq!(sys["role"], "system", "before the client's messages");
    let text = sys["content"].as_str().unwrap();
    assert!(text.contains(CHEESE) && text.contains("Brie") && !text.contains("far"), "{text}");
    assert_eq!(body["messages"][1], chat("How many cheeses are there in France?")["messages"][0]);
    assert_eq!(h.state(keys::RAG).as_deref(), Some("added:2"));
    assert_eq!(h.metric("sluice_rag_passages"), Some(2));
    assert!(h.metric("sluice_rag_added_tokens").unwrap() > 10);
    assert!(h.req_header("content-length").is_none(), "the body changed size");

    // Next request: the collection id is remembered.
    let mut h2 = host("/v1/chat/completions", Some(json!("french-cheeses")));
    h2.shared = h.shared.clone();
    let mut p = pipeline(&p0);
    send(&mut p, &mut h2, &chat("Cheese varieties?"));
    answer(&mut p, &mut h2, 200, &emb());
    assert!(h2.calls[1].headers.iter().any(|(k, v)| k == ":path" && v.ends_with(&format!("{COLL}/query"))));
}

#[test]
fn responses_and_messages_get_their_own_system_text() {
    let p0 = plugin(CFG);
    for (path, body, check) in [
        (
            "/v1/responses",
            json!({"model": "m", "instructions": "Be brief.", "input": "Cheese count?"}),
            "/instructions",
        ),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "Cheese count?"}]}),
            "/system",
        ),
    ] {
        let mut h = host(path, Some(json!("french-cheeses")));
        h.shared.insert("sluice.rag.collection.french-cheeses".into(), (COLL.as_bytes().to_vec(), 1));
        let mut p = pipeline(&p0);
        send(&mut p, &mut h, &body);
        answer(&mut p, &mut h, 200, &emb());
        answer(&mut p, &mut h, 200, &results(&[("p1", 0.3, CHEESE)]));
        let out = sent(&h);
        assert!(out.pointer(check).unwrap().as_str().unwrap().contains(CHEESE), "{path}: {out}");
    }
}

#[test]
fn an_empty_collection_or_far_passages_change_nothing() {
    let p0 = plugin(CFG);
    for res in [results(&[]), results(&[("p", 0.99, "unrelated")])] {
        let mut h = host("/v1/chat/completions", Some(json!("french-cheeses")));
        h.shared.insert("sluice.rag.collection.french-cheeses".into(), (COLL.as_bytes().to_vec(), 1));
        let mut p = pipeline(&p0);
        let body = chat("Cheese?");
        send(&mut p, &mut h, &body);
        answer(&mut p, &mut h, 200, &emb());
        answer(&mut p, &mut h, 200, &res);
        assert_eq!(h.resumed_requests, 1);
        assert_eq!(sent(&h), body, "byte-identical body: nothing rewritten");
        assert_eq!(h.req_body, body.to_string().into_bytes());
        assert_eq!(h.state(keys::RAG).as_deref(), Some("none"));
    }
}

#[test]
fn routes_without_rag_are_untouched() {
    let p0 = plugin(CFG);
    for meta in [None, Some(json!(false))] {
        let mut h = host("/v1/chat/completions", meta);
        let mut p = pipeline(&p0);
        assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
        assert_eq!(h.req_header("content-length").as_deref(), Some("10"));
        assert_eq!(p.on_request_body(&mut h, 5, true), Act::Continue, "body not even read");
        assert!(h.calls.is_empty() && h.state(keys::RAG).is_none());
    }
}

#[test]
fn failures_forward_unchanged_or_refuse() {
    for (mode, replies) in [("allow", 0), ("deny", 1)] {
        let p0 = plugin(&CFG.replace("\"top_k\"", &format!("\"failure_mode\":\"{mode}\",\"top_k\"")));
        // Embeddings down (timeout: no response).
        let mut h = host("/v1/chat/completions", Some(json!("french-cheeses")));
        let mut p = pipeline(&p0);
        let body = chat("Cheese?");
        send(&mut p, &mut h, &body);
        h.call_resp_headers = Vec::new();
        p.on_callout(&mut h, 1, None, 0);
        assert_eq!(h.replies.len(), replies, "{mode}");
        assert_eq!(h.state(keys::RAG).as_deref(), Some("error:embeddings"));
        if replies == 0 {
            assert_eq!(h.resumed_requests, 1);
            assert_eq!(sent(&h), body);
        } else {
            assert_eq!(h.replies[0].status, 503);
        }
        // Missing collection.
        let mut h = host("/v1/chat/completions", Some(json!("french-cheeses")));
        let mut p = pipeline(&p0);
        send(&mut p, &mut h, &body);
        answer(&mut p, &mut h, 200, &emb());
        answer(&mut p, &mut h, 404, r#"{"error":"NotFoundError"}"#);
        assert_eq!(h.state(keys::RAG).as_deref(), Some("error:no_collection"));
        assert_eq!(h.replies.len(), replies);
        // Store down on the query; a stale id is forgotten.
        let mut h = host("/v1/chat/completions", Some(json!("french-cheeses")));
        h.shared.insert("sluice.rag.collection.french-cheeses".into(), (COLL.as_bytes().to_vec(), 1));
        let mut p = pipeline(&p0);
        send(&mut p, &mut h, &body);
        answer(&mut p, &mut h, 200, &emb());
        answer(
            &mut p,
            &mut h,
            400,
            r#"{"error":"InvalidArgumentError","message":"Collection 383772b2 does not exist."}"#,
        );
        assert_eq!(h.state(keys::RAG).as_deref(), Some("error:store"));
        assert!(h.shared_data("sluice.rag.collection.french-cheeses").0.is_none());
    }
    // Bad route metadata: the filter's failure mode too, loudly.
    let p0 = plugin(CFG);
    let mut h = host("/v1/chat/completions", Some(json!({"topk": 3})));
    let mut p = pipeline(&p0);
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.state(keys::RAG).as_deref(), Some("error:route_config"));
}

#[test]
fn requests_without_a_question_are_skipped() {
    let p0 = plugin(CFG);
    let mut h = host("/v1/chat/completions", Some(json!("french-cheeses")));
    let mut p = pipeline(&p0);
    assert_eq!(
        send(&mut p, &mut h, &json!({"model": "m", "messages": [{"role": "system", "content": "x"}]})),
        Act::Continue
    );
    assert_eq!(h.state(keys::RAG).as_deref(), Some("skip:no_text"));
    let mut h = host("/v1/completions", Some(json!("french-cheeses")));
    let mut p = pipeline(&p0);
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.state(keys::RAG).as_deref(), Some("skip:api"));
}

#[test]
fn host_call_budget() {
    let p0 = plugin(CFG);
    let mut fake = host("/v1/chat/completions", Some(json!("french-cheeses")));
    fake.shared.insert("sluice.rag.collection.french-cheeses".into(), (COLL.as_bytes().to_vec(), 1));
    let mut h = CountingHost::new(fake);
    let mut p = pipeline(&p0);
    p.on_request_headers(&mut h, false);
    h.inner.req_body = chat("Cheese?").to_string().into_bytes();
    let n = h.inner.req_body.len();
    p.on_request_body(&mut h, n, true);
    for body in [emb(), results(&[("p1", 0.3, CHEESE)])] {
        h.inner.call_resp_headers = vec![(":status".into(), b"200".to_vec())];
        h.inner.call_resp_body = body.into_bytes();
        let t = u32::try_from(h.inner.calls.len()).unwrap();
        let n = h.inner.call_resp_body.len();
        p.on_callout(&mut h, t, None, n);
    }
    assert_eq!(h.inner.state(keys::RAG).as_deref(), Some("added:1"));
    // Budget: request headers (1), route name + metadata (2), body (1), collection id from
    // shared data (1), two callout answers × headers + body (4).
    assert_eq!(h.count(CallKind::Callout), 4);
    assert!(h.total() <= 9, "{} host calls", h.total());
}
