//! Property tests (issue 14 §1): arbitrary UTF-8 and arbitrary bytes in every key part
//! (user / team / `header:` headers, the identity auth publishes, the API key, the model in
//! the body), in the request body, in the response body and stream, in the RLS answer and in
//! what shared data holds. Nothing panics (a panic traps the VM in Envoy), every request
//! ends in a decision (continue, or a reply that is never a 5xx here), and every key value
//! stays within its byte cap on a char boundary. A deterministic xorshift PRNG keeps failures
//! reproducible (the seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../core/tests/common/mod.rs"]
mod common;
use common::Rng;

use serde_json::json;
use sluice_core::exchange::{Exchange, Identity};
use sluice_core::host::{FakeHost, Host, Phase};
use sluice_core::keys;
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use sluice_core::stage::Plugin;
use sluice_token_ratelimit::budget::{bucket_count, bucket_name, decode_bucket, Store};
use sluice_token_ratelimit::config::{Config, KeyPart, Rule};
use sluice_token_ratelimit::limiter::{key_values, MAX_VALUE_BYTES};
use sluice_token_ratelimit::rls;
use sluice_token_ratelimit::stage::RateLimitPlugin;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

const PIECES: &[&str] =
    &["a", "é", "日本", "😀", "\u{0}", "\t", "|", ":", "=", "#", "\u{feff}", "\u{10ffff}", " ", "%", "\\", "\""];

/// Arbitrary UTF-8, often long and often ending near the 256-byte cut.
fn text(rng: &mut Rng) -> String {
    let mut s = String::new();
    let target = match rng.below(4) {
        0 => rng.below(8),
        1 => 250 + rng.below(12),
        2 => rng.below(600),
        _ => 255,
    };
    while s.len() < target {
        let piece: &&str = rng.pick(PIECES);
        s.push_str(piece);
    }
    if rng.below(3) == 0 {
        s = format!("{}{}", "a".repeat(255), *rng.pick(PIECES));
    }
    s
}

/// Arbitrary bytes (not always UTF-8).
fn bytes(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(400);
    (0..n).map(|_| rng.next() as u8).collect()
}

fn value(rng: &mut Rng) -> Vec<u8> {
    if rng.below(2) == 0 {
        text(rng).into_bytes()
    } else {
        bytes(rng)
    }
}

const CFG: &str = r#"{
    "user_header": "x-user", "team_header": "x-team", "default_rule_set": "s", "max_counters": 64,
    "rule_sets": {"s": [
      {"name": "all", "key": ["user", "team", "api_key", "route", "model", "header:x-tenant"], "count": "total_tokens",
       "windows": [{"window": "minute", "limit": 1000000}, {"window": "hour", "limit": 100000000}]},
      {"name": "reqs", "key": ["user"], "count": "requests", "windows": [{"window": "10s", "limit": 1000000}]}]}
}"#;

fn header_pairs(rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let mut h: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"POST".to_vec()),
        (
            ":path".into(),
            rng.pick(&["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/x"])
                .as_bytes()
                .to_vec(),
        ),
    ];
    for name in ["x-user", "x-team", "x-tenant", "authorization", "x-api-key"] {
        if rng.below(4) != 0 {
            let mut v = value(rng);
            if name == "authorization" && rng.below(2) == 0 {
                let mut b = b"Bearer ".to_vec();
                b.append(&mut v);
                v = b;
            }
            h.push((name.into(), v));
        }
    }
    h
}

fn request_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => bytes(rng),
        1 => Vec::new(),
        2 => text(rng).into_bytes(),
        _ => {
            let mut v = json!({"model": text(rng), "messages": [{"role": "user", "content": text(rng)}]});
            if rng.below(2) == 0 {
                v["max_tokens"] = json!(rng.next() >> rng.below(64));
            }
            if rng.below(2) == 0 {
                v["stream"] = json!(true);
            }
            serde_json::to_vec(&v).unwrap()
        }
    }
}

fn response_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => bytes(rng),
        1 => {
            let mut s = String::new();
            for _ in 0..rng.below(6) {
                s.push_str(&format!("data: {}\n\n", json!({"choices": [{"delta": {"content": text(rng)}}]})));
            }
            if rng.below(2) == 0 {
                s.push_str(&format!(
                    "data: {}\n\n",
                    json!({"choices": [], "usage": {"prompt_tokens": rng.next() >> 40, "completion_tokens": rng.next() >> 40}})
                ));
            }
            s.into_bytes()
        }
        2 => json!({"choices": [{"message": {"content": text(rng)}}], "usage": {"prompt_tokens": rng.next(), "completion_tokens": rng.next()}})
            .to_string()
            .into_bytes(),
        _ => text(rng).into_bytes(),
    }
}

/// One request through the pipeline, end to end, with arbitrary input everywhere.
fn run_one(rng: &mut Rng, plugin: &RateLimitPlugin, world: &mut FakeHost) {
    let mut h = FakeHost {
        shared: world.shared.clone(),
        shared_version: world.shared_version,
        time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(rng.next() >> 24)),
        ..FakeHost::default()
    };
    h.req_headers = header_pairs(rng);
    h.set_prop(&["xds", "route_name"], &text(rng));
    if rng.below(3) == 0 {
        let id = Identity {
            method: "jwt".into(),
            user: (rng.below(3) != 0).then(|| text(rng)),
            team: (rng.below(2) == 0).then(|| text(rng)),
            key_id: (rng.below(2) == 0).then(|| text(rng)),
            claims: None,
        };
        h.set_prop(&[keys::IDENTITY], &id.encode());
    } else if rng.below(4) == 0 {
        h.properties.insert(keys::IDENTITY.into(), bytes(rng));
    }
    let mut p = Pipeline::new(1, vec![Slot::of(plugin)], Rc::new(RefCell::new(RouteCache::default())));
    let b = request_body(rng);
    h.phase = Phase::RequestHeaders;
    let first = p.on_request_headers(&mut h, b.is_empty());
    let act = if b.is_empty() {
        first
    } else {
        h.phase = Phase::RequestBody;
        h.req_body = b.clone();
        if rng.below(3) == 0 {
            let n = b.len();
            p.on_request_body(&mut h, n, false);
            p.on_request_trailers(&mut h)
        } else {
            p.on_request_body(&mut h, b.len(), true)
        }
    };
    match act {
        Act::Continue => assert!(h.replies.is_empty()),
        Act::Pause => {
            let r = h.replies.first().expect("a paused request has a reply (local mode never waits)");
            let cap = r.status == 503 && String::from_utf8_lossy(&r.body).contains("too_many_counters");
            assert!(
                matches!(r.status, 400 | 413 | 429) || cap,
                "status {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    if act == Act::Continue {
        let out = response_body(rng);
        h.phase = Phase::ResponseHeaders;
        let ct = rng.pick(&["application/json", "text/event-stream", "text/plain", ""]);
        h.resp_headers = vec![(":status".into(), rng.pick(&["200", "200", "429", "503", "x"]).as_bytes().to_vec())];
        if !ct.is_empty() {
            h.resp_headers.push(("content-type".into(), ct.as_bytes().to_vec()));
        }
        p.on_response_headers(&mut h, false);
        h.phase = Phase::ResponseBody;
        let cut = if out.is_empty() { 0 } else { rng.below(out.len() + 1) };
        h.resp_body = out[..cut].to_vec();
        p.on_response_body(&mut h, cut, false);
        let finish = rng.below(3) != 0;
        if finish {
            h.resp_body = out[cut..].to_vec();
            p.on_response_body(&mut h, out.len() - cut, true);
        }
    }
    h.phase = Phase::Log;
    p.on_log(&mut h);
    world.shared = h.shared;
    world.shared_version = h.shared_version;
}

#[test]
fn arbitrary_requests_never_panic_and_always_decide() {
    let seed = 0x5eed_0014;
    println!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let plugin = RateLimitPlugin::new(Config::from_json(CFG.as_bytes()).unwrap());
    let mut world = FakeHost::default();
    for _ in 0..3000 {
        run_one(&mut rng, &plugin, &mut world);
    }
    // Whatever the clients sent, the counters stay within the cap's memory.
    let buckets = world.shared.keys().filter(|k| k.starts_with("sluice-trl|b|")).count();
    assert!(buckets <= bucket_count(64), "{buckets}");
    for (k, (v, _)) in &world.shared {
        if k.starts_with("sluice-trl|b|") {
            assert!(!v.is_empty(), "never an empty value: {k}");
            for (id, _) in decode_bucket(Some(v)) {
                assert!(id.len() <= 200, "{id}");
                assert!(!id.contains('\n') && !id.contains('\t'));
            }
        }
    }
}

#[test]
fn key_values_stay_within_their_cap_on_char_boundaries() {
    let mut rng = Rng::new(0x14_0001);
    let cfg = Config::from_json(CFG.as_bytes()).unwrap();
    let rule: &Rule = &cfg.rule_set("s").unwrap()[0];
    assert!(rule.key.contains(&KeyPart::Model));
    for _ in 0..3000 {
        let mut h = FakeHost::default();
        if rng.below(2) == 0 {
            let id = Identity {
                method: "jwt".into(),
                user: Some(text(&mut rng)),
                team: Some(text(&mut rng)),
                key_id: Some(text(&mut rng)),
                claims: None,
            };
            h.set_prop(&[keys::IDENTITY], &id.encode());
        }
        let mut x = Exchange::new(1);
        x.request.headers = header_pairs(&mut rng);
        x.request.body = Some(request_body(&mut rng));
        let values = key_values(&cfg, rule, &mut x, &h);
        assert_eq!(values.len(), rule.key.len());
        for v in values {
            assert!(v.len() <= MAX_VALUE_BYTES, "{} bytes", v.len());
            assert!(!v.is_empty());
        }
    }
}

#[test]
fn arbitrary_rls_answers_and_shared_data_never_panic() {
    let mut rng = Rng::new(0x14_0002);
    for _ in 0..20_000 {
        let b = bytes(&mut rng);
        let _ = rls::decode_response(&b);
        let _ = rls::decode_request(&b);
        let _ = decode_bucket(Some(&b));
    }
    // Garbage in a bucket is read as no counters and overwritten by the next reservation.
    let cfg = Config::from_json(CFG.as_bytes()).unwrap();
    let rule = &cfg.rule_set("s").unwrap()[0];
    for _ in 0..500 {
        let mut h = FakeHost::default();
        for i in 0..bucket_count(64) {
            if rng.below(2) == 0 {
                h.set_shared_data(&bucket_name(i), &value(&mut rng), None).unwrap();
            }
        }
        if rng.below(2) == 0 {
            h.set_shared_data(sluice_token_ratelimit::budget::LIVE_KEY, &value(&mut rng), None).unwrap();
        }
        let key = sluice_token_ratelimit::budget::counter_key("s", "all", &[text(&mut rng)], bucket_count(64));
        let mut s = Store::new(&mut h, 10, 64);
        let _ = s.reserve(&key, &rule.windows, rng.next() >> 32, rng.next() >> 20, rng.below(2) == 0);
        let _ = s.sweep(rng.below(100), 100, rng.next() >> 20);
    }
}

#[test]
fn arbitrary_rls_answers_through_the_stage() {
    let mut rng = Rng::new(0x14_0003);
    let plugin = RateLimitPlugin::new(
        Config::from_json(
            br#"{"mode": "rls", "rls": {"cluster": "rls"}, "user_header": "x-user", "default_rule_set": "s",
                "rule_sets": {"s": [{"name": "r", "key": ["user", "model"], "count": "total_tokens", "windows": [{"window": "minute", "limit": 100}]}]}}"#,
        )
        .unwrap(),
    );
    let mut root = FakeHost { phase: Phase::Root, ..FakeHost::default() };
    plugin.on_start(&mut root);
    for _ in 0..2000 {
        let mut h = FakeHost { queues: root.queues.clone(), ..FakeHost::default() };
        h.req_headers = header_pairs(&mut rng);
        let mut p = Pipeline::new(1, vec![Slot::of(&plugin)], Rc::new(RefCell::new(RouteCache::default())));
        let b = request_body(&mut rng);
        let first = p.on_request_headers(&mut h, b.is_empty());
        let act = if b.is_empty() {
            first
        } else {
            h.req_body = b.clone();
            p.on_request_body(&mut h, b.len(), true)
        };
        if act == Act::Pause && h.replies.is_empty() {
            // waiting for the RLS: answer with anything
            h.phase = Phase::Callout;
            h.call_resp_body = bytes(&mut rng);
            let status = *rng.pick(&[0u32, 0, 0, 2, 4, 14]);
            let n = h.call_resp_body.len();
            let token = u32::try_from(h.calls.len()).unwrap();
            p.on_callout(&mut h, token, Some(status), n);
            assert!(h.resumed_requests == 1 || h.replies.len() == 1, "decided after the answer");
        }
        h.phase = Phase::Log;
        p.on_log(&mut h);
    }
}
