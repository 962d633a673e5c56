//! The auth stage through the core pipeline on the fake host (HS256 tokens minted here;
//! RSA/EC/JWKS paths are also covered end to end with keys the e2e tests generate).

use crate::config::Config;
use crate::jwt::{self, Failure};
use crate::stage::{AuthPlugin, DECISIONS, JWT_CACHE, SIGNATURE_CHECKS};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_core::encoding::test_encode_metadata;
use sluice_core::host::{CallKind, CountingHost, FakeHost, Host, Phase};
use sluice_core::keys;
use sluice_core::metrics::{tagged_name, MetricKind};
use sluice_core::pipeline::{Act, Pipeline, Slot};
use sluice_core::route::RouteCache;
use sluice_core::stage::Plugin;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";
const NOW: u64 = 1_800_000_000;
const RSA_PUB: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAq0Gg3Brv+KPzsDZL2DMh
1E4/aZnbVeduSbjoFifUN+R8emrT1Ue4YvJpUfuRIXzB1delOqsxB7XbvYR0pSFw
7951NhvgHeHUustIuj0nf0bTSru/Gd0bmoNHhZtsVE6c+hDbD4XeSTsHVuyv0/YL
VgkjQrYOty8Lw13cZ6X74BAeKVSO96grIdpDCLKznigPDyEYtI0w/uD0pDB7YZiC
1hmXj9T9Rm82p9NYYb2cctFjT0WcjPFR0fEv6Brh+KWfY4PrtEGpNU0QEjPj4Yrr
nU0okdAq0Jrl9slurMqC/iIZLQyxAzoKHkXSTNY5U+dRTv6NEOnHLM94xd5+Z1Wp
SQIDAQAB
-----END PUBLIC KEY-----
";

fn env(name: &str) -> Option<String> {
    (name == "JWT_SECRET").then(|| SECRET.to_string())
}

fn base_config() -> Value {
    json!({
        "providers": [{"name": "demo", "issuer": "solo.io", "algorithms": ["HS256"], "hmac_secret_env": "JWT_SECRET"}],
        "policies": {"dev-only": {"all": [{"claim": "org", "equals": "solo.io"}, {"claim": "team", "equals": "dev"}]}},
        "require_policy": false,
        "claims_to_filter_state": ["org"],
        "claims_to_headers": {"x-sluice-user": "sub"},
        "model_access": {},
        "api_keys": {"keys": [{"sha256": hex(&jwt::sha256(b"sk-ci-123")), "subject": "ci-bot", "team": "ops",
                               "claims": {"org": "solo.io", "llms": {"openai": ["gpt-4o"]}}}]}
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config(v: &Value) -> Config {
    Config::from_json(v.to_string().as_bytes(), &env).unwrap()
}

/// A fresh plugin (per-VM state) and, with it, fresh metrics (tests may share one thread,
/// as they do inside a wasm runtime).
fn plugin(v: &Value) -> AuthPlugin {
    fresh(config(v))
}

fn fresh(c: Config) -> AuthPlugin {
    METER.with(|m| *m.borrow_mut() = MeterState::default());
    AuthPlugin::new(c)
}

fn mint(claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn alice() -> Value {
    json!({"iss": "solo.io", "sub": "alice", "org": "solo.io", "team": "dev", "exp": NOW + 3600,
           "llms": {"openai": ["gpt-4o-mini"]}})
}

fn bob() -> Value {
    json!({"iss": "solo.io", "sub": "bob", "org": "solo.io", "team": "ops", "exp": NOW + 3600,
           "llms": {"mistralai": ["open-mistral-nemo"]}})
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A request as Envoy hands it over: POST /v1/chat/completions on the route `chat` with
/// `route` as its `sluice` metadata.
fn host_on(path: &str, headers: &[(&str, &str)], route: Value) -> FakeHost {
    let method = if path.contains("/models") { "GET" } else { "POST" };
    let mut base = vec![(":method", method), (":path", path)];
    base.extend_from_slice(headers);
    let mut h = FakeHost::with_request_headers(&base);
    h.time = Some(UNIX_EPOCH + Duration::from_secs(NOW));
    h.set_prop(&["xds", "route_name"], "chat");
    h.properties.insert("xds/route_metadata".into(), test_encode_metadata("sluice", &route));
    h
}

fn host(headers: &[(&str, &str)]) -> FakeHost {
    host_on("/v1/chat/completions", headers, json!({}))
}

struct Run {
    p: Pipeline,
    h: FakeHost,
    act: Act,
}

type MeterState = (Vec<(MetricKind, String)>, HashMap<u32, i64>);

thread_local! {
    /// The metrics Envoy would keep across requests: a plugin defines each name once per
    /// VM, so every fake host of one test shares the definitions and values (reset with each
    /// new plugin).
    static METER: RefCell<MeterState> = RefCell::default();
}

fn start(pl: &AuthPlugin, mut h: FakeHost, eos: bool) -> Run {
    METER.with(|m| {
        let m = m.borrow();
        h.metric_defs = m.0.clone();
        h.metric_values = m.1.clone();
    });
    let mut p = Pipeline::new(3, vec![Slot::of(pl)], Rc::new(RefCell::new(RouteCache::default())));
    h.phase = Phase::RequestHeaders;
    let act = p.on_request_headers(&mut h, eos);
    let r = Run { p, h, act };
    r.save();
    r
}

/// Headers with end of stream (no body): decided at once.
fn run(pl: &AuthPlugin, h: FakeHost) -> Run {
    start(pl, h, true)
}

impl Run {
    /// Keep this host's metrics for the next request of the test.
    fn save(&self) {
        METER.with(|m| *m.borrow_mut() = (self.h.metric_defs.clone(), self.h.metric_values.clone()));
    }

    /// The body arrives in one chunk with end of stream (or, with `trailers`, ends with a
    /// trailers frame).
    fn body(&mut self, body: &[u8], trailers: bool) -> Act {
        self.h.phase = Phase::RequestBody;
        self.h.req_body = body.to_vec();
        let n = body.len();
        self.act = self.p.on_request_body(&mut self.h, n, !trailers);
        if trailers {
            assert_eq!(self.act, Act::Pause, "no end of stream yet: held");
            self.act = self.p.on_request_trailers(&mut self.h);
        }
        self.save();
        self.act
    }

    fn callout(&mut self, status: &str, body: Option<Vec<u8>>) {
        self.h.phase = Phase::Callout;
        self.h.call_resp_headers = vec![(":status".into(), status.as_bytes().to_vec())];
        let n = body.as_ref().map_or(0, Vec::len);
        self.h.call_resp_body = body.unwrap_or_default();
        let token = u32::try_from(self.h.calls.len()).unwrap();
        self.p.on_callout(&mut self.h, token, None, n);
        self.save();
    }

    fn respond(&mut self, status: &str, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        self.h.req_headers_sent = true;
        self.h.phase = Phase::ResponseHeaders;
        self.h.resp_headers = vec![(":status".into(), status.as_bytes().to_vec())];
        for (k, v) in extra {
            self.h.resp_headers.push((k.to_string(), v.as_bytes().to_vec()));
        }
        assert_eq!(self.p.on_response_headers(&mut self.h, false), Act::Continue);
        self.h.phase = Phase::ResponseBody;
        self.h.resp_body = body.to_vec();
        let n = body.len();
        self.p.on_response_body(&mut self.h, n, true);
        self.save();
        self.h.resp_body.clone()
    }

    fn replied(&self) -> bool {
        !self.h.replies.is_empty()
    }

    fn error(&self) -> (u32, Value) {
        let r = self.h.replies.last().expect("a reply");
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    /// A metric's value so far in this test (all requests).
    fn metric(&self, name: &str) -> i64 {
        self.h.metric(name).unwrap_or(0)
    }
}

fn decisions(action: &str, reason: &str) -> String {
    tagged_name(DECISIONS, &[("sluice_action", action), ("sluice_reason", reason)])
}

#[test]
fn missing_token_is_401_with_www_authenticate() {
    let pl = plugin(&base_config());
    let r = run(&pl, host(&[]));
    assert_eq!(r.act, Act::Pause);
    let (status, body) = r.error();
    assert_eq!(status, 401);
    assert_eq!(body["error"]["message"], "Jwt is missing");
    assert!(r.h.replies[0].headers.contains(&("www-authenticate".into(), "Bearer".into())));
    assert_eq!(r.metric(&decisions("deny", "missing")), 1);
}

#[test]
fn valid_token_hands_off_identity_and_strips_credential() {
    let pl = plugin(&base_config());
    let r = run(&pl, host(&[("authorization", &bearer(&mint(alice()))), ("x-sluice-user", "mallory")]));
    assert_eq!(r.act, Act::Continue);
    assert!(!r.replied());
    assert_eq!(r.h.state(keys::USER).as_deref(), Some("alice"));
    assert_eq!(r.h.state(keys::TEAM).as_deref(), Some("dev"));
    assert_eq!(r.h.state(keys::AUTH_METHOD).as_deref(), Some("jwt"));
    assert_eq!(r.h.state(keys::KEY_ID), None, "JWT callers have no key id");
    assert!(r.h.state(keys::IDENTITY).unwrap().contains("\"u\":\"alice\""));
    assert_eq!(r.h.state(&keys::claim_key("org")).as_deref(), Some("solo.io"));
    assert_eq!(r.h.req_header("x-sluice-user").as_deref(), Some("alice"));
    assert_eq!(r.h.req_header("authorization"), None);
    assert_eq!(r.metric(&decisions("allow", "jwt")), 1);
    assert!(r.h.refused.is_empty(), "{:?}", r.h.refused);
}

#[test]
fn every_configured_credential_is_stripped_unless_the_route_keeps_them() {
    // The caller authenticates with a JWT and also sends an API key and a token cookie: none
    // of the gateway's credentials leaves it.
    let mut c = base_config();
    c["from"] = json!([{"header": "authorization", "prefix": "Bearer "}, {"cookie": "jwt"}]);
    let pl = plugin(&c);
    let t = mint(alice());
    let headers =
        [("authorization", bearer(&t)), ("x-api-key", "sk-other".into()), ("cookie", format!("a=1; jwt={t}"))];
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = run(&pl, host(&pairs));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.req_header("authorization"), None);
    assert_eq!(r.h.req_header("x-api-key"), None);
    assert_eq!(r.h.req_header("cookie").as_deref(), Some("a=1"));
    let r = run(&pl, host_on("/v1/chat/completions", &pairs, json!({"auth_keep_credentials": "true"})));
    assert_eq!(r.act, Act::Continue);
    assert!(r.h.req_header("authorization").is_some() && r.h.req_header("x-api-key").is_some());
    let mut c = base_config();
    c["strip_credentials"] = json!(false);
    let r = run(&plugin(&c), host(&pairs));
    assert!(r.h.req_header("authorization").is_some());
}

#[test]
fn refusal_classes() {
    let pl = plugin(&base_config());
    let mut expired = alice();
    expired["exp"] = json!(NOW - 120);
    let mut within_leeway = alice();
    within_leeway["exp"] = json!(NOW - 30);
    let mut future = alice();
    future["nbf"] = json!(NOW + 3600);
    let mut iat_future = alice();
    iat_future["iat"] = json!(NOW + 3600);
    let mut wrong_iss = alice();
    wrong_iss["iss"] = json!("evil.example");
    let mut with_aud = alice();
    with_aud["aud"] = json!("someone-else");
    let mut no_exp = alice();
    no_exp.as_object_mut().unwrap().remove("exp");
    let good = mint(alice());
    let (h, rest) = good.split_once('.').unwrap();
    let (_p, sig) = rest.split_once('.').unwrap();
    let tampered_payload = {
        let mut c = alice();
        c["team"] = json!("admins");
        let t = mint(c);
        t.split('.').nth(1).unwrap().to_string()
    };
    let tampered = format!("{h}.{tampered_payload}.{sig}");
    let none_token = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(alice().to_string().as_bytes()));
    let hs_with_rsa_pub =
        encode(&Header::new(Algorithm::HS256), &alice(), &EncodingKey::from_secret(RSA_PUB.as_bytes())).unwrap();
    let cases: Vec<(String, Failure)> = vec![
        (mint(expired), Failure::Expired),
        (mint(future), Failure::NotYetValid),
        (mint(iat_future), Failure::NotYetValid),
        (mint(wrong_iss), Failure::Issuer),
        (mint(with_aud), Failure::Audience),
        (mint(no_exp), Failure::Malformed),
        (tampered, Failure::Signature),
        (none_token, Failure::Algorithm),
        (good.get(..good.len() - 10).unwrap().to_string(), Failure::Malformed),
        ("a.b".into(), Failure::Malformed),
        ("x".repeat(10_000), Failure::Malformed),
        ("ab$%.cd!.ef".into(), Failure::Malformed),
    ];
    for (token, want) in cases {
        // Twice: the second answer (negative cache or not) is the same.
        for _ in 0..2 {
            let r = run(&pl, host(&[("authorization", &bearer(&token))]));
            let (status, body) = r.error();
            assert_eq!(status, 401, "{want:?} {body}");
            assert_eq!(body["error"]["message"], format!("Jwt verification fails: {}", want.class()), "{want:?}");
            assert_eq!(body["error"]["code"], want.code());
        }
    }
    let r = run(&pl, host(&[("authorization", &bearer(&mint(within_leeway)))]));
    assert_eq!(r.act, Act::Continue);

    let rsa = plugin(&json!({"providers": [{"name": "rsa", "issuer": "solo.io", "public_key_pem": RSA_PUB}],
                             "require_policy": false}));
    let r = run(&rsa, host(&[("authorization", &bearer(&hs_with_rsa_pub))]));
    let (status, body) = r.error();
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "jwt_algorithm");
}

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn duplicate_or_malformed_authorization_is_refused() {
    let pl = plugin(&base_config());
    let t = bearer(&mint(alice()));
    for headers in [
        vec![("authorization", t.as_str()), ("authorization", t.as_str())],
        vec![("authorization", "Basic YWxpY2U6cHc=")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer ")],
    ] {
        let r = run(&pl, host(&headers));
        let (status, body) = r.error();
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(body["error"]["code"], "jwt_malformed", "{headers:?}");
    }
}

#[test]
fn rbac_policy_from_route_metadata() {
    let pl = plugin(&base_config());
    for (claims, allowed) in [(alice(), true), (bob(), false)] {
        let r = run(
            &pl,
            host_on(
                "/v1/chat/completions",
                &[("authorization", &bearer(&mint(claims)))],
                json!({"auth_policy": "dev-only"}),
            ),
        );
        assert_eq!(r.replied(), !allowed);
        if !allowed {
            let (status, body) = r.error();
            assert_eq!(status, 403);
            assert_eq!(body["error"]["message"], "RBAC: access denied");
            assert_eq!(r.h.state(keys::USER).as_deref(), Some("bob"), "identity published before RBAC");
        }
    }
    // A route naming an unknown policy fails closed.
    let r = run(&pl, host_on("/x", &[("authorization", &bearer(&mint(alice())))], json!({"auth_policy": "nope"})));
    assert_eq!(r.error().0, 500);
}

#[test]
fn require_policy_is_the_default_and_refuses_routes_without_one() {
    let mut c = base_config();
    c.as_object_mut().unwrap().remove("require_policy");
    let cfg = config(&c);
    assert!(cfg.require_policy, "the safe default");
    let pl = fresh(cfg);
    let t = bearer(&mint(alice()));
    let r = run(&pl, host(&[("authorization", &t)]));
    let (status, body) = r.error();
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "no_policy");
    assert_eq!(r.metric(&decisions("deny", "no_policy")), 1);
    assert_eq!(r.h.req_header("authorization").as_deref(), Some(t.as_str()), "refused before anything changed");
    // A route with a policy is served; a default policy covers routes without one.
    let r = run(&pl, host_on("/v1/chat/completions", &[("authorization", &t)], json!({"auth_policy": "dev-only"})));
    assert_eq!(r.act, Act::Continue);
    c["default_policy"] = json!("dev-only");
    let pl = plugin(&c);
    assert_eq!(run(&pl, host(&[("authorization", &t)])).act, Act::Continue);
    assert_eq!(run(&pl, host(&[("authorization", &bearer(&mint(bob())))])).error().0, 403);
}

fn chat_body(model: Option<&str>) -> Vec<u8> {
    let mut v = json!({"messages": [{"role": "user", "content": "hi"}]});
    if let Some(m) = model {
        v["model"] = json!(m);
    }
    serde_json::to_vec(&v).unwrap()
}

fn model_run(pl: &AuthPlugin, claims: Value, path: &str, route: Value, body: &[u8], trailers: bool) -> Run {
    let h = host_on(path, &[("authorization", &bearer(&mint(claims))), ("content-type", "application/json")], route);
    let mut r = start(pl, h, false);
    assert_eq!(r.act, Act::Pause, "held for the body");
    r.body(body, trailers);
    r
}

#[test]
fn model_access_per_provider_on_every_endpoint() {
    let pl = plugin(&base_config());
    let openai = json!({"provider": "openai"});
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/openai",
    ] {
        for trailers in [false, true] {
            let r = model_run(&pl, alice(), path, openai.clone(), &chat_body(Some("gpt-4o-mini")), trailers);
            assert_eq!(r.act, Act::Continue, "{path}");
            assert_eq!(r.h.state(keys::REQUESTED_MODEL).as_deref(), Some("gpt-4o-mini"), "{path}");
            let r = model_run(&pl, alice(), path, openai.clone(), &chat_body(Some("gpt-4o")), trailers);
            let (status, body) = r.error();
            assert_eq!(status, 403, "{path} trailers={trailers}");
            assert_eq!(body["error"]["code"], "model_not_allowed");
            assert!(body["error"]["message"].as_str().unwrap().contains("gpt-4o"));
        }
    }
    let r = model_run(
        &pl,
        bob(),
        "/v1/responses",
        json!({"provider": "mistralai"}),
        br#"{"model":"open-mistral-nemo","input":"hi"}"#,
        false,
    );
    assert_eq!(r.act, Act::Continue);
    // No model in the request: the route's default decides.
    let with_default = |d: &str| json!({"provider": "openai", "default_model": d});
    let r = model_run(&pl, alice(), "/v1/embeddings", with_default("gpt-4o-mini"), br#"{"input":"x"}"#, false);
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.state(keys::REQUESTED_MODEL).as_deref(), Some("gpt-4o-mini"));
    let r = model_run(&pl, alice(), "/v1/chat/completions", with_default("gpt-4o"), &chat_body(None), false);
    assert_eq!(r.error().1["error"]["code"], "model_not_allowed");
    let r = model_run(&pl, alice(), "/v1/messages", openai.clone(), &chat_body(None), true);
    assert_eq!(r.error().0, 400);
    assert_eq!(r.error().1["error"]["code"], "model_required");
    // A request without a body names no model: nothing to check (e.g. a GET of another API).
    let r = run(&pl, host_on("/v1/files", &[("authorization", &bearer(&mint(alice())))], openai.clone()));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.metric(&decisions("allow", "no_model")), 1);
    // A route without a provider gets no model check: the body is not even held.
    let r =
        start(&pl, host_on("/v1/chat/completions", &[("authorization", &bearer(&mint(alice())))], json!({})), false);
    assert_eq!(r.act, Act::Continue);
}

#[test]
fn model_access_body_errors() {
    let pl = plugin(&base_config());
    let openai = json!({"provider": "openai"});
    for (body, code) in [
        (&b"{not json"[..], "invalid_json"),
        (&b"[1]"[..], "invalid_json"),
        (&br#"{"model": 5}"#[..], "invalid_json"),
        (&br#"{"model": ""}"#[..], "invalid_json"),
        (&br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#[..], "duplicate_json_key"),
    ] {
        let r = model_run(&pl, alice(), "/v1/chat/completions", openai.clone(), body, false);
        let (status, v) = r.error();
        assert_eq!((status, v["error"]["code"].as_str().unwrap()), (400, code), "{}", String::from_utf8_lossy(body));
    }
    let h = host_on("/v1/chat/completions", &[("authorization", &bearer(&mint(alice())))], openai);
    let mut r = start(&pl, h, false);
    r.h.phase = Phase::RequestBody;
    assert_eq!(r.p.on_request_body(&mut r.h, 2 << 20, false), Act::Pause);
    assert_eq!(r.error().0, 413);
}

fn models_list() -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "list", "data": [
        {"id": "gpt-4o", "object": "model"}, {"id": "gpt-4o-mini", "object": "model"}]}))
    .unwrap()
}

#[test]
fn models_list_is_filtered_with_or_without_trailing_slash() {
    let pl = plugin(&base_config());
    for path in ["/openai/v1/models", "/openai/v1/models/", "/v1/models?limit=5"] {
        let h = host_on(
            path,
            &[("authorization", &bearer(&mint(alice()))), ("accept-encoding", "gzip, br")],
            json!({"provider": "openai"}),
        );
        let mut r = run(&pl, h);
        assert_eq!(r.act, Act::Continue, "{path}");
        assert_eq!(r.h.req_header("accept-encoding"), None, "{path}: the list must come back uncompressed");
        let out = r.respond("200", &[("content-type", "application/json"), ("content-length", "99")], &models_list());
        assert_eq!(r.h.resp_header("content-length"), None);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"], json!([{"id": "gpt-4o-mini", "object": "model"}]), "{path}");
        assert!(r.h.refused.is_empty(), "{:?}", r.h.refused);
    }
}

#[test]
fn a_model_outside_the_claim_is_404_without_forwarding() {
    let pl = plugin(&base_config());
    let a = bearer(&mint(alice()));
    let r = run(&pl, host_on("/openai/v1/models/gpt-4o", &[("authorization", &a)], json!({"provider": "openai"})));
    let (status, body) = r.error();
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": {"message": "The model 'gpt-4o' does not exist or you do not have access to it.",
                         "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
    );
    for path in ["/openai/v1/models/gpt-4o-mini", "/openai/v1/models/gpt-4o-mini/"] {
        let mut r = run(&pl, host_on(path, &[("authorization", &a)], json!({"provider": "openai"})));
        assert_eq!(r.act, Act::Continue, "{path}");
        let one = br#"{"id":"gpt-4o-mini","object":"model"}"#;
        assert_eq!(r.respond("200", &[("content-type", "application/json")], one), one.to_vec(), "passed unchanged");
    }
    // Any method: a DELETE of a model outside the claim is refused the same way.
    let mut h = host_on("/openai/v1/models/ft:gpt-4o:acme", &[("authorization", &a)], json!({"provider": "openai"}));
    h.set_request_header(":method", Some(b"DELETE"));
    assert_eq!(run(&pl, h).error().0, 404);
}

#[test]
fn models_answers_that_cannot_be_filtered_are_refused_or_emptied() {
    let pl = plugin(&base_config());
    let a = bearer(&mint(alice()));
    let get = || host_on("/v1/models", &[("authorization", &a)], json!({"provider": "openai"}));
    // Compressed anyway: 502 in place of the answer, never a corrupted or unfiltered list.
    let mut r = run(&pl, get());
    r.respond("200", &[("content-type", "application/json"), ("content-encoding", "gzip")], b"\x1f\x8b...");
    assert_eq!(r.h.resp_header(":status").as_deref(), Some("502"));
    assert_eq!(r.h.resp_header("content-encoding"), None);
    let v: Value = serde_json::from_slice(&r.h.resp_body).unwrap();
    assert_eq!(v["error"]["code"], "models_list_unreadable");
    assert_eq!(r.metric(&decisions("deny", "models_unreadable")), 1);
    // Not a list: an empty list.
    let mut r = run(&pl, get());
    let out = r.respond("200", &[("content-type", "application/json")], b"<html>oops</html>");
    assert_eq!(out, crate::models::EMPTY_LIST.to_vec());
    // An error answer passes as it is; an error status carrying a list is still filtered.
    let mut r = run(&pl, get());
    let err = br#"{"error":{"message":"upstream down","type":"server_error"}}"#;
    assert_eq!(r.respond("503", &[("content-type", "application/json")], err), err.to_vec());
    let mut r = run(&pl, get());
    let out: Value = serde_json::from_slice(&r.respond("203", &[], &models_list())).unwrap();
    assert_eq!(out["data"].as_array().unwrap().len(), 1);
}

#[test]
fn api_keys_work_like_tokens_and_publish_a_key_id() {
    let pl = plugin(&base_config());
    let r = run(&pl, host(&[("x-api-key", "sk-ci-123")]));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.state(keys::USER).as_deref(), Some("ci-bot"));
    assert_eq!(r.h.state(keys::TEAM).as_deref(), Some("ops"));
    assert_eq!(r.h.state(keys::AUTH_METHOD).as_deref(), Some("api_key"));
    let want = hex(&jwt::sha256(b"sk-ci-123")).get(..32).unwrap().to_string();
    assert_eq!(r.h.state(keys::KEY_ID).as_deref(), Some(want.as_str()), "first 32 hex digits of the hash");
    assert!(!r.h.state(keys::IDENTITY).unwrap().contains("sk-ci-123"), "never the key");
    assert_eq!(r.h.req_header("x-api-key"), None);
    let r = run(&pl, host(&[("x-api-key", "sk-wrong")]));
    let (status, body) = r.error();
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // RBAC sees the key's claims: team ops is not dev.
    let r = run(&pl, host_on("/x", &[("x-api-key", "sk-ci-123")], json!({"auth_policy": "dev-only"})));
    assert_eq!(r.error().0, 403);
}

#[test]
fn token_sources_query_and_cookie() {
    let mut c = base_config();
    c["from"] = json!([{"query": "access_token"}, {"cookie": "jwt"}]);
    let pl = plugin(&c);
    let t = mint(alice());
    let r = run(&pl, host_on(&format!("/v1/chat/completions?a=1&access_token={t}&b=2"), &[], json!({})));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.req_header(":path").as_deref(), Some("/v1/chat/completions?a=1&b=2"));
    let r = run(&pl, host(&[("cookie", &format!("a=1; jwt={t}; b=2"))]));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.req_header("cookie").as_deref(), Some("a=1; b=2"));
}

#[test]
fn cache_serves_repeats_and_respects_exp() {
    let pl = plugin(&base_config());
    let mut c = alice();
    c["exp"] = json!(NOW + 10);
    let t = mint(c);
    let r = run(&pl, host(&[("authorization", &bearer(&t))]));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.metric(SIGNATURE_CHECKS), 1);
    assert_eq!(pl.vm().borrow().cache.len(), 1);
    let r = run(&pl, host(&[("authorization", &bearer(&t))]));
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.metric(SIGNATURE_CHECKS), 1, "a repeat costs no signature check");
    // Past exp (beyond the leeway) the cached entry is not used and the token is refused.
    let mut h = host(&[("authorization", &bearer(&t))]);
    h.time = Some(UNIX_EPOCH + Duration::from_secs(NOW + 100));
    let r = run(&pl, h);
    assert_eq!(r.error().1["error"]["code"], "jwt_expired");
}

#[test]
fn garbage_signatures_cost_one_check_then_none() {
    let pl = plugin(&base_config());
    let forged =
        encode(&Header::new(Algorithm::HS256), &alice(), &EncodingKey::from_secret(b"not-the-secret-0123456789abcdef"))
            .unwrap();
    for _ in 0..20 {
        let r = run(&pl, host(&[("authorization", &bearer(&forged))]));
        assert_eq!(r.error().1["error"]["code"], "jwt_signature");
    }
    let r = run(&pl, host(&[]));
    let negative = r.metric(&tagged_name(JWT_CACHE, &[("sluice_action", "negative_hit")]));
    assert_eq!((r.metric(SIGNATURE_CHECKS), negative), (1, 19));
    assert_eq!(r.metric(&decisions("deny", "signature")), 20);
}

#[test]
fn over_the_verify_budget_new_tokens_get_503_and_cached_ones_pass() {
    let mut c = base_config();
    c["max_verifies_per_second"] = json!(2);
    let pl = plugin(&c);
    let good = mint(alice());
    assert_eq!(run(&pl, host(&[("authorization", &bearer(&good))])).act, Act::Continue);
    let mut codes = Vec::new();
    for i in 0..5 {
        let mut claims = alice();
        claims["sub"] = json!(format!("u{i}"));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"wrong-0123456789abcdef0123456789"),
        )
        .unwrap();
        let r = run(&pl, host(&[("authorization", &bearer(&forged))]));
        codes.push(r.error().1["error"]["code"].as_str().unwrap().to_string());
        if r.error().0 == 503 {
            assert!(r.h.replies[0].headers.contains(&("retry-after".into(), "1".into())));
        }
    }
    assert_eq!(
        codes,
        ["jwt_signature", "jwt_verify_budget", "jwt_verify_budget", "jwt_verify_budget", "jwt_verify_budget"]
    );
    let r = run(&pl, host(&[]));
    assert_eq!(r.metric(&decisions("deny", "verify_budget")), 4);
    assert_eq!(r.metric(SIGNATURE_CHECKS), 2, "the good token and one forged one: the rest without crypto");
    assert_eq!(run(&pl, host(&[("authorization", &bearer(&good))])).act, Act::Continue, "cached: not budgeted");
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        (json!({}), "providers"),
        (json!({"providers": [{"name": "a", "issuer": "i"}]}), "providers[0].jwks"),
        (json!({"providers": [{"name": "a", "issuer": "i", "public_key_pem": "nope"}]}), "providers[0].public_key_pem"),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "public_key_pem": RSA_PUB, "algorithms": ["HS256"]}]}),
            "providers[0].algorithms[0]",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "public_key_pem": RSA_PUB, "algorithms": ["none"]}]}),
            "providers[0].algorithms[0]",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "hmac_secret_env": "MISSING", "algorithms": ["HS256"]}]}),
            "providers[0].hmac_secret_env",
        ),
        (json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"keys": []}}]}), "providers[0].jwks"),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "remote_jwks": {"cluster": "c", "path": "x"}}]}),
            "providers[0].remote_jwks.path",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "public_key_pem": RSA_PUB, "leeway": "5y"}]}),
            "providers[0].leeway",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "public_key_pem": RSA_PUB},
                                 {"name": "b", "issuer": "i", "public_key_pem": RSA_PUB}]}),
            "providers[1].issuer",
        ),
        (json!({"api_keys": {"keys": [{"sha256": "abc", "subject": "x"}]}}), "api_keys.keys[0].sha256"),
        (
            json!({"api_keys": {"keys": []}, "jwt_authn": {"payload_in_metadata": "p"}, "policies": {"p": {"claim": "a"}}}),
            "policies.p",
        ),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "default_policy": "x"}), "default_policy"),
        (
            json!({"jwt_authn": {"payload_in_metadata": "p"}, "claims_to_headers": {"X-User": "sub"}}),
            "claims_to_headers.X-User",
        ),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "from": [{"header": "a", "query": "b"}]}), "from[0]"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "failure_mode": "allow"}), "failure_mode"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "typo": 1}), "typo"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "require_policy": "yes"}), "require_policy"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "max_keys_per_token": 0}), "max_keys_per_token"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "max_verifies_per_second": -1}), "max_verifies_per_second"),
        (json!({"jwt_authn": {"payload_in_metadata": "p"}, "negative_cache_ttl": "soon"}), "negative_cache_ttl"),
        (
            json!({"jwt_authn": {"payload_in_metadata": "p"}, "negative_cache_max_entries": "x"}),
            "negative_cache_max_entries",
        ),
        (
            json!({"jwt_authn": {"payload_in_metadata": "p"}, "model_access": {"models_path": "v1"}}),
            "model_access.models_path",
        ),
    ];
    for (c, field) in cases {
        let e = Config::from_json(c.to_string().as_bytes(), &env).unwrap_err();
        assert_eq!(e.field, field, "{c}: {e}");
    }
    let e = Config::from_json(b"{\"providers\": 1}", &env).unwrap_err();
    assert_eq!(e.to_string(), "providers: expected a list, got a number");
}

#[test]
fn config_defaults() {
    let c = Config::from_json(br#"{"jwt_authn": {"payload_in_metadata": "p"}}"#, &env).unwrap();
    assert!(c.require_policy && c.strip_credentials);
    assert_eq!(c.limits.max_keys_per_token, 2);
    assert_eq!(c.limits.max_verifies_per_second, 200);
    assert_eq!(c.limits.negative_ttl, Duration::from_secs(30));
    assert_eq!(c.limits.negative_max_entries, 1024);
    let m = Config::from_json(
        br#"{"jwt_authn": {"payload_in_metadata": "p"}, "model_access": {"models_path": "/v1/models/"}}"#,
        &env,
    )
    .unwrap();
    assert_eq!(m.model_access.unwrap().models_path, "/v1/models");
}

#[test]
fn jwt_authn_payload_from_metadata() {
    let pl = plugin(&json!({"jwt_authn": {"payload_in_metadata": "jwt_payload"}, "require_policy": false}));
    let mut h = host(&[]);
    h.properties.insert(
        "metadata".into(),
        test_encode_metadata("envoy.filters.http.jwt_authn", &json!({"jwt_payload": alice()})),
    );
    let r = run(&pl, h);
    assert_eq!(r.act, Act::Continue);
    assert_eq!(r.h.state(keys::USER).as_deref(), Some("alice"));
    assert_eq!(r.h.state(keys::AUTH_METHOD).as_deref(), Some("jwt_authn"));
    let r = run(&pl, host(&[]));
    assert_eq!(r.error().1["error"]["message"], "Jwt is missing");
}

/// RFC 8032 section 7.1, test 1: a published Ed25519 test vector (not a secret).
const ED_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const ED_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap(), 16).unwrap()).collect()
}

fn ed_token(claims: &Value, kid: &str) -> String {
    let mut der = unhex("302e020100300506032b657004220420");
    der.extend(unhex(ED_SEED));
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    encode(&header, claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

fn ed_jwks(kid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": kid,
                                         "x": b64(&unhex(ED_PUBLIC))}]}))
    .unwrap()
}

fn remote_plugin(model_access: bool) -> AuthPlugin {
    let mut c = json!({"providers": [{"name": "idp", "issuer": "solo.io", "algorithms": ["EdDSA", "RS256"],
        "remote_jwks": {"cluster": "jwks", "path": "/jwks.json", "min_refresh_interval": "10s"}}],
        "require_policy": false});
    if model_access {
        c["model_access"] = json!({});
    }
    plugin(&c)
}

#[test]
fn remote_jwks_never_loaded_fetches_then_fails_closed() {
    let pl = remote_plugin(false);
    let token =
        format!("{}.{}.c2ln", b64(br#"{"alg":"RS256","kid":"k1"}"#), b64(br#"{"iss":"solo.io","exp":1900000000}"#));
    let mut r = run(&pl, host(&[("authorization", &bearer(&token))]));
    assert_eq!(r.act, Act::Pause);
    assert_eq!(r.h.calls.len(), 1);
    assert_eq!(r.h.calls[0].cluster, "jwks");
    r.callout("503", None);
    assert_eq!(r.error().0, 503);
    assert_eq!(r.h.resumed_requests, 0);
    // Rate-limited: the next request does not fetch again, and is refused at once.
    let r = run(&pl, host(&[("authorization", &bearer(&token))]));
    assert!(r.h.calls.is_empty());
    assert_eq!(r.error().1["error"]["code"], "jwks_unavailable");
}

#[test]
fn remote_state_keeps_keys_when_fetch_fails() {
    let cfg = config(&json!({"providers": [{"name": "idp", "issuer": "solo.io",
        "remote_jwks": {"cluster": "jwks", "path": "/jwks.json"}}]}));
    let remote = cfg.providers[0].remote.clone().unwrap();
    let mut vm = crate::verifier::VmState::new(&cfg);
    let r = &mut vm.remote[0];
    assert!(r.refresh_due(0, &remote));
    r.started(0);
    assert!(!r.refresh_due(100, &remote), "in flight");
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
        "n": "q0Gg3Brv-KPzsDZL2DMh1E4_aZnbVeduSbjoFifUN-R8emrT1Ue4YvJpUfuRIXzB1delOqsxB7XbvYR0pSFw7951NhvgHeHUustIuj0nf0bTSru_Gd0bmoNHhZtsVE6c-hDbD4XeSTsHVuyv0_YLVgkjQrYOty8Lw13cZ6X74BAeKVSO96grIdpDCLKznigPDyEYtI0w_uD0pDB7YZiC1hmXj9T9Rm82p9NYYb2cctFjT0WcjPFR0fEv6Brh-KWfY4PrtEGpNU0QEjPj4YrrnU0okdAq0Jrl9slurMqC_iIZLQyxAzoKHkXSTNY5U-dRTv6NEOnHLM94xd5-Z1WpSQ",
        "e": "AQAB"}, {"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"}]});
    let body = serde_json::to_vec(&jwks).unwrap();
    let a = r.finished(Some(200), Some(&body)).unwrap();
    assert!(a.changed && a.keys == 1 && a.skipped.len() == 1, "{a:?}");
    assert!(r.loaded && r.keys.has_kid("k1"));
    let generation = r.generation;
    assert!(!r.refresh_due(1000, &remote));
    assert!(r.refresh_due(300_000, &remote));
    r.started(300_000);
    assert!(r.finished(Some(503), None).is_err());
    assert!(r.keys.has_kid("k1"), "cached keys survive a failed refresh");
    assert!(r.finished(Some(200), Some(b"not json")).is_err());
    assert!(!r.finished(Some(200), Some(&body)).unwrap().changed, "unchanged");
    assert_eq!(r.generation, generation);
}

#[test]
fn fetch_on_demand_while_the_body_ends_with_trailers_then_model_check() {
    for trailers in [false, true] {
        let pl = remote_plugin(true);
        let route = json!({"provider": "openai"});
        let h =
            host_on("/v1/chat/completions", &[("authorization", &bearer(&ed_token(&alice(), "ed1")))], route.clone());
        let mut r = start(&pl, h, false);
        assert_eq!(r.act, Act::Pause, "waiting for the JWKS");
        assert_eq!(r.h.calls.len(), 1);
        // The body completes (END_STREAM or trailers) while the callout is out: held.
        assert_eq!(r.body(&chat_body(Some("gpt-4o-mini")), trailers), Act::Pause);
        r.callout("200", Some(ed_jwks("ed1")));
        assert!(!r.replied());
        assert_eq!(r.h.resumed_requests, 1, "trailers={trailers}");
        assert_eq!(r.h.state(keys::REQUESTED_MODEL).as_deref(), Some("gpt-4o-mini"));
        assert!(r.h.shared.contains_key("sluice.auth.jwks.idp"), "published for the other workers");

        // A model outside the claim, the fetch still out when the trailers arrive: refused.
        let pl = remote_plugin(true);
        let h =
            host_on("/v1/chat/completions", &[("authorization", &bearer(&ed_token(&alice(), "ed1")))], route.clone());
        let mut r = start(&pl, h, false);
        assert_eq!(r.body(&chat_body(Some("gpt-4o")), trailers), Act::Pause);
        r.callout("200", Some(ed_jwks("ed1")));
        assert_eq!(r.error().1["error"]["code"], "model_not_allowed", "trailers={trailers}");
        assert_eq!(r.h.resumed_requests, 0);

        // A kid the refreshed JWKS still lacks: refused, never resumed.
        let pl = remote_plugin(true);
        let h = host_on("/v1/chat/completions", &[("authorization", &bearer(&ed_token(&alice(), "other")))], route);
        let mut r = start(&pl, h, false);
        assert_eq!(r.body(&chat_body(Some("gpt-4o-mini")), trailers), Act::Pause);
        r.callout("200", Some(ed_jwks("ed1")));
        assert_eq!(r.error().1["error"]["code"], "jwt_signature");
        assert_eq!(r.h.resumed_requests, 0);
    }
}

#[test]
fn other_worker_keys_are_adopted_from_shared_data() {
    let pl = remote_plugin(false);
    let mut h = host(&[("authorization", &bearer(&ed_token(&alice(), "ed1")))]);
    h.shared.insert("sluice.auth.jwks.idp".into(), (ed_jwks("ed1"), 1));
    let r = run(&pl, h);
    assert_eq!(r.act, Act::Continue);
    assert!(r.h.calls.is_empty(), "no fetch needed");
}

#[test]
fn a_body_too_large_during_the_fetch_is_refused_once() {
    let pl = remote_plugin(true);
    let h = host_on(
        "/v1/chat/completions",
        &[("authorization", &bearer(&ed_token(&alice(), "ed1")))],
        json!({"provider": "openai"}),
    );
    let mut r = start(&pl, h, false);
    assert_eq!(r.act, Act::Pause);
    r.h.phase = Phase::RequestBody;
    assert_eq!(r.p.on_request_body(&mut r.h, 2 << 20, false), Act::Pause);
    assert_eq!(r.error().0, 413);
    r.callout("200", Some(ed_jwks("ed1")));
    assert_eq!(r.h.replies.len(), 1, "the late JWKS answer decides nothing");
    assert_eq!(r.h.resumed_requests, 0);
}

#[test]
fn root_timer_fetches_and_publishes() {
    let pl = remote_plugin(false);
    assert_eq!(pl.tick_period(), Some(crate::stage::TICK));
    let mut h =
        FakeHost { phase: Phase::Root, time: Some(UNIX_EPOCH + Duration::from_secs(NOW)), ..FakeHost::default() };
    pl.on_tick(&mut h);
    assert_eq!(h.calls.len(), 1);
    assert_eq!(h.calls[0].headers.iter().find(|(k, _)| k == ":path").unwrap().1, "/jwks.json");
    pl.on_tick(&mut h);
    assert_eq!(h.calls.len(), 1, "in flight: not again");
    let stray = sluice_core::stage::CalloutResponse { token: 99, status: Some(200), ..Default::default() };
    assert!(!pl.on_root_callout(&mut h, &stray));
    let answer = sluice_core::stage::CalloutResponse {
        token: 1,
        status: Some(200),
        body: Some(ed_jwks("ed1")),
        ..Default::default()
    };
    assert!(pl.on_root_callout(&mut h, &answer));
    assert!(pl.vm().borrow().remote[0].loaded);
    assert!(h.shared.contains_key("sluice.auth.jwks.idp"));
    // Static-key configurations need no timer.
    assert_eq!(plugin(&base_config()).tick_period(), None);
}

#[test]
fn pem_public_keys() {
    let ed_spki = {
        let mut der = unhex("302a300506032b6570032100");
        der.extend(unhex(ED_PUBLIC));
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", std_b64(&der))
    };
    let pl = plugin(
        &json!({"providers": [{"name": "ed", "issuer": "solo.io", "algorithms": ["EdDSA"], "public_key_pem": ed_spki}],
                "require_policy": false}),
    );
    let r = run(&pl, host(&[("authorization", &bearer(&ed_token(&alice(), "any")))]));
    assert_eq!(r.act, Act::Continue);
    let (family, _) = crate::pem::parse_public_pem(RSA_PUB).unwrap();
    assert_eq!(family, crate::keys::Family::Rsa);
    for bad in [
        "",
        "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----",
    ] {
        assert!(crate::pem::parse_public_pem(bad).is_err(), "{bad}");
    }
}

fn std_b64(data: &[u8]) -> String {
    b64(data).replace('-', "+").replace('_', "/")
}

/// Host-call budget: a typical model-access request (JWT, RBAC, body with a model) through
/// the pipeline with just this stage. Value-returning calls that remain, and why:
/// - 1 header map: every request header in one call (credential, identity headers, path);
/// - 2 properties on the first request of a route (route name + its whole `sluice`
///   metadata, then cached per VM), 1 on later ones (the route name);
/// - 1 body read, at the end of the body (the `model`).
///
/// Nothing else: no per-key metadata reads, no filter state read back, no header read one by
/// one, no SHA-256 on a repeated token.
#[test]
fn host_call_budget() {
    let pl = plugin(&base_config());
    let routes = Rc::new(RefCell::new(RouteCache::default()));
    let token = bearer(&mint(alice()));
    let mut totals = Vec::new();
    for _ in 0..2 {
        let h = host_on(
            "/v1/chat/completions",
            &[("authorization", &token), ("content-type", "application/json")],
            json!({"provider": "openai"}),
        );
        let mut h = CountingHost::new(h);
        let mut p = Pipeline::new(1, vec![Slot::of(&pl)], Rc::clone(&routes));
        assert_eq!(p.on_request_headers(&mut h, false), Act::Pause);
        h.inner.phase = Phase::RequestBody;
        h.inner.req_body = chat_body(Some("gpt-4o-mini"));
        let n = h.inner.req_body.len();
        assert_eq!(p.on_request_body(&mut h, n, true), Act::Continue);
        assert!(h.inner.replies.is_empty());
        assert_eq!(h.count(CallKind::HeaderMap), 1);
        assert_eq!(h.count(CallKind::Header), 0);
        assert_eq!(h.count(CallKind::Body), 1);
        totals.push(h.total());
    }
    assert_eq!(totals, [4, 3], "first request of the route, then the route cached");
}
