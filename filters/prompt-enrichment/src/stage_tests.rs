//! prompt-enrichment through the core pipeline on the fake host.

use super::*;
use serde_json::json;
use sluice_core::encoding::test_encode_metadata;
use sluice_core::exchange::Identity;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Phase};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use std::cell::RefCell;

const SYSTEM: &str = "Parse the unstructured text into CSV format. Respond only with the CSV data.";

fn plugin(v: Value) -> EnrichmentPlugin {
    EnrichmentPlugin::new(Config::from_json(v.to_string().as_bytes()).unwrap())
}

fn seed() -> EnrichmentPlugin {
    plugin(json!({
        "default_profile": "csv",
        "max_body_bytes": 2048,
        "profiles": {
            "csv": {"prepend": [{"role": "system", "content": SYSTEM}]},
            "team": {
                "allow_header_variables": true,
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

fn pipeline(p: &EnrichmentPlugin) -> Pipeline {
    Pipeline::new(1, vec![Slot::of(p)], Rc::new(RefCell::new(RouteCache::default())))
}

fn host_at(path: &str, route: Value) -> FakeHost {
    let mut h =
        FakeHost::with_request_headers(&[(":method", "POST"), (":path", path), ("content-type", "application/json")]);
    h.set_prop(&["xds", "route_name"], "r");
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &route));
    h
}

fn host(profile: Option<&str>) -> FakeHost {
    let route = match profile {
        Some(p) => json!({"enrichment_profile": p, "tier": "gold"}),
        None => json!({"tier": "gold"}),
    };
    host_at("/v1/chat/completions", route)
}

fn identity(h: &mut FakeHost, user: &str, team: &str) {
    let id = Identity { method: "jwt".into(), user: Some(user.into()), team: Some(team.into()), ..Identity::default() };
    h.set_prop(&[keys::IDENTITY], &id.encode());
}

/// Headers, then the whole body in one callback; returns (headers act, body act).
fn run(p: &EnrichmentPlugin, h: &mut FakeHost, body: &[u8]) -> (Act, Act) {
    let mut pl = pipeline(p);
    run_on(&mut pl, h, body)
}

fn run_on(pl: &mut Pipeline, h: &mut FakeHost, body: &[u8]) -> (Act, Act) {
    if !h.req_headers.iter().any(|(k, _)| k == "content-length") {
        h.req_headers.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let a = pl.on_request_headers(h, body.is_empty());
    if body.is_empty() {
        return (a, a);
    }
    h.phase = Phase::RequestBody;
    h.req_body = body.to_vec();
    let b = pl.on_request_body(h, body.len(), true);
    (a, b)
}

fn parsed(h: &FakeHost) -> Value {
    serde_json::from_slice(&h.req_body).unwrap()
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn metric(h: &FakeHost, profile: &str, action: &str, reason: &str) -> i64 {
    let name = sluice_core::metrics::tagged_name(
        REQUESTS_METRIC,
        &[("sluice_rule", profile), ("sluice_action", action), ("sluice_reason", reason)],
    );
    h.metric(&name).unwrap_or(0)
}

fn error_code(h: &FakeHost) -> String {
    let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    v["error"]["code"].as_str().unwrap().to_string()
}

#[test]
fn seed_004_system_prompt_first_everything_else_kept() {
    let p = seed();
    let mut h = host(None);
    let client = json!({"model": "gpt-4o-mini", "max_tokens": 128, "vendor": {"keep": [1, null]},
                        "messages": [{"role": "user", "content": "Seattle, Chicago"}]});
    assert_eq!(run(&p, &mut h, &body(&client)), (Act::Pause, Act::Continue));
    assert_eq!(h.req_header("content-length"), Some(h.req_body.len().to_string()), "the new length (headers held)");
    let got = parsed(&h);
    assert_eq!(got["messages"][0], json!({"role": "system", "content": SYSTEM}));
    assert_eq!(got["messages"][1], client["messages"][0]);
    assert_eq!(got["vendor"], client["vendor"]);
    assert!(String::from_utf8(h.req_body.clone()).unwrap().starts_with(r#"{"model":"gpt-4o-mini""#), "key order kept");
    assert_eq!(metric(&h, "csv", "enriched", "ok"), 1);
    assert_eq!(h.state(keys::REQUESTED_MODEL).as_deref(), Some("gpt-4o-mini"));
    assert!(h.refused.is_empty(), "{:?}", h.refused);
}

#[test]
fn request_trailers_end_the_body_and_the_request_is_enriched() {
    let p = seed();
    let mut h = host(None);
    let mut pl = pipeline(&p);
    h.req_headers.push(("content-length".into(), b"100".to_vec()));
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    h.req_body = body(&json!({"messages": [{"role": "user", "content": "hi"}]}));
    let n = h.req_body.len();
    assert_eq!(pl.on_request_body(&mut h, n, false), Act::Pause);
    assert_eq!(pl.on_request_trailers(&mut h), Act::Continue);
    assert_eq!(parsed(&h)["messages"][0]["role"], "system");
    assert_eq!(metric(&h, "csv", "enriched", "ok"), 1);
}

#[test]
fn templates_from_identity_headers_route_and_claims() {
    let p = seed();
    let mut h = host(Some("team"));
    identity(&mut h, "alice", "dev");
    h.set_prop(&[&keys::claim_key("org")], "acme");
    h.req_headers.push(("x-team".into(), b"ops".to_vec()));
    h.req_headers.push(("x-lang".into(), b"French".to_vec()));
    run(&p, &mut h, br#"{"messages":[{"role":"user","content":"hi"}]}"#);
    let got = parsed(&h);
    assert_eq!(got["messages"][0]["content"], "You answer for team dev (ops, gold, acme, alice).");
    assert_eq!(got["messages"][2]["content"][0]["text"], "Reply in French.");
}

#[test]
fn claims_in_process_win_over_filter_state() {
    let p = seed();
    let mut pl = pipeline(&p);
    let mut h = host(Some("strict"));
    h.set_prop(&[&keys::claim_key("team")], "from-state");
    let id = Identity {
        method: "jwt".into(),
        user: Some("u".into()),
        claims: Some(Rc::new(json!({"team": "from-token"}))),
        ..Identity::default()
    };
    pl.x.set_identity(&mut h, id);
    run_on(&mut pl, &mut h, br#"{"messages":[]}"#);
    assert_eq!(parsed(&h)["messages"][0]["content"], "Team from-token");
}

#[test]
fn missing_variable_refused_when_strict() {
    let p = seed();
    let mut h = host(Some("strict"));
    let (_, b) = run(&p, &mut h, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
    assert_eq!(b, Act::Pause);
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].status, 400);
    assert_eq!(error_code(&h), "missing_template_variable");
    let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("{{claim.team}}"), "{v}");
    assert_eq!(metric(&h, "strict", "refused", "missing_variable"), 1);

    let mut h = host(Some("strict"));
    h.set_prop(&[&keys::claim_key("team")], "dev");
    run(&p, &mut h, &body(&json!({"messages": [{"role": "user", "content": "hi"}]})));
    assert!(h.replies.is_empty());
    assert_eq!(parsed(&h)["messages"][0]["content"], "Team dev");
}

#[test]
fn defaults_overrides_caps() {
    let p = seed();
    let cases = [
        (
            json!({}),
            json!({"temperature": 0.2, "max_tokens": 256, "user": "alice", "top_p": 0.5, "metadata": {"team": "dev"}}),
        ),
        (
            json!({"temperature": 0.9, "max_tokens": 50, "user": "bob", "top_p": 1, "metadata": {"x": 1}}),
            json!({"temperature": 0.9, "max_tokens": 50, "user": "bob", "top_p": 0.5, "metadata": {"team": "dev"}}),
        ),
        (
            // One output cap (the smallest configured) bounds both chat fields.
            json!({"max_tokens": 5000, "max_completion_tokens": 9000, "temperature": 2}),
            json!({"max_tokens": 512, "max_completion_tokens": 512, "temperature": 1.5}),
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
        identity(&mut h, "alice", "dev");
        let mut req = client.clone();
        req["messages"] = json!([{"role": "user", "content": "x"}]);
        run(&p, &mut h, &body(&req));
        let got = parsed(&h);
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&got.get(k).cloned().unwrap_or(Value::Null), v, "client {client}: field {k} in {got}");
        }
        assert_eq!(got["messages"], json!([{"role": "user", "content": "x"}]), "fields-only profile keeps messages");
    }
}

#[test]
fn responses_and_messages_get_the_prompt_in_their_own_place() {
    let p = seed();
    let mut h = host_at("/v1/responses", json!({}));
    run(&p, &mut h, br#"{"model":"gpt-4o","instructions":"Be brief.","input":"Seattle"}"#);
    let got = parsed(&h);
    assert_eq!(got["instructions"], format!("{SYSTEM}\n\nBe brief."));
    assert_eq!(got["input"], "Seattle");
    assert!(got.get("messages").is_none());

    let mut h = host_at("/v1/messages", json!({}));
    run(&p, &mut h, br#"{"model":"claude","max_tokens":10,"messages":[{"role":"user","content":"Seattle"}]}"#);
    let got = parsed(&h);
    assert_eq!(got["system"], SYSTEM);
    assert_eq!(got["messages"].as_array().unwrap().len(), 1);

    let mut h = host_at("/v1/responses", json!({"enrichment_profile": "fields"}));
    run(&p, &mut h, br#"{"input":"x","stream":true,"max_output_tokens":4000}"#);
    let got = parsed(&h);
    assert_eq!(got["max_output_tokens"], 512);
    assert!(got.get("max_tokens").is_none() && got.get("stream_options").is_none(), "{got}");
}

#[test]
fn cap_refuses_non_numbers_and_wrong_shapes() {
    let p = seed();
    let mut h = host(Some("fields"));
    run(&p, &mut h, &body(&json!({"temperature": "2", "messages": []})));
    assert_eq!(h.replies[0].status, 400);
    assert_eq!(error_code(&h), "invalid_request");
    for b in
        [json!({"messages": 3}), json!({"messages": [{"content": "x"}]}), json!({"max_tokens": "ten", "messages": []})]
    {
        let p = seed(); // metric ids are cached per plugin (per VM): a fresh host needs a fresh plugin
        let mut h = host(None);
        run(&p, &mut h, &body(&b));
        assert_eq!(h.replies.len(), 1, "{b}");
        assert_eq!(error_code(&h), "invalid_request", "{b}");
        assert_eq!(metric(&h, "csv", "refused", "invalid_request"), 1);
        let v: Value = serde_json::from_slice(&h.replies[0].body).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        if b["messages"].is_array() && b["messages"].as_array().unwrap().len() == 1 {
            assert!(msg.contains("messages[0].role: missing required field"), "{msg}");
        }
        if b.get("max_tokens").is_some() {
            assert!(msg.contains("max_tokens: expected a non-negative integer"), "{msg}");
        }
    }
}

#[test]
fn duplicate_keys_are_refused_before_enrichment() {
    let p = plugin(json!({"default_profile": "c", "profiles": {"c": {"caps": {"max_tokens": 10}}}}));
    let mut h = host(None);
    run(&p, &mut h, br#"{"max_tokens":5000,"max_tokens":5,"messages":[]}"#);
    assert_eq!(h.replies[0].status, 400);
    assert_eq!(error_code(&h), "duplicate_json_key");
}

#[test]
fn unchanged_body_is_forwarded_as_it_came() {
    let p = plugin(json!({"default_profile": "c", "profiles": {"c": {"defaults": {"max_tokens": 10}}}}));
    let mut h = host(None);
    let raw = br#"{ "max_tokens" : 5, "messages":[{"content":"x","role":"user"}] }"#;
    run(&p, &mut h, raw);
    assert_eq!(h.req_body, raw.to_vec());
    assert_eq!(metric(&h, "c", "passthrough", "unchanged"), 1);
}

#[test]
fn body_without_messages_gets_fields_only() {
    let p = plugin(json!({"default_profile": "c", "profiles": {"c": {
        "prepend": [{"role": "system", "content": "s"}], "defaults": {"user": "u"}}}}));
    let mut h = host_at("/v1/embeddings", json!({}));
    run(&p, &mut h, br#"{"input":"embed me","model":"e"}"#);
    assert_eq!(parsed(&h), json!({"input": "embed me", "model": "e", "user": "u"}));
    let mut h = host(None);
    run(&p, &mut h, br#"{"messages":[]}"#);
    assert_eq!(parsed(&h), json!({"messages": [{"role": "system", "content": "s"}], "user": "u"}));
}

#[test]
fn not_json_passes_and_is_counted_or_refused_when_deny() {
    let p = seed();
    let bad: &[&[u8]] = &[b"not json", b"\xff\xfe{}", b"[1,2]", b"\"s\"", b"{\"a\":", &b"[".repeat(200)];
    let mut h = host(None);
    for b in bad {
        let mut hh = h.clone();
        let (s1, s2) = run(&p, &mut hh, b);
        assert_eq!((s1, s2), (Act::Pause, Act::Continue), "{b:?}");
        assert_eq!(hh.req_body, b.to_vec(), "unchanged");
        assert!(hh.replies.is_empty());
        h.metric_values = hh.metric_values.clone();
        h.metric_defs = hh.metric_defs.clone();
    }
    assert_eq!(metric(&h, "csv", "passthrough", "not_json"), bad.len() as i64);

    // The content type is not trusted: a JSON body labelled multipart/form-data is buffered
    // and enriched like any other (auth and the guard check it as JSON too).
    let p = seed();
    let mut h = host(None);
    h.req_headers.retain(|(k, _)| k != "content-type");
    h.req_headers.push(("content-type".into(), b"multipart/form-data; boundary=x".to_vec()));
    let (s1, s2) = run(&p, &mut h, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!((s1, s2), (Act::Pause, Act::Continue));
    assert!(String::from_utf8_lossy(&h.req_body).contains(r#""role":"system""#), "enriched");
    assert_eq!(metric(&h, "csv", "passthrough", "not_json"), 0);

    let deny =
        plugin(json!({"default_profile": "c", "failure_mode": "deny", "profiles": {"c": {"caps": {"max_tokens": 1}}}}));
    let mut h = host(None);
    let (_, s) = run(&deny, &mut h, b"nope");
    assert_eq!(s, Act::Pause);
    assert_eq!(h.replies[0].status, 400);
    assert_eq!(error_code(&h), "invalid_json");
    assert_eq!(metric(&h, "c", "refused", "not_json"), 1);
}

#[test]
fn size_cap_declared_and_buffered() {
    let p = seed();
    let mut h = host(None);
    h.req_headers.push(("content-length".into(), b"4096".to_vec()));
    let mut pl = pipeline(&p);
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    // The pipeline drops content-length for a body that may change before it compares the
    // declared size (reported to the lead); the buffered size refuses it at the first chunk.
    if h.replies.is_empty() {
        h.phase = Phase::RequestBody;
        assert_eq!(pl.on_request_body(&mut h, 4096, false), Act::Pause);
    }
    assert_eq!(h.replies[0].status, 413);
    h.phase = Phase::ResponseHeaders;
    h.resp_headers = vec![(":status".into(), b"413".to_vec())];
    pl.on_response_headers(&mut h, true);
    h.phase = Phase::Log;
    pl.on_log(&mut h);
    assert_eq!(metric(&h, "csv", "refused", "too_large"), 1);

    let mut h = host(None);
    h.req_headers.push(("transfer-encoding".into(), b"chunked".to_vec()));
    let mut pl = pipeline(&p);
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    assert_eq!(pl.on_request_body(&mut h, 1000, false), Act::Pause);
    assert!(h.replies.is_empty());
    assert_eq!(pl.on_request_body(&mut h, 3000, false), Act::Pause);
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].status, 413);
    assert_eq!(error_code(&h), "request_too_large");
}

#[test]
fn profile_selection() {
    let p = seed();
    // Unknown route profile: allow -> untouched, no buffering.
    let mut h = host(Some("nope"));
    h.req_headers.push(("content-length".into(), b"10".to_vec()));
    let mut pl = pipeline(&p);
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(h.req_header("content-length").as_deref(), Some("10"));
    assert_eq!(metric(&h, "nope", "passthrough", "unknown_profile"), 1);
    // ... deny -> 500.
    let deny = plugin(json!({"failure_mode": "deny", "profiles": {"c": {"caps": {"a": 1}}}}));
    let mut h = host(Some("nope"));
    assert_eq!(pipeline(&deny).on_request_headers(&mut h, false), Act::Pause);
    assert_eq!(h.replies[0].status, 500);
    // No route profile and no default: untouched.
    let mut h = host(None);
    assert_eq!(pipeline(&deny).on_request_headers(&mut h, false), Act::Continue);
    assert_eq!(metric(&h, "none", "passthrough", "no_profile"), 1);
    // No body.
    let mut h = host(None);
    assert_eq!(pipeline(&p).on_request_headers(&mut h, true), Act::Continue);
    assert_eq!(metric(&h, "csv", "passthrough", "no_body"), 1);
    // A custom metadata key.
    let keyed = plugin(json!({"profile_metadata_key": "prompt", "profiles": {"c": {"defaults": {"user": "u"}}}}));
    let mut h = host_at("/v1/chat/completions", json!({"prompt": "c"}));
    run(&keyed, &mut h, br#"{"messages":[]}"#);
    assert_eq!(parsed(&h)["user"], "u");
}

#[test]
fn an_override_of_the_model_is_published() {
    let p = plugin(json!({"default_profile": "c", "profiles": {"c": {"overrides": {"model": "house-model"}}}}));
    let mut h = host(None);
    run(&p, &mut h, br#"{"model":"m","messages":[]}"#);
    assert_eq!(parsed(&h)["model"], "house-model");
    assert_eq!(h.state(keys::REQUESTED_MODEL).as_deref(), Some("house-model"));
}

#[test]
fn hostile_values_stay_inside_strings() {
    let p = seed();
    let mut h = host(Some("team"));
    identity(&mut h, "u", "\"}],\"model\":\"evil\",\"x\":[{\"a\":\"\u{0}\n");
    run(&p, &mut h, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let got = parsed(&h);
    assert_eq!(got["model"], "m");
    assert!(got["messages"][0]["content"].as_str().unwrap().contains("\"model\":\"evil\""));
    assert_eq!(got.as_object().unwrap().len(), 2);
}

/// Host calls that return a value, for a typical request (csv profile, JSON body) through
/// the pipeline with just this stage. What remains: the request headers (one map read), the
/// route name and, on the first request of a route, its `sluice` metadata (cached per VM),
/// the body (one read). Identity templates add one read of `sluice.identity`; a claim not
/// held in process adds one read of `sluice.claim.<name>` per distinct claim.
#[test]
fn host_call_budget() {
    let p = seed();
    let mut pl = pipeline(&p);
    let mut h = CountingHost::new(host(None));
    let b = body(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    h.inner.req_headers.push(("content-length".into(), b.len().to_string().into_bytes()));
    assert_eq!(pl.on_request_headers(&mut h, false), Act::Pause);
    h.inner.phase = Phase::RequestBody;
    h.inner.req_body = b.clone();
    assert_eq!(pl.on_request_body(&mut h, b.len(), true), Act::Continue);
    assert_eq!(h.count(CallKind::HeaderMap), 1);
    assert_eq!(h.count(CallKind::Body), 1);
    assert!(h.total() <= 4, "first request: {} ({:?})", h.total(), h.property_reads.borrow());

    // The same route again, with identity templates: the route name + sluice.identity.
    let mut pl = Pipeline::new(2, vec![Slot::of(&p)], Rc::new(RefCell::new(RouteCache::default())));
    let mut h = CountingHost::new(host(Some("fields")));
    identity(&mut h.inner, "alice", "dev");
    h.inner.req_headers.push(("content-length".into(), b.len().to_string().into_bytes()));
    pl.on_request_headers(&mut h, false);
    h.inner.phase = Phase::RequestBody;
    h.inner.req_body = b.clone();
    pl.on_request_body(&mut h, b.len(), true);
    assert!(h.total() <= 5, "with identity: {} ({:?})", h.total(), h.property_reads.borrow());
    assert_eq!(serde_json::from_slice::<Value>(&h.inner.req_body).unwrap()["user"], "alice");
}

/// Deterministic pseudo-random bodies (mutations of a valid request): never a panic,
/// always one of the documented outcomes.
#[test]
fn mutated_bodies_never_panic() {
    let p = seed();
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
    for round in 0..2000 {
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
        let path = ["/v1/chat/completions", "/v1/responses", "/v1/messages"][round % 3];
        let mut h = host_at(path, json!({"enrichment_profile": profile}));
        let (_, act) = run(&p, &mut h, &b);
        match h.replies.as_slice() {
            [] => assert_eq!(act, Act::Continue),
            [r] => {
                assert!([400, 413].contains(&r.status), "{}", r.status);
                assert_eq!(act, Act::Pause);
            }
            _ => panic!("two replies"),
        }
        if h.replies.is_empty() && h.req_body != b {
            let v: Value = serde_json::from_slice(&h.req_body).unwrap();
            assert!(shape::check_request(sluice_core::api::Api::from_path(path), &v).is_ok());
        }
    }
}
