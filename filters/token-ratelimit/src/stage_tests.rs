//! token-ratelimit through the core pipeline on the fake host (which behaves like Envoy:
//! empty shared data reads as `(None, Some(cas))`, response headers only in their phase).

use crate::budget::{bucket_count, counter_key, sha256_hex32, Store};
use crate::config::Config;
use crate::rls::{self, decode_request};
use crate::stage::{RateLimitPlugin, QUEUE};
use serde_json::{json, Value};
use sluice_core::encoding::test_encode_metadata;
use sluice_core::exchange::Identity;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Host, Phase};
use sluice_core::keys;
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use sluice_core::stage::Plugin;
use sluice_core::usage::TokenUsage;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

const CFG: &str = r#"{
    "user_header": "x-user",
    "default_output_tokens": 10,
    "default_rule_set": "tiered",
    "rule_sets": {
      "tiered": [{"name": "per-user", "key": ["user"], "count": "total_tokens",
        "windows": [{"window": "minute", "limit": 150}, {"window": "hour", "limit": 300}]}],
      "input": [{"name": "input", "key": ["user"], "count": "input_tokens", "windows": [{"window": "hour", "limit": 70}]}]
    }
}"#;

const RLS_CFG: &str = r#"{
    "mode": "rls", "rls": {"cluster": "rls", "domain": "d"},
    "user_header": "x-user", "default_rule_set": "s",
    "rule_sets": {"s": [{"name": "r", "key": ["user"], "count": "total_tokens", "windows": [{"window": "minute", "limit": 100}]}]}
}"#;

fn plugin(json: &str) -> RateLimitPlugin {
    RateLimitPlugin::new(Config::from_json(json.as_bytes()).unwrap())
}

/// 40 bytes of prompt = 10 tokens.
fn body(max_tokens: Option<u64>, stream: bool) -> Vec<u8> {
    let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(40)}]});
    if let Some(m) = max_tokens {
        v["max_tokens"] = m.into();
    }
    if stream {
        v["stream"] = true.into();
    }
    serde_json::to_vec(&v).unwrap()
}

/// What Envoy keeps across requests: shared data, metrics, queues, the clock.
struct World {
    base: FakeHost,
    plugin: RateLimitPlugin,
}

/// One request in flight.
struct Req {
    p: Pipeline,
    h: FakeHost,
    act: Act,
}

impl World {
    fn new(json: &str) -> Self {
        let plugin = plugin(json);
        let mut base = FakeHost { time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10)), ..FakeHost::default() };
        base.phase = Phase::Root;
        plugin.on_start(&mut base);
        Self { base, plugin }
    }

    fn at(&mut self, secs: u64) {
        self.base.time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    }

    /// A host for a new stream: this world's shared state, these request headers.
    fn host(&self, path: &str, headers: &[(&str, &str)]) -> FakeHost {
        let mut h = FakeHost {
            shared: self.base.shared.clone(),
            shared_version: self.base.shared_version,
            metric_defs: self.base.metric_defs.clone(),
            metric_values: self.base.metric_values.clone(),
            queues: self.base.queues.clone(),
            time: self.base.time,
            ..FakeHost::default()
        };
        let method = if path.ends_with("/models") { "GET" } else { "POST" };
        let mut all = vec![(":method", method), (":path", path), ("content-type", "application/json")];
        all.extend_from_slice(headers);
        h.req_headers = all.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        h.set_prop(&["xds", "route_name"], "chat");
        h
    }

    fn save(&mut self, h: &FakeHost) {
        self.base.shared = h.shared.clone();
        self.base.shared_version = h.shared_version;
        self.base.metric_defs = h.metric_defs.clone();
        self.base.metric_values = h.metric_values.clone();
        self.base.queues = h.queues.clone();
    }

    /// Headers then the whole body (end of stream).
    fn send(&mut self, mut h: FakeHost, b: &[u8]) -> Req {
        let mut p = Pipeline::new(1, vec![Slot::of(&self.plugin)], Rc::new(RefCell::new(RouteCache::default())));
        h.phase = Phase::RequestHeaders;
        let first = p.on_request_headers(&mut h, b.is_empty());
        let act = if b.is_empty() {
            first
        } else {
            assert_eq!(first, Act::Pause, "headers are held for the decision");
            h.phase = Phase::RequestBody;
            h.req_body = b.to_vec();
            p.on_request_body(&mut h, b.len(), true)
        };
        self.save(&h);
        Req { p, h, act }
    }

    fn ask(&mut self, user: &str, b: &[u8]) -> Req {
        let h = self.host("/v1/chat/completions", &[("x-user", user)]);
        self.send(h, b)
    }

    /// The response: headers, then each chunk; the last one ends the stream; then the log.
    fn respond(&mut self, r: &mut Req, status: &str, content_type: &str, chunks: &[&[u8]]) {
        r.h.shared = self.base.shared.clone();
        r.h.shared_version = self.base.shared_version;
        r.h.phase = Phase::ResponseHeaders;
        r.h.resp_headers = vec![
            (":status".into(), status.as_bytes().to_vec()),
            ("content-type".into(), content_type.as_bytes().to_vec()),
        ];
        r.p.on_response_headers(&mut r.h, chunks.is_empty());
        r.h.phase = Phase::ResponseBody;
        for (i, c) in chunks.iter().enumerate() {
            r.h.resp_body = c.to_vec();
            r.p.on_response_body(&mut r.h, c.len(), i + 1 == chunks.len());
        }
        r.h.phase = Phase::Log;
        r.p.on_log(&mut r.h);
        self.save(&r.h);
    }

    fn json(&mut self, r: &mut Req, status: &str, body: &str) {
        self.respond(r, status, "application/json", &[body.as_bytes()]);
    }

    /// Counts of `user`'s counter of rule set `set` (first rule) now.
    fn used(&mut self, set: &str, user: &str) -> Vec<u64> {
        let c = Config::from_json(CFG.as_bytes()).unwrap();
        let rule = &c.rule_set(set).unwrap()[0];
        let key = counter_key(set, &rule.name, &[user.to_string()], bucket_count(c.max_counters));
        let now = self.base.now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
        Store::new(&mut self.base, 10, c.max_counters).peek(&key, &rule.windows, now)
    }

    fn metric(&self, name: &str) -> i64 {
        self.base.metric(name).unwrap_or(0)
    }
}

fn sse(contents: &[&str], usage: Option<(u64, u64)>) -> Vec<u8> {
    let mut s = String::new();
    for c in contents {
        s.push_str(&format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": c}}]})));
    }
    if let Some((p, c)) = usage {
        s.push_str(&format!(
            "data: {}\n\n",
            json!({"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
        ));
    }
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

const USAGE_30: &str = r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
const SETTLED: &str = "sluice_ratelimit_settled.sluice_action=.=";

#[test]
fn reservation_replaced_by_real_usage() {
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(w.used("tiered", "alice"), vec![60, 60]);
    w.json(&mut r, "200", USAGE_30);
    assert_eq!(w.used("tiered", "alice"), vec![30, 30]);
    assert_eq!(r.h.resp_header("x-ratelimit-limit-tokens").as_deref(), Some("150"));
    assert_eq!(r.h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("90"));
    assert_eq!(r.h.resp_header("x-ratelimit-reset-tokens").as_deref(), Some("50s"));
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("ok"));
    assert_eq!(w.metric(&format!("{SETTLED}reconciled;.;")), 1);
    assert_eq!(w.metric("sluice_ratelimit_requests.sluice_action=.=allow;.;"), 1);
    assert_eq!(w.metric("sluice_ratelimit_counters"), 1);
    assert!(r.h.refused.is_empty(), "{:?}", r.h.refused);
}

#[test]
fn refuses_when_reservation_does_not_fit_and_other_users_pass() {
    let mut w = World::new(CFG);
    for _ in 0..5 {
        let mut r = w.ask("alice", &body(Some(20), false));
        assert_eq!(r.act, Act::Continue);
        w.json(&mut r, "200", USAGE_30);
    }
    let r = w.ask("alice", &body(Some(20), false));
    assert_eq!(r.act, Act::Pause);
    let reply = &r.h.replies[0];
    assert_eq!(reply.status, 429);
    let v: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "tokens");
    let text = v["error"]["message"].as_str().unwrap();
    assert!(text.contains("per minute window") && text.contains("150 used, this request needs 30"), "{text}");
    assert!(reply.headers.contains(&("x-envoy-ratelimited".into(), "true".into())));
    assert!(reply.headers.contains(&("retry-after".into(), "50".into())));
    assert!(reply.headers.contains(&("x-ratelimit-remaining-tokens".into(), "0".into())));
    assert!(reply.headers.contains(&("x-sluice-ratelimit-window".into(), "per-user/minute".into())));
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("refused:per-user/minute"));
    assert_eq!(w.used("tiered", "alice"), vec![150, 150], "the refused request added nothing");
    assert_eq!(w.ask("bob", &body(Some(20), false)).act, Act::Continue);
    // next minute: 150 more fit, then the hour refuses
    w.at(70);
    for _ in 0..5 {
        let mut r = w.ask("alice", &body(Some(20), false));
        assert_eq!(r.act, Act::Continue);
        w.json(&mut r, "200", USAGE_30);
    }
    w.at(130);
    let r = w.ask("alice", &body(Some(20), false));
    assert_eq!(r.h.replies[0].status, 429);
    assert!(String::from_utf8_lossy(&r.h.replies[0].body).contains("per hour window"));
    assert_eq!(w.metric("sluice_ratelimit_requests.sluice_action=.=deny;.;"), 2);
}

#[test]
fn failed_upstream_releases_and_so_does_a_reset_before_any_output() {
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    w.json(&mut r, "503", r#"{"error":{}}"#);
    assert_eq!(w.used("tiered", "alice"), vec![0, 0]);
    // reset: 200 headers, no byte of body, then the log
    let mut r = w.ask("alice", &body(Some(50), true));
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers =
        vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::Log;
    r.p.on_log(&mut r.h);
    w.save(&r.h);
    assert_eq!(w.used("tiered", "alice"), vec![0, 0]);
    assert_eq!(w.metric(&format!("{SETTLED}released;.;")), 2);
}

#[test]
fn a_stream_aborted_after_output_is_charged_not_released() {
    // Issue 14 §2: the client reads the answer and resets before the end: it pays for what
    // it read (estimate from the streamed text: 400 bytes = 100 tokens + 10 input).
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(140), true));
    assert_eq!(w.used("tiered", "alice"), vec![150, 150]);
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers =
        vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    let part = sse(&[&"a".repeat(200), &"b".repeat(200)], None);
    let cut = part.len() - "data: [DONE]\n\n".len();
    r.h.resp_body = part[..cut].to_vec();
    r.p.on_response_body(&mut r.h, cut, false);
    r.h.phase = Phase::Log;
    r.p.on_log(&mut r.h);
    w.save(&r.h);
    assert_eq!(w.used("tiered", "alice"), vec![110, 110]);
    assert_eq!(w.metric(&format!("{SETTLED}estimated;.;")), 1);

    // With the provider's usage seen before the reset, that is the charge.
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(140), true));
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers =
        vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    let all = sse(&["hi"], Some((10, 35)));
    let cut = all.len() - "data: [DONE]\n\n".len();
    r.h.resp_body = all[..cut].to_vec();
    r.p.on_response_body(&mut r.h, cut, false);
    r.h.phase = Phase::Log;
    r.p.on_log(&mut r.h);
    w.save(&r.h);
    assert_eq!(w.used("tiered", "alice"), vec![45, 45]);
    assert_eq!(w.metric(&format!("{SETTLED}reconciled;.;")), 1);
}

#[test]
fn stream_usage_chunk_replaces_reservation_exactly_across_split_events() {
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(100), true));
    assert_eq!(w.used("tiered", "alice"), vec![110, 110]);
    let stream = sse(&["a b"], Some((10, 7)));
    let (a, b) = stream.split_at(30);
    w.respond(&mut r, "200", "text/event-stream", &[a, b, b""]);
    assert_eq!(w.used("tiered", "alice"), vec![17, 17]);
}

#[test]
fn a_stream_without_usage_is_charged_its_text_not_the_reservation() {
    // Issue 14 §3: no max_tokens, no usage: 8000 bytes streamed = 2000 output tokens.
    let cfg = CFG.replace(
        r#"{"window": "minute", "limit": 150}, {"window": "hour", "limit": 300}"#,
        r#"{"window": "hour", "limit": 100000}"#,
    );
    let mut w = World::new(&cfg);
    let mut r = w.ask("alice", &body(None, true));
    let words: Vec<String> = (0..100).map(|_| "w".repeat(80)).collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    w.respond(&mut r, "200", "text/event-stream", &[&sse(&refs, None)]);
    let c = Config::from_json(cfg.as_bytes()).unwrap();
    let rule = &c.rule_set("tiered").unwrap()[0];
    let key = counter_key("tiered", &rule.name, &["alice".into()], bucket_count(c.max_counters));
    let used = Store::new(&mut w.base, 10, c.max_counters).peek(&key, &rule.windows, 10_000);
    assert_eq!(used, vec![10 + 2000]);
}

#[test]
fn json_without_usage_is_charged_its_text() {
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(None, false));
    w.json(
        &mut r,
        "200",
        &json!({"choices": [{"message": {"role": "assistant", "content": "x".repeat(80)}}]}).to_string(),
    );
    // 10 input + 20 output (80 bytes): the reservation (10 + 10) was low.
    assert_eq!(w.used("tiered", "alice"), vec![30, 30]);
}

#[test]
fn usage_published_by_another_filter_settles_a_stream_it_stripped() {
    // usage-metrics after this filter removes the usage chunk it asked for, and publishes the
    // usage first (`sluice.usage`, written by its pipeline): this filter settles on it.
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(100), true));
    keys::set_filter_state(&mut r.h, keys::USAGE, &TokenUsage::reported(10, 25).encode());
    w.respond(&mut r, "200", "text/event-stream", &[&sse(&["abc"], None)]);
    assert_eq!(w.used("tiered", "alice"), vec![35, 35]);
    assert_eq!(w.metric(&format!("{SETTLED}reconciled;.;")), 1);
}

#[test]
fn encoded_answers_keep_the_reservation() {
    let mut w = World::new(CFG);
    let h = w.host("/v1/chat/completions", &[("x-user", "alice"), ("accept-encoding", "gzip, br")]);
    let mut r = w.send(h, &body(Some(50), false));
    assert!(r.h.req_header("accept-encoding").is_none(), "identity encoding is asked for");
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-encoding".into(), b"gzip".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    r.h.resp_body = b"\x1f\x8b garbage".to_vec();
    r.p.on_response_body(&mut r.h, 11, true);
    r.p.on_log(&mut r.h);
    w.save(&r.h);
    assert_eq!(w.used("tiered", "alice"), vec![60, 60]);
    assert_eq!(w.metric(&format!("{SETTLED}reservation;.;")), 1);
}

#[test]
fn input_token_limit_per_route_metadata() {
    let mut w = World::new(CFG);
    let mut admitted = 0;
    for _ in 0..10 {
        let mut h = w.host("/v1/chat/completions", &[("x-user", "alice")]);
        h.properties
            .insert("xds/route_metadata".into(), test_encode_metadata("sluice", &json!({"ratelimit": "input"})));
        let r = w.send(h, &body(Some(1000), false));
        if r.act == Act::Continue {
            admitted += 1;
        }
    }
    // 70 input tokens per hour, 10 per request: the output cap of 1000 is not counted
    assert_eq!(admitted, 7);
}

#[test]
fn unknown_rule_set_is_a_500_and_none_disables() {
    let mut w = World::new(CFG);
    let mut h = w.host("/v1/chat/completions", &[]);
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &json!({"ratelimit": "nope"})));
    let r = w.send(h, &body(None, false));
    assert_eq!(r.h.replies[0].status, 500);
    assert!(String::from_utf8_lossy(&r.h.replies[0].body).contains("gateway_misconfigured"));
    let mut h = w.host("/v1/chat/completions", &[]);
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &json!({"ratelimit": "none"})));
    let mut p = Pipeline::new(1, vec![Slot::of(&w.plugin)], Rc::new(RefCell::new(RouteCache::default())));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Continue, "not limited: nothing held");
}

#[test]
fn shadow_counts_but_admits() {
    let mut w = World::new(&CFG.replace("\"user_header\"", "\"shadow\": true, \"user_header\""));
    for _ in 0..4 {
        let r = w.ask("alice", &body(Some(50), false));
        assert_eq!(r.act, Act::Continue);
        assert!(r.h.replies.is_empty());
    }
    let r = w.ask("alice", &body(Some(50), false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("shadow:per-user/minute"));
    assert_eq!(w.metric("sluice_ratelimit_requests.sluice_action=.=shadow;.;"), 3);
    assert_eq!(w.used("tiered", "alice"), vec![300, 300], "shadow mode counts what it admits");
}

#[test]
fn hostile_bodies_do_not_panic_and_big_ones_get_413() {
    let mut w = World::new(CFG);
    for b in
        [&b"\xff\xfe"[..], b"{", b"[[[[[[[[", b"{\"messages\": 3}", b"{\"max_tokens\": -1}", b"{\"max_tokens\": 1e99}"]
    {
        let r = w.ask("x", b);
        assert_eq!(r.act, Act::Continue, "{:?}", String::from_utf8_lossy(b));
    }
    let mut w = World::new(&CFG.replace("\"user_header\"", "\"max_body_bytes\": 10, \"user_header\""));
    let r = w.ask("x", &body(None, false));
    assert_eq!(r.h.replies[0].status, 413);
    assert!(String::from_utf8_lossy(&r.h.replies[0].body)
        .contains("token-ratelimit: request body exceeds the gateway limit of 10 bytes"));
}

#[test]
fn request_trailers_end_the_body_like_end_of_stream() {
    let mut w = World::new(CFG);
    let mut h = w.host("/v1/chat/completions", &[("x-user", "t")]);
    let mut p = Pipeline::new(1, vec![Slot::of(&w.plugin)], Rc::new(RefCell::new(RouteCache::default())));
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.phase = Phase::RequestBody;
    h.req_body = body(Some(50), false);
    let n = h.req_body.len();
    assert_eq!(p.on_request_body(&mut h, n, false), Act::Pause);
    assert_eq!(p.on_request_trailers(&mut h), Act::Continue);
    w.save(&h);
    assert_eq!(w.used("tiered", "t"), vec![60, 60]);
}

fn identity(h: &mut FakeHost, user: Option<&str>, team: Option<&str>, key_id: Option<&str>) {
    let id = Identity {
        method: if key_id.is_some() { "api_key" } else { "jwt" }.into(),
        user: user.map(str::to_string),
        team: team.map(str::to_string),
        key_id: key_id.map(str::to_string),
        claims: None,
    };
    h.set_prop(&[keys::IDENTITY], &id.encode());
}

const COMBO: &str = r#"{"team_header": "x-team", "user_header": "x-user", "default_rule_set": "s", "rule_sets": {"s": [
    {"name": "combo", "key": ["user", "team", "route", "model", "header:x-tenant", "api_key"],
     "count": "requests", "windows": [{"window": "minute", "limit": 1}]}]}}"#;

fn sent_values(w: &World, r: &Req) -> Vec<String> {
    // The counter the request charged is the one whose line exists in shared data.
    let _ = w;
    let entries: Vec<String> =
        r.h.shared
            .iter()
            .filter(|(k, _)| k.starts_with("sluice-trl|b|"))
            .flat_map(|(_, (v, _))| crate::budget::decode_bucket(Some(v)).into_iter().map(|(id, _)| id))
            .collect();
    entries
}

#[test]
fn combined_keys_from_identity_headers_route_model_and_api_key() {
    let mut w = World::new(COMBO);
    let mut h = w.host(
        "/v1/chat/completions",
        &[("x-team", "ignored-behind-auth"), ("x-tenant", "t1"), ("authorization", "Bearer sk-secret")],
    );
    identity(&mut h, Some("alice"), Some("dev"), Some("k0123"));
    let mut r = w.send(h, &body(Some(5), false));
    assert_eq!(r.act, Act::Continue);
    let ids = sent_values(&w, &r);
    let want = counter_key(
        "s",
        "combo",
        &["alice".into(), "dev".into(), "chat".into(), "m".into(), "t1".into(), "k0123".into()],
        bucket_count(100_000),
    );
    assert_eq!(ids, vec![want.id.clone()]);
    assert!(!want.id.contains("secret"));
    w.json(&mut r, "200", USAGE_30);
    assert_eq!(r.h.resp_header("x-ratelimit-limit-requests").as_deref(), Some("1"));
    assert_eq!(r.h.resp_header("x-ratelimit-remaining-requests").as_deref(), Some("0"));
    // the same combination is refused; another tenant passes
    let mut h = w.host("/v1/chat/completions", &[("x-tenant", "t1")]);
    identity(&mut h, Some("alice"), Some("dev"), Some("k0123"));
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(r.h.replies[0].status, 429);
    assert!(String::from_utf8_lossy(&r.h.replies[0].body).contains("\"type\":\"requests\""));
    let mut h = w.host("/v1/chat/completions", &[("x-tenant", "t2")]);
    identity(&mut h, Some("alice"), Some("dev"), Some("k0123"));
    assert_eq!(w.send(h, &body(Some(5), false)).act, Act::Continue);
}

#[test]
fn a_client_header_never_stands_in_for_an_authenticated_identity() {
    // Issue 14 §6: a verified JWT without a team claim is `_none`, whatever x-team says.
    let cfg = r#"{"team_header": "x-team", "user_header": "x-user", "default_rule_set": "s", "rule_sets": {"s": [
        {"name": "team", "key": ["team", "user"], "count": "requests", "windows": [{"window": "minute", "limit": 1}]}]}}"#;
    let mut w = World::new(cfg);
    for (i, team) in ["a", "b"].iter().enumerate() {
        let mut h = w.host("/v1/chat/completions", &[("x-team", team), ("x-user", "mallory")]);
        identity(&mut h, Some("alice"), None, None);
        let r = w.send(h, &body(Some(5), false));
        assert_eq!(r.act == Act::Continue, i == 0, "second request shares alice's `_none` team bucket");
    }
    let want = counter_key("s", "team", &["_none".into(), "alice".into()], bucket_count(100_000));
    let r = w.ask("x", &body(Some(5), false));
    let ids = sent_values(&w, &r);
    assert!(ids.contains(&want.id), "{ids:?}");
    // Without any identity the configured headers are the (documented, unauthenticated) source.
    let want = counter_key("s", "team", &["x".into(), "bob".into()], bucket_count(100_000));
    let h = w.host("/v1/chat/completions", &[("x-team", "x"), ("x-user", "bob")]);
    let r = w.send(h, &body(Some(5), false));
    assert!(sent_values(&w, &r).contains(&want.id));
    // And without a configured header, nothing is read from the client.
    let cfg = r#"{"default_rule_set": "s", "rule_sets": {"s": [
        {"name": "u", "key": ["user"], "count": "requests", "windows": [{"window": "minute", "limit": 5}]}]}}"#;
    let mut w = World::new(cfg);
    let r = w.ask("bob", &body(Some(5), false));
    assert_eq!(sent_values(&w, &r), vec![counter_key("s", "u", &["_none".into()], bucket_count(100_000)).id]);
}

#[test]
fn api_key_part_uses_the_key_id_or_sha256_of_the_presented_key() {
    let cfg = r#"{"default_rule_set": "s", "rule_sets": {"s": [
        {"name": "k", "key": ["api_key"], "count": "requests", "windows": [{"window": "minute", "limit": 5}]}]}}"#;
    let mut w = World::new(cfg);
    let buckets = bucket_count(100_000);
    let h = w.host("/v1/chat/completions", &[("authorization", "Bearer sk-one")]);
    let r = w.send(h, &body(Some(5), false));
    let id = sha256_hex32(b"sk-one");
    assert_eq!(id.len(), 32);
    assert_eq!(sent_values(&w, &r), vec![counter_key("s", "k", std::slice::from_ref(&id), buckets).id]);
    let h = w.host("/v1/chat/completions", &[("x-api-key", "sk-one")]);
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(sent_values(&w, &r).len(), 1, "x-api-key and bearer of the same key share a bucket");
    // Behind auth (which removed the key): the published key id.
    let mut h = w.host("/v1/chat/completions", &[]);
    identity(&mut h, Some("svc"), None, Some(&id));
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(sent_values(&w, &r).len(), 1, "the same bucket as the key itself: auth publishes the same id");
    let mut h = w.host("/v1/chat/completions", &[]);
    identity(&mut h, Some("svc2"), None, Some("another"));
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(sent_values(&w, &r).len(), 2);
}

#[test]
fn key_values_are_cut_on_char_boundaries() {
    // Issue 14 §1: 255 × 'a' + 'é' made `String::truncate(256)` panic (the VM trapped).
    let mut w = World::new(CFG);
    let user = format!("{}é", "a".repeat(255));
    let h = w.host("/v1/chat/completions", &[("x-user", &user)]);
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(r.act, Act::Continue);
    let r2 = w.ask("bob", &body(Some(5), false));
    assert_eq!(r2.act, Act::Continue);
    let mut long = "é".repeat(300);
    long.push('x');
    let h = w.host("/v1/chat/completions", &[("x-user", &long)]);
    assert_eq!(w.send(h, &body(Some(5), false)).act, Act::Continue);
}

#[test]
fn request_without_body_reserves_no_tokens() {
    let mut w = World::new(CFG);
    let h = w.host("/v1/models", &[("x-user", "zed")]);
    let mut r = w.send(h, b"");
    assert_eq!(r.act, Act::Continue);
    w.json(&mut r, "200", r#"{"object":"list","data":[{"id":"a-model-with-a-long-name"}]}"#);
    assert_eq!(r.h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("150"));
    assert_eq!(w.used("tiered", "zed"), vec![0, 0], "a model list is not output");
}

#[test]
fn missing_identity_shares_one_bucket() {
    let mut w = World::new(CFG);
    let h = w.host("/v1/chat/completions", &[]);
    let r = w.send(h, &body(Some(50), false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(w.used("tiered", "_none"), vec![60, 60]);
}

#[test]
fn embeddings_are_budgeted_by_their_input() {
    let mut w = World::new(CFG);
    let h = w.host("/v1/embeddings", &[("x-user", "e")]);
    let b = json!({"model": "text-embedding-3-small", "input": ["x".repeat(40), "y".repeat(40)]}).to_string();
    let mut r = w.send(h, b.as_bytes());
    assert_eq!(w.used("tiered", "e"), vec![20, 20], "20 input tokens, no output reserved");
    w.json(&mut r, "200", r#"{"object":"list","data":[],"usage":{"prompt_tokens":18,"total_tokens":18}}"#);
    assert_eq!(w.used("tiered", "e"), vec![18, 18]);
}

#[test]
fn responses_and_messages_caps_are_read_per_format() {
    let mut w = World::new(CFG);
    let h = w.host("/v1/responses", &[("x-user", "r")]);
    let b = json!({"model": "m", "input": "x".repeat(40), "max_output_tokens": 30}).to_string();
    w.send(h, b.as_bytes());
    assert_eq!(w.used("tiered", "r"), vec![40, 40]);
    let h = w.host("/v1/messages", &[("x-user", "a"), ("anthropic-version", "2023-06-01")]);
    let b =
        json!({"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "x".repeat(40)}]}).to_string();
    w.send(h, b.as_bytes());
    assert_eq!(w.used("tiered", "a"), vec![30, 30]);
}

#[test]
fn a_later_stage_refusing_releases_the_reservation() {
    let mut w = World::new(CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    r.p.x.response.local = true; // as when a later filter answers itself
    w.json(&mut r, "403", r#"{"error":{}}"#);
    assert_eq!(w.used("tiered", "alice"), vec![0, 0]);
}

#[test]
fn returning_user_is_served_with_one_read_and_one_cas_and_memory_is_reclaimed() {
    // Issue 14 §4/§5: windows that ended are reclaimed; a returning user costs no retries.
    let cfg = r#"{"user_header": "x-user", "max_counters": 4, "cleanup_interval": "1s", "default_rule_set": "s",
        "rule_sets": {"s": [{"name": "r", "key": ["user"], "count": "requests", "windows": [{"window": "2s", "limit": 10}]}]}}"#;
    let mut w = World::new(cfg);
    let mut secs = 10;
    for round in 0..20 {
        for u in 0..4 {
            let r = w.ask(&format!("user-{round}-{u}"), &body(Some(1), false));
            assert_eq!(r.act, Act::Continue, "round {round} user {u}: {:?}", r.h.replies);
        }
        let r = w.ask("one-too-many", &body(Some(1), false));
        assert_eq!(r.h.replies.first().map(|x| x.status), Some(503), "the cap holds within a window");
        secs += 2;
        w.at(secs);
        w.base.phase = Phase::Root;
        w.plugin.on_tick(&mut w.base);
        assert!(w.metric("sluice_ratelimit_counters") <= 4);
    }
    assert_eq!(w.metric("sluice_ratelimit_counters"), 0, "all reclaimed by the tick");
    let keys = w.base.shared.len();
    assert!(keys <= 2 + bucket_count(4), "{keys} shared-data keys");
    let retries = w.metric("sluice_ratelimit_cas_retries");
    assert_eq!(retries, 0);
    // a user whose windows ended but whose counter is still there: one read, one write
    let r = w.ask("back", &body(Some(1), false));
    assert_eq!(r.act, Act::Continue);
    secs += 3;
    w.at(secs);
    let writes = w.metric("sluice_ratelimit_counter_writes");
    let h = w.host("/v1/chat/completions", &[("x-user", "back")]);
    let before = h.shared_writes;
    let r = w.send(h, &body(Some(1), false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.shared_writes - before, 1);
    assert_eq!(w.metric("sluice_ratelimit_counter_writes") - writes, 1);
    assert_eq!(w.metric("sluice_ratelimit_cas_retries"), 0);
}

#[test]
fn empty_shared_data_reads_like_envoy_and_never_loops() {
    // An old-style empty value (Envoy: `(None, Some(cas))`) is a bucket without counters.
    let mut w = World::new(CFG);
    let key = counter_key("tiered", "per-user", &["alice".into()], bucket_count(100_000));
    w.base.set_shared_data(&crate::budget::bucket_name(key.bucket), b"", None).unwrap();
    assert_eq!(w.base.shared_data(&crate::budget::bucket_name(key.bucket)).0, None);
    let h = w.host("/v1/chat/completions", &[("x-user", "alice")]);
    let before = h.shared_writes;
    let r = w.send(h, &body(Some(50), false));
    assert_eq!(r.act, Act::Continue);
    // the live count is created (anchor + live) and the bucket written once
    assert!(r.h.shared_writes - before <= 3, "{}", r.h.shared_writes - before);
    assert_eq!(w.metric("sluice_ratelimit_cas_retries"), 0);
    assert_eq!(w.used("tiered", "alice"), vec![60, 60]);
}

// ----- shared mode ---------------------------------------------------------------------------

fn rls_answer(r: &mut Req, overall: u64, statuses: &[(u64, u64, u64)]) {
    r.h.call_resp_body = crate::rls::tests::encode_response(overall, statuses);
    r.h.phase = Phase::Callout;
    let token = u32::try_from(r.h.calls.len()).unwrap();
    let n = r.h.call_resp_body.len();
    r.p.on_callout(&mut r.h, token, Some(0), n);
}

fn sent(r: &Req, i: usize) -> rls::SentRequest {
    decode_request(r.h.calls[i].body.as_ref().unwrap()).unwrap()
}

#[test]
fn rls_mode_sends_both_hits_and_obeys() {
    let mut w = World::new(RLS_CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    assert_eq!(r.act, Act::Pause, "waiting for the RLS");
    let req = sent(&r, 0);
    assert_eq!(req.domain, "d");
    assert_eq!(req.hits, 60, "request-level hits_addend = the descriptors' hits");
    let d = &req.descriptors[0];
    assert_eq!(d.hits, Some(60));
    assert!(!d.negative);
    assert_eq!(d.limit, Some((100, 2)));
    assert_eq!(
        d.entries,
        vec![("rule".into(), "s.r".into()), ("window".into(), "minute".into()), ("user".into(), "alice".into())]
    );
    assert_eq!(r.h.calls[0].headers[0].1, rls::SERVICE);
    rls_answer(&mut r, 1, &[(1, 40, 50)]);
    assert_eq!(r.h.resumed_requests, 1);
    // real usage 80 > reserved 60: +20, holding the end of the response until acknowledged
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers = vec![(":status".into(), b"200".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    assert_eq!(r.h.resp_header("x-ratelimit-remaining-tokens").as_deref(), Some("40"));
    r.h.phase = Phase::ResponseBody;
    let u = r#"{"usage":{"prompt_tokens":10,"completion_tokens":70}}"#;
    r.h.resp_body = u.as_bytes().to_vec();
    assert_eq!(r.p.on_response_body(&mut r.h, u.len(), true), Act::Pause);
    let corr = sent(&r, 1);
    assert_eq!((corr.hits, corr.descriptors[0].hits, corr.descriptors[0].negative), (20, Some(20), false));
    rls_answer(&mut r, 1, &[(1, 20, 50)]);
    assert_eq!(r.h.resumed_responses, 1);

    // Over the limit: 429 with the RLS's reset, and the counted hits go back (negative hits).
    let r = w.ask("alice", &body(Some(50), false));
    let mut r = r;
    rls_answer(&mut r, 2, &[(2, 0, 50)]);
    assert_eq!(r.h.replies[0].status, 429);
    assert!(r.h.replies[0].headers.contains(&("retry-after".into(), "50".into())));
    w.save(&r.h);
    let q = w.base.queues.iter().find(|(n, _)| n == QUEUE).unwrap();
    assert_eq!(q.1.len(), 1);
    let item = q.1[0].clone();
    assert_eq!(item[0], b'-');
    let refund = decode_request(&item[1..]).unwrap();
    assert!(refund.descriptors.iter().all(|d| d.negative && d.hits == Some(60)));
    // the root context sends it
    w.base.phase = Phase::Root;
    let qid = w.base.resolve_queue("", QUEUE).unwrap();
    w.plugin.on_queue_ready(&mut w.base, qid);
    assert_eq!(w.base.calls.len(), 1);
    let resp = sluice_core::stage::CalloutResponse {
        token: 1,
        grpc_status: Some(0),
        body: Some(crate::rls::tests::encode_response(1, &[(1, 100, 5)])),
        ..Default::default()
    };
    assert!(w.plugin.on_root_callout(&mut w.base, &resp));
    assert_eq!(w.metric("sluice_ratelimit_corrections.sluice_action=.=refund;.;"), 1);
}

#[test]
fn rls_unused_reservations_are_returned_as_negative_hits_unless_switched_off() {
    let mut w = World::new(RLS_CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    rls_answer(&mut r, 1, &[(1, 40, 50)]);
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers = vec![(":status".into(), b"200".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    r.h.resp_body = USAGE_30.as_bytes().to_vec();
    assert_eq!(r.p.on_response_body(&mut r.h, USAGE_30.len(), true), Act::Pause);
    let refund = sent(&r, 1);
    assert_eq!((refund.hits, refund.descriptors[0].hits, refund.descriptors[0].negative), (30, Some(30), true));

    let mut w = World::new(&RLS_CFG.replace(r#""domain": "d""#, r#""domain": "d", "negative_hits": false"#));
    let mut r = w.ask("alice", &body(Some(50), false));
    rls_answer(&mut r, 1, &[(1, 40, 50)]);
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers = vec![(":status".into(), b"200".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    r.h.resp_body = USAGE_30.as_bytes().to_vec();
    assert_eq!(r.p.on_response_body(&mut r.h, USAGE_30.len(), true), Act::Continue, "nothing to send");
    assert_eq!(r.h.calls.len(), 1);
    // refused: the hits stay counted (the service cannot take them back)
    let mut r = w.ask("alice", &body(Some(50), false));
    rls_answer(&mut r, 2, &[(2, 0, 50)]);
    w.save(&r.h);
    assert!(w.base.queues.iter().all(|(_, q)| q.is_empty()));
}

#[test]
fn rls_reset_stream_is_settled_from_the_root_context() {
    let mut w = World::new(RLS_CFG);
    let mut r = w.ask("alice", &body(Some(50), true));
    rls_answer(&mut r, 1, &[(1, 40, 50)]);
    r.h.phase = Phase::ResponseHeaders;
    r.h.resp_headers =
        vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())];
    r.p.on_response_headers(&mut r.h, false);
    r.h.phase = Phase::ResponseBody;
    let s = sse(&[&"x".repeat(400)], None);
    r.h.resp_body = s[..s.len() - 14].to_vec();
    r.p.on_response_body(&mut r.h, s.len() - 14, false);
    r.h.phase = Phase::Log;
    r.p.on_log(&mut r.h);
    w.save(&r.h);
    // charged 10 + 100 = 110 (estimate), reserved 60: +50 through the queue
    let q = &w.base.queues.iter().find(|(n, _)| n == QUEUE).unwrap().1;
    let item = &q[0];
    assert_eq!(item[0], b'+');
    let corr = decode_request(&item[1..]).unwrap();
    assert_eq!(corr.descriptors[0].hits, Some(50));
}

#[test]
fn rls_rules_with_different_hits_go_in_separate_calls() {
    let cfg = r#"{"mode": "rls", "rls": {"cluster": "rls"}, "user_header": "x-user", "default_rule_set": "s",
        "rule_sets": {"s": [
          {"name": "tokens", "key": ["user"], "count": "total_tokens", "windows": [{"window": "minute", "limit": 1000}, {"window": "hour", "limit": 5000}]},
          {"name": "reqs", "key": ["user"], "count": "requests", "windows": [{"window": "minute", "limit": 10}]}]}}"#;
    let mut w = World::new(cfg);
    let mut r = w.ask("alice", &body(Some(50), false));
    let first = sent(&r, 0);
    assert_eq!(first.hits, 60);
    assert_eq!(first.descriptors.len(), 2);
    assert!(first.descriptors.iter().all(|d| d.hits == Some(60)));
    rls_answer(&mut r, 1, &[(1, 940, 50), (1, 4940, 3000)]);
    let second = sent(&r, 1);
    assert_eq!((second.hits, second.descriptors.len(), second.descriptors[0].hits), (1, 1, Some(1)));
    rls_answer(&mut r, 1, &[(1, 9, 50)]);
    assert_eq!(r.h.resumed_requests, 1);
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("ok"));
    // refused by the second call: the first call's hits are returned
    let mut r = w.ask("bob", &body(Some(50), false));
    rls_answer(&mut r, 1, &[(1, 940, 50), (1, 4940, 3000)]);
    rls_answer(&mut r, 2, &[(2, 0, 50)]);
    assert_eq!(r.h.replies[0].status, 429);
    w.save(&r.h);
    let q = &w.base.queues.iter().find(|(n, _)| n == QUEUE).unwrap().1;
    assert_eq!(q.len(), 2, "both calls refunded");
}

#[test]
fn rls_down_follows_failure_mode() {
    let mut w = World::new(RLS_CFG);
    let mut r = w.ask("alice", &body(Some(50), false));
    r.h.phase = Phase::Callout;
    r.p.on_callout(&mut r.h, 1, Some(14), 0);
    assert_eq!(r.h.replies[0].status, 503);
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("error:rls_unavailable_14"));
    let mut w = World::new(&RLS_CFG.replace("\"mode\"", "\"failure_mode\": \"allow\", \"mode\""));
    let mut r = w.ask("alice", &body(Some(50), false));
    r.p.on_callout(&mut r.h, 1, Some(4), 0);
    assert_eq!(r.h.resumed_requests, 1);
    let mut r = w.ask("alice", &body(Some(50), false));
    r.h.call_resp_body = b"\x12\xff".to_vec();
    r.p.on_callout(&mut r.h, 1, Some(0), 2);
    assert_eq!(r.h.resumed_requests, 1);
    assert!(r.h.state(keys::RATELIMIT).unwrap().starts_with("error:rls_bad_response"));
    // dispatch impossible
    let mut h = w.host("/v1/chat/completions", &[("x-user", "z")]);
    h.fail_calls = true;
    let r = w.send(h, &body(Some(5), false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.state(keys::RATELIMIT).as_deref(), Some("error:rls_unavailable_14"));
}

// ----- host-call budget (issue 15) -------------------------------------------------------------

#[test]
fn host_call_budget_of_a_typical_local_request() {
    // A chat request through this stage alone, local mode, a counter that exists, JSON answer
    // with usage. Value-returning host calls:
    //   pipeline: request headers (1), route name (1) + route metadata (1, first time per
    //     route per VM), request body (1), response headers (1), response body (1);
    //   this stage: identity filter state (1: `user` part, read once), the counter bucket
    //     at admission (1) and at settlement (1).
    // No read-back of anything this filter wrote; no per-header reads.
    let mut w = World::new(&CFG.replace("\"user_header\": \"x-user\",", ""));
    let mut first = w.ask("alice", &body(Some(50), false));
    w.json(&mut first, "200", USAGE_30);
    let mut h = CountingHost::new(w.host("/v1/chat/completions", &[]));
    let mut p = Pipeline::new(1, vec![Slot::of(&w.plugin)], Rc::new(RefCell::new(RouteCache::default())));
    let b = body(Some(50), false);
    h.inner.phase = Phase::RequestHeaders;
    assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
    h.inner.phase = Phase::RequestBody;
    h.inner.req_body = b.clone();
    assert_eq!(p.on_request_body(&mut h, b.len(), true), Act::Continue);
    let admission = h.total();
    h.inner.phase = Phase::ResponseHeaders;
    h.inner.resp_headers =
        vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"application/json".to_vec())];
    p.on_response_headers(&mut h, false);
    h.inner.phase = Phase::ResponseBody;
    h.inner.resp_body = USAGE_30.as_bytes().to_vec();
    p.on_response_body(&mut h, USAGE_30.len(), true);
    h.inner.phase = Phase::Log;
    p.on_log(&mut h);
    // Budget: 6 calls to admit, 9 in all (8 on a route whose settings the VM has cached).
    assert_eq!(admission, 6, "admission calls: {:?}", h.property_reads.borrow());
    assert_eq!(h.total(), 9, "calls: {:?}", h.property_reads.borrow());
    assert_eq!((h.count(CallKind::HeaderMap), h.count(CallKind::Body), h.count(CallKind::Property)), (2, 2, 3));
    assert_eq!(h.count(CallKind::SharedData), 2, "one bucket read to reserve, one to settle");
    assert_eq!(h.count(CallKind::Header), 0);
    let reads = h.property_reads.borrow().clone();
    assert!(!reads.iter().any(|r| r == keys::USER || r == keys::RATELIMIT || r == keys::USAGE), "{reads:?}");
}

const COST_CFG: &str = r#"{
    "user_header": "x-user",
    "default_output_tokens": 100,
    "default_rule_set": "budget",
    "currency": "USD",
    "prices": [{"model": "m", "input": 2.0, "cached_input": 1.0, "output": 10.0}],
    "rule_sets": {
      "budget": [{"name": "monthly", "key": ["user"], "count": "cost", "windows": [{"window": "month", "limit": 0.01}]}]
    }
}"#;

fn cost_used(w: &mut World, user: &str) -> u64 {
    let c = Config::from_json(COST_CFG.as_bytes()).unwrap();
    let rule = &c.rule_set("budget").unwrap()[0];
    let key = counter_key("budget", &rule.name, &[user.to_string()], bucket_count(c.max_counters));
    let now = w.base.now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
    Store::new(&mut w.base, 10, c.max_counters).peek(&key, &rule.windows, now)[0]
}

#[test]
fn money_budgets_reserve_the_estimate_and_settle_the_real_cost() {
    let mut w = World::new(COST_CFG);
    // 10 input tokens × 2 + 100 reserved output × 10 = 1020 micro-USD reserved.
    let mut r = w.ask("alice", &body(None, false));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(cost_used(&mut w, "alice"), 1020);
    // Real: 10 input (4 cached) × … + 20 output × 10 = 6×2 + 4×1 + 200 = 216.
    w.json(
        &mut r,
        "200",
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":4}}}"#,
    );
    assert_eq!(cost_used(&mut w, "alice"), 216);
    assert_eq!(r.h.resp_header("x-ratelimit-limit-cost").as_deref(), Some("0.010000"));
    assert_eq!(r.h.resp_header("x-ratelimit-remaining-cost").as_deref(), Some("0.008980"));
    // Spend the rest: 10 000 micro-USD per month.
    for _ in 0..20 {
        let mut r = w.ask("alice", &body(Some(100), false));
        if r.act != Act::Continue {
            break;
        }
        w.json(&mut r, "200", r#"{"model":"m","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":100}}"#);
    }
    let r = w.ask("alice", &body(Some(100), false));
    let reply = r.h.replies.last().expect("refused");
    assert_eq!(reply.status, 429);
    let v: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("allows 0.010000 USD per month window"), "{v}");
    assert!(reply.headers.iter().any(|(k, _)| k == "x-ratelimit-remaining-cost"));
    // Another caller has their own budget.
    assert_eq!(w.ask("bob", &body(Some(100), false)).act, Act::Continue);
}

#[test]
fn an_unpriced_model_is_refused_by_a_money_budget() {
    let mut w = World::new(COST_CFG);
    let b = serde_json::to_vec(&json!({"model": "unknown-model", "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
    let r = w.ask("alice", &b);
    let reply = r.h.replies.last().expect("refused");
    assert_eq!(reply.status, 403);
    let v: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_priced");
    let allow = COST_CFG.replacen("\"currency\"", "\"unpriced_models\": \"allow\", \"currency\"", 1);
    let mut w = World::new(&allow);
    assert_eq!(w.ask("alice", &b).act, Act::Continue);
}

#[test]
fn cost_rules_need_prices() {
    let e = Config::from_json(
        br#"{"rule_sets":{"s":[{"name":"r","key":["user"],"count":"cost","windows":[{"window":"month","limit":5}]}]}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "rule_sets.s[0].count");
}
