//! Fake-host tests of the whole request flow (HS256 tokens minted here; RSA/EC/JWKS paths
//! are also covered end to end with keys the e2e tests generate).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use crate::config::Config;
use crate::flow::{AuthFlow, Step};
use crate::jwks::VmState;
use crate::jwt::{self, Failure};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_core::host::{FakeHost, Host};
use sluice_core::keys;
use std::cell::RefCell;
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

fn config(v: &Value) -> Rc<Config> {
    Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap())
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

fn host(headers: &[(&str, &str)]) -> FakeHost {
    let mut base = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
    base.extend_from_slice(headers);
    let mut h = FakeHost::with_request_headers(&base);
    h.time = Some(UNIX_EPOCH + Duration::from_secs(NOW));
    h
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

struct Run {
    flow: AuthFlow,
    h: FakeHost,
    step: Step,
}

fn run_with(cfg: &Rc<Config>, vm: &Rc<RefCell<VmState>>, mut h: FakeHost, eos: bool) -> Run {
    let mut flow = AuthFlow::new(cfg.clone(), vm.clone());
    let step = flow.on_request_headers(&mut h, eos);
    Run { flow, h, step }
}

fn run(cfg: &Rc<Config>, h: FakeHost) -> Run {
    let vm = Rc::new(RefCell::new(VmState::new(cfg)));
    run_with(cfg, &vm, h, true)
}

fn error_of(h: &FakeHost) -> (u32, Value) {
    let r = h.replies.last().expect("a reply");
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

#[test]
fn missing_token_is_401_with_www_authenticate() {
    let cfg = config(&base_config());
    let r = run(&cfg, host(&[]));
    assert_eq!(r.step, Step::Replied);
    let (status, body) = error_of(&r.h);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["message"], "Jwt is missing");
    assert!(r.h.replies[0].headers.contains(&("www-authenticate".into(), "Bearer".into())));
}

#[test]
fn valid_token_hands_off_identity_and_strips_credential() {
    let cfg = config(&base_config());
    let r = run(&cfg, host(&[("authorization", &bearer(&mint(alice()))), ("x-sluice-user", "mallory")]));
    assert_eq!(r.step, Step::Continue);
    assert!(r.h.replies.is_empty());
    assert_eq!(r.h.prop(&[keys::USER]).as_deref(), Some("alice"));
    assert_eq!(r.h.prop(&[keys::TEAM]).as_deref(), Some("dev"));
    assert_eq!(r.h.prop(&[keys::AUTH_METHOD]).as_deref(), Some("jwt"));
    assert_eq!(r.h.prop(&[&keys::claim_key("org")]).as_deref(), Some("solo.io"));
    assert_eq!(r.h.req_header("x-sluice-user").as_deref(), Some("alice"));
    assert_eq!(r.h.req_header("authorization"), None);
}

#[test]
fn route_can_keep_credentials() {
    let cfg = config(&base_config());
    let mut h = host(&[("authorization", &bearer(&mint(alice())))]);
    h.set_prop(&keys::route_metadata_path("auth_keep_credentials"), "true");
    let r = run(&cfg, h);
    assert_eq!(r.step, Step::Continue);
    assert!(r.h.req_header("authorization").is_some());
}

#[test]
fn refusal_classes() {
    let cfg = config(&base_config());
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
    let hs_with_rsa_pub = {
        // Classic confusion: HS256 keyed with the RSA public key, sent to an RS256 provider.
        encode(&Header::new(Algorithm::HS256), &alice(), &EncodingKey::from_secret(RSA_PUB.as_bytes())).unwrap()
    };
    let cases: Vec<(String, Failure, &Rc<Config>)> = vec![
        (mint(expired), Failure::Expired, &cfg),
        (mint(future), Failure::NotYetValid, &cfg),
        (mint(iat_future), Failure::NotYetValid, &cfg),
        (mint(wrong_iss), Failure::Issuer, &cfg),
        (mint(with_aud), Failure::Audience, &cfg),
        (mint(no_exp), Failure::Malformed, &cfg),
        (tampered, Failure::Signature, &cfg),
        (none_token, Failure::Algorithm, &cfg),
        (good.get(..good.len() - 10).unwrap().to_string(), Failure::Malformed, &cfg),
        ("a.b".into(), Failure::Malformed, &cfg),
        ("x".repeat(10_000), Failure::Malformed, &cfg),
        ("ab$%.cd!.ef".into(), Failure::Malformed, &cfg),
    ];
    for (token, want, cfg) in cases {
        let r = run(cfg, host(&[("authorization", &bearer(&token))]));
        assert_eq!(r.step, Step::Replied, "{want:?}");
        let (status, body) = error_of(&r.h);
        assert_eq!(status, 401, "{want:?} {body}");
        assert_eq!(body["error"]["message"], format!("Jwt verification fails: {}", want.class()), "{want:?}");
        assert_eq!(body["error"]["code"], want.code());
    }
    let r = run(&cfg, host(&[("authorization", &bearer(&mint(within_leeway)))]));
    assert_eq!(r.step, Step::Continue);

    let rsa_cfg = config(&json!({"providers": [{"name": "rsa", "issuer": "solo.io", "public_key_pem": RSA_PUB}]}));
    let r = run(&rsa_cfg, host(&[("authorization", &bearer(&hs_with_rsa_pub))]));
    let (status, body) = error_of(&r.h);
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
    let cfg = config(&base_config());
    let t = bearer(&mint(alice()));
    for headers in [
        vec![("authorization", t.as_str()), ("authorization", t.as_str())],
        vec![("authorization", "Basic YWxpY2U6cHc=")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer ")],
    ] {
        let r = run(&cfg, host(&headers));
        let (status, body) = error_of(&r.h);
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(body["error"]["code"], "jwt_malformed", "{headers:?}");
    }
}

#[test]
fn rbac_policy_from_route_metadata() {
    let cfg = config(&base_config());
    for (claims, want) in [(alice(), Step::Continue), (bob(), Step::Replied)] {
        let mut h = host(&[("authorization", &bearer(&mint(claims)))]);
        h.set_prop(&keys::route_metadata_path("auth_policy"), "dev-only");
        let r = run(&cfg, h);
        assert_eq!(r.step, want);
        if want == Step::Replied {
            let (status, body) = error_of(&r.h);
            assert_eq!(status, 403);
            assert_eq!(body["error"]["message"], "RBAC: access denied");
        }
    }
    // A route naming an unknown policy fails closed.
    let mut h = host(&[("authorization", &bearer(&mint(alice())))]);
    h.set_prop(&keys::route_metadata_path("auth_policy"), "nope");
    let r = run(&cfg, h);
    assert_eq!(error_of(&r.h).0, 500);
}

fn chat_body(model: Option<&str>) -> Vec<u8> {
    let mut v = json!({"messages": [{"role": "user", "content": "hi"}]});
    if let Some(m) = model {
        v["model"] = json!(m);
    }
    serde_json::to_vec(&v).unwrap()
}

fn model_run(claims: Value, provider: &str, model: Option<&str>, default_model: Option<&str>) -> Run {
    let cfg = config(&base_config());
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut h = host(&[("authorization", &bearer(&mint(claims)))]);
    h.set_prop(&keys::route_metadata_path("provider"), provider);
    if let Some(d) = default_model {
        h.set_prop(&keys::route_metadata_path("default_model"), d);
    }
    let mut r = run_with(&cfg, &vm, h, false);
    assert_eq!(r.step, Step::Pause, "body needed");
    r.h.req_body = chat_body(model);
    let n = r.h.req_body.len();
    r.step = r.flow.on_request_body(&mut r.h, n, true);
    r
}

#[test]
fn model_access_per_provider() {
    let r = model_run(alice(), "openai", Some("gpt-4o-mini"), None);
    assert_eq!(r.step, Step::Continue);
    assert_eq!(r.h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("gpt-4o-mini"));
    let r = model_run(alice(), "mistralai", Some("open-mistral-nemo"), None);
    assert_eq!(r.step, Step::Replied);
    let (status, body) = error_of(&r.h);
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert!(body["error"]["message"].as_str().unwrap().contains("open-mistral-nemo"));
    let r = model_run(bob(), "mistralai", Some("open-mistral-nemo"), None);
    assert_eq!(r.step, Step::Continue);
    // No model in the request: the route's default decides.
    let r = model_run(alice(), "openai", None, Some("gpt-4o-mini"));
    assert_eq!(r.step, Step::Continue);
    let r = model_run(alice(), "openai", None, Some("gpt-4o"));
    assert_eq!(error_of(&r.h).1["error"]["code"], "model_not_allowed");
    let r = model_run(alice(), "openai", None, None);
    assert_eq!(error_of(&r.h).0, 400);
}

#[test]
fn model_access_body_errors() {
    let cfg = config(&base_config());
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut h = host(&[("authorization", &bearer(&mint(alice())))]);
    h.set_prop(&keys::route_metadata_path("provider"), "openai");
    let mut r = run_with(&cfg, &vm, h.clone(), false);
    r.h.req_body = b"{not json".to_vec();
    assert_eq!(r.flow.on_request_body(&mut r.h, 9, true), Step::Replied);
    assert_eq!(error_of(&r.h).0, 400);
    let mut r = run_with(&cfg, &vm, h, false);
    assert_eq!(r.flow.on_request_body(&mut r.h, 2 << 20, false), Step::Replied);
    assert_eq!(error_of(&r.h).0, 413);
}

#[test]
fn models_list_is_filtered() {
    let cfg = config(&base_config());
    let mut h = host(&[("authorization", &bearer(&mint(alice())))]);
    h.set_request_header(":method", Some(b"GET"));
    h.set_request_header(":path", Some(b"/openai/v1/models"));
    h.set_prop(&keys::route_metadata_path("provider"), "openai");
    let mut r = run(&cfg, h);
    assert_eq!(r.step, Step::Continue);
    r.h.resp_headers = vec![(":status".into(), b"200".to_vec()), ("content-length".into(), b"99".to_vec())];
    r.flow.on_response_headers(&mut r.h);
    assert_eq!(r.h.resp_header("content-length"), None);
    r.h.resp_body = serde_json::to_vec(&json!({"object": "list", "data": [
        {"id": "gpt-4o", "object": "model"}, {"id": "gpt-4o-mini", "object": "model"}]}))
    .unwrap();
    assert_eq!(r.flow.on_response_body(&mut r.h, 10, false), Step::Pause);
    let n = r.h.resp_body.len();
    assert_eq!(r.flow.on_response_body(&mut r.h, n, true), Step::Continue);
    let v: Value = serde_json::from_slice(&r.h.resp_body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "gpt-4o-mini");
}

#[test]
fn api_keys_work_like_tokens() {
    let cfg = config(&base_config());
    let r = run(&cfg, host(&[("x-api-key", "sk-ci-123")]));
    assert_eq!(r.step, Step::Continue);
    assert_eq!(r.h.prop(&[keys::USER]).as_deref(), Some("ci-bot"));
    assert_eq!(r.h.prop(&[keys::TEAM]).as_deref(), Some("ops"));
    assert_eq!(r.h.prop(&[keys::AUTH_METHOD]).as_deref(), Some("api_key"));
    assert_eq!(r.h.req_header("x-api-key"), None);
    let r = run(&cfg, host(&[("x-api-key", "sk-wrong")]));
    let (status, body) = error_of(&r.h);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // RBAC sees the key's claims: team ops is not dev.
    let mut h = host(&[("x-api-key", "sk-ci-123")]);
    h.set_prop(&keys::route_metadata_path("auth_policy"), "dev-only");
    assert_eq!(error_of(&run(&cfg, h).h).0, 403);
}

#[test]
fn token_sources_query_and_cookie() {
    let mut c = base_config();
    c["from"] = json!([{"query": "access_token"}, {"cookie": "jwt"}]);
    let cfg = config(&c);
    let t = mint(alice());
    let mut h = host(&[]);
    h.set_request_header(":path", Some(format!("/v1/chat/completions?a=1&access_token={t}&b=2").as_bytes()));
    let r = run(&cfg, h);
    assert_eq!(r.step, Step::Continue);
    assert_eq!(r.h.req_header(":path").as_deref(), Some("/v1/chat/completions?a=1&b=2"));
    let r = run(&cfg, host(&[("cookie", &format!("a=1; jwt={t}; b=2"))]));
    assert_eq!(r.step, Step::Continue);
    assert_eq!(r.h.req_header("cookie").as_deref(), Some("a=1; b=2"));
}

#[test]
fn cache_serves_repeats_and_respects_exp() {
    let cfg = config(&base_config());
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut c = alice();
    c["exp"] = json!(NOW + 10);
    let t = mint(c);
    let r = run_with(&cfg, &vm, host(&[("authorization", &bearer(&t))]), true);
    assert_eq!(r.step, Step::Continue);
    assert_eq!(vm.borrow().cache.len(), 1);
    let r = run_with(&cfg, &vm, host(&[("authorization", &bearer(&t))]), true);
    assert_eq!(r.step, Step::Continue);
    // Past exp (beyond the leeway) the cached entry is not used and the token is refused.
    let mut h = host(&[("authorization", &bearer(&t))]);
    h.time = Some(UNIX_EPOCH + Duration::from_secs(NOW + 100));
    let r = run_with(&cfg, &vm, h, true);
    assert_eq!(error_of(&r.h).1["error"]["code"], "jwt_expired");
}

fn remote_config() -> Rc<Config> {
    config(&json!({"providers": [{"name": "idp", "issuer": "solo.io", "algorithms": ["RS256"],
        "remote_jwks": {"cluster": "jwks", "path": "/jwks.json", "min_refresh_interval": "10s"}}]}))
}

#[test]
fn remote_jwks_never_loaded_fetches_then_fails_closed() {
    let cfg = remote_config();
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let token =
        format!("{}.{}.c2ln", b64(br#"{"alg":"RS256","kid":"k1"}"#), b64(br#"{"iss":"solo.io","exp":1900000000}"#));
    let mut r = run_with(&cfg, &vm, host(&[("authorization", &bearer(&token))]), true);
    assert_eq!(r.step, Step::Pause);
    assert_eq!(r.h.calls.len(), 1);
    assert_eq!(r.h.calls[0].cluster, "jwks");
    let step = r.flow.on_jwks_response(&mut r.h, Some(503), None);
    assert_eq!(step, Step::Replied);
    assert_eq!(error_of(&r.h).0, 503);
    // Rate-limited: the next request does not fetch again, and is refused at once.
    let r = run_with(&cfg, &vm, host(&[("authorization", &bearer(&token))]), true);
    assert_eq!(r.step, Step::Replied);
    assert!(r.h.calls.is_empty());
    assert_eq!(error_of(&r.h).1["error"]["code"], "jwks_unavailable");
}

#[test]
fn remote_state_keeps_keys_when_fetch_fails() {
    let cfg = remote_config();
    let remote = cfg.providers[0].remote.clone().unwrap();
    let mut vm = VmState::new(&cfg);
    let r = &mut vm.remote[0];
    assert!(r.refresh_due(0, &remote));
    r.started(0);
    assert!(!r.refresh_due(100, &remote), "in flight");
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
        "n": "q0Gg3Brv-KPzsDZL2DMh1E4_aZnbVeduSbjoFifUN-R8emrT1Ue4YvJpUfuRIXzB1delOqsxB7XbvYR0pSFw7951NhvgHeHUustIuj0nf0bTSru_Gd0bmoNHhZtsVE6c-hDbD4XeSTsHVuyv0_YLVgkjQrYOty8Lw13cZ6X74BAeKVSO96grIdpDCLKznigPDyEYtI0w_uD0pDB7YZiC1hmXj9T9Rm82p9NYYb2cctFjT0WcjPFR0fEv6Brh-KWfY4PrtEGpNU0QEjPj4YrrnU0okdAq0Jrl9slurMqC_iIZLQyxAzoKHkXSTNY5U-dRTv6NEOnHLM94xd5-Z1WpSQ",
        "e": "AQAB"}]});
    let body = serde_json::to_vec(&jwks).unwrap();
    assert_eq!(r.finished(Some(200), Some(&body)), Ok(true));
    assert!(r.loaded && r.keys.has_kid("k1"));
    let generation = r.generation;
    assert!(!r.refresh_due(1000, &remote));
    assert!(r.refresh_due(300_000, &remote));
    r.started(300_000);
    assert!(r.finished(Some(503), None).is_err());
    assert!(r.keys.has_kid("k1"), "cached keys survive a failed refresh");
    assert_eq!(r.finished(Some(200), Some(b"not json")).map_err(|_| ()), Err(()));
    assert_eq!(r.finished(Some(200), Some(&body)), Ok(false), "unchanged");
    assert_eq!(r.generation, generation);
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
    ];
    for (c, field) in cases {
        let e = Config::from_json(c.to_string().as_bytes(), &env).unwrap_err();
        assert_eq!(e.field, field, "{c}: {e}");
    }
}

#[test]
fn jwt_authn_payload_from_metadata() {
    let cfg = config(&json!({"jwt_authn": {"payload_in_metadata": "jwt_payload"}, "model_access": {}}));
    let mut h = host(&[]);
    h.properties.insert("metadata".into(), metadata_bytes(&alice()));
    let r = run(&cfg, h);
    assert_eq!(r.step, Step::Continue);
    assert_eq!(r.h.prop(&[keys::USER]).as_deref(), Some("alice"));
    assert_eq!(r.h.prop(&[keys::AUTH_METHOD]).as_deref(), Some("jwt_authn"));
    let r = run(&cfg, host(&[]));
    assert_eq!(error_of(&r.h).1["error"]["message"], "Jwt is missing");
}

/// A serialized envoy.config.core.v3.Metadata holding `payload` where jwt_authn puts it.
fn metadata_bytes(payload: &Value) -> Vec<u8> {
    fn ld(field: u8, data: &[u8], out: &mut Vec<u8>) {
        out.push(field << 3 | 2);
        let mut n = data.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(data);
    }
    fn value(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        match v {
            Value::String(s) => ld(3, s.as_bytes(), &mut o),
            Value::Number(n) => {
                o.push(2 << 3 | 1);
                o.extend_from_slice(&n.as_f64().unwrap().to_bits().to_le_bytes());
            }
            Value::Array(a) => {
                let mut l = Vec::new();
                for x in a {
                    ld(1, &value(x), &mut l);
                }
                ld(6, &l, &mut o);
            }
            Value::Object(_) => ld(5, &structure(v), &mut o),
            _ => {}
        }
        o
    }
    fn structure(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        for (k, x) in v.as_object().unwrap() {
            let mut e = Vec::new();
            ld(1, k.as_bytes(), &mut e);
            ld(2, &value(x), &mut e);
            ld(1, &e, &mut o);
        }
        o
    }
    let mut entry = Vec::new();
    ld(1, b"envoy.filters.http.jwt_authn", &mut entry);
    ld(2, &structure(&json!({"jwt_payload": payload})), &mut entry);
    let mut md = Vec::new();
    ld(1, &entry, &mut md);
    md
}

/// RFC 8032 section 7.1, test 1: a published Ed25519 test vector (not a secret).
const ED_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const ED_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
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

fn ed_remote_config() -> Rc<Config> {
    config(&json!({"providers": [{"name": "idp", "issuer": "solo.io", "algorithms": ["EdDSA"],
        "remote_jwks": {"cluster": "jwks", "path": "/jwks.json", "min_refresh_interval": "10s"}}],
        "model_access": {}}))
}

#[test]
fn fetch_on_demand_while_body_arrives_then_model_check() {
    let cfg = ed_remote_config();
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut h = host(&[("authorization", &bearer(&ed_token(&alice(), "ed1")))]);
    h.set_prop(&keys::route_metadata_path("provider"), "openai");
    let mut r = run_with(&cfg, &vm, h, false);
    assert_eq!(r.step, Step::Pause, "waiting for the JWKS");
    assert_eq!(r.h.calls.len(), 1);
    // The body completes while the callout is outstanding: held, not decided.
    r.h.req_body = chat_body(Some("gpt-4o-mini"));
    let n = r.h.req_body.len();
    assert_eq!(r.flow.on_request_body(&mut r.h, n, true), Step::Pause);
    let step = r.flow.on_jwks_response(&mut r.h, Some(200), Some(ed_jwks("ed1")));
    assert_eq!(step, Step::Continue);
    assert!(r.h.replies.is_empty());
    assert_eq!(r.h.prop(&[keys::REQUESTED_MODEL]).as_deref(), Some("gpt-4o-mini"));
    // Published for the other workers.
    assert!(r.h.shared.contains_key("sluice.auth.jwks.idp"));

    // Same, but the model is not allowed: the decision after the callout is a 403.
    let mut h = host(&[("authorization", &bearer(&ed_token(&bob(), "ed1")))]);
    h.set_prop(&keys::route_metadata_path("provider"), "openai");
    let mut r = run_with(&cfg, &vm, h, false);
    assert_eq!(r.step, Step::Pause, "keys loaded: the body is needed");
    assert!(r.h.calls.is_empty());
    r.h.req_body = chat_body(Some("gpt-4o-mini"));
    let n = r.h.req_body.len();
    assert_eq!(r.flow.on_request_body(&mut r.h, n, true), Step::Replied);
    assert_eq!(error_of(&r.h).1["error"]["code"], "model_not_allowed");
}

#[test]
fn other_worker_keys_are_adopted_from_shared_data() {
    let cfg = ed_remote_config();
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut h = host(&[("authorization", &bearer(&ed_token(&alice(), "ed1")))]);
    h.shared.insert("sluice.auth.jwks.idp".into(), (ed_jwks("ed1"), 1));
    let r = run_with(&cfg, &vm, h, true);
    assert_eq!(r.step, Step::Continue);
    assert!(r.h.calls.is_empty(), "no fetch needed");
}

#[test]
fn reply_during_fetch_is_not_doubled() {
    let cfg = ed_remote_config();
    let vm = Rc::new(RefCell::new(VmState::new(&cfg)));
    let mut h = host(&[("authorization", &bearer(&ed_token(&alice(), "ed1")))]);
    h.set_prop(&keys::route_metadata_path("provider"), "openai");
    let mut r = run_with(&cfg, &vm, h, false);
    assert_eq!(r.step, Step::Pause);
    assert_eq!(r.flow.on_request_body(&mut r.h, 2 << 20, false), Step::Replied);
    assert_eq!(r.flow.pending_call(), None);
    assert_eq!(r.flow.on_jwks_response(&mut r.h, Some(200), Some(ed_jwks("ed1"))), Step::Replied);
    assert_eq!(r.h.replies.len(), 1);
}

#[test]
fn pem_public_keys() {
    let ed_spki = {
        let mut der = unhex("302a300506032b6570032100");
        der.extend(unhex(ED_PUBLIC));
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", std_b64(&der))
    };
    let cfg = config(
        &json!({"providers": [{"name": "ed", "issuer": "solo.io", "algorithms": ["EdDSA"], "public_key_pem": ed_spki}]}),
    );
    let r = run(&cfg, host(&[("authorization", &bearer(&ed_token(&alice(), "any")))]));
    assert_eq!(r.step, Step::Continue);
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
