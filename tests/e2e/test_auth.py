"""auth filter, seed 002 (examples/jwt-rbac): JWT from a JWKS served over HTTP, RBAC on claims,
the hostile-token suite, JWKS outages and key rotation. Keys are generated per test with
scripts/mint-jwt (nothing private is committed)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import MINT as mint_jwt
from harness import ROOT, chat, wait_for

EXAMPLE = "examples/jwt-rbac/envoy.yaml"
QWEN = {18001: {"name": "qwen", "model": "qwen-0.5b"}}


def keys(tmp_path: Path, kid: str = "k1", alg: str = "RS256") -> tuple[Path, dict]:
    d = tmp_path / kid
    jwks = mint_jwt.keygen(d, kid, alg)
    return d / "private.pem", jwks


def alice(key: Path, **kw) -> str:
    return mint_jwt.mint(key, "alice", "dev", {"org": "solo.io"}, {"openai": ["gpt-4o-mini"]}, **kw)


def bob(key: Path, **kw) -> str:
    return mint_jwt.mint(key, "bob", "ops", {"org": "solo.io"}, {"mistralai": ["open-mistral-nemo"]}, **kw)


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def error(resp) -> dict:
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    return resp.json()["error"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.composable
def test_seed_002_jwt_and_rbac(gateway, jwks_servers, tmp_path):
    key, jwks = keys(tmp_path)
    ec_key, ec_jwks = keys(tmp_path, "e1", "ES256")  # the identity provider publishes RSA and EC keys
    server = jwks_servers({"keys": jwks["keys"] + ec_jwks["keys"]})
    gw = gateway(EXAMPLE, mocks=QWEN, ports={18100: server.port})

    r = gw.post("/qwen", json_body=chat("pitch a service mesh"))
    assert r.status_code == 401
    assert error(r)["message"] == "Jwt is missing"
    assert error(r)["code"] == "jwt_missing"
    assert r.headers["www-authenticate"] == "Bearer"

    # The CLI shape of seed 004's create-jwt.sh, through scripts/mint-jwt itself.
    cli = subprocess.run([str(ROOT / "scripts" / "mint-jwt"), "token", "--key", str(key), "--sub", "alice",
                          "--team", "dev", "--claim", "org=solo.io", "--llm", "openai=gpt-4o-mini"],
                         capture_output=True, text=True, check=True)
    alice_token = cli.stdout.strip()
    bob_token = bob(ec_key)  # ES256

    for token, user in ((alice_token, "alice"), (bob_token, "bob")):
        r = gw.post("/qwen", json_body=chat("hi"), headers={**bearer(token), "x-sluice-user": "mallory"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "qwen-0.5b"
    # RBAC: the dev-only route.
    r = gw.post("/qwen-dev", json_body=chat("hi"), headers=bearer(alice_token))
    assert r.status_code == 200, r.text
    r = gw.post("/qwen-dev", json_body=chat("hi"), headers=bearer(bob_token))
    assert r.status_code == 403
    assert error(r)["message"] == "RBAC: access denied"
    assert error(r)["code"] == "rbac_denied"

    # Hand-off: the upstream saw no client credential and the verified identity headers
    # (the client's forged x-sluice-user was replaced).
    seen = [e for e in gw.mocks[18001].log() if e["path"].endswith("/chat/completions")]
    assert len(seen) == 3
    for e in seen:
        headers = {k.lower(): v for k, v in e["headers"].items()}
        assert "authorization" not in headers, headers
    users = [{k.lower(): v for k, v in e["headers"].items()}["x-sluice-user"] for e in seen]
    assert users == ["alice", "bob", "alice"]
    # Filter state reaches the access log.
    log = [e for e in gw.envoy.wait_access_log(lambda es: len([e for e in es if e.get("path") == "/qwen-dev"]) >= 2)
           if e.get("path") == "/qwen-dev"]
    assert {(e["user"], e["team"], e["http.status"]) for e in log} == {("alice", "dev", 200), ("bob", "ops", 403)}
    # Decisions are counted (Prometheus labels from the embedded tags).
    wait_for(lambda: 'sluice_auth_decisions{sluice_action="deny",sluice_reason="rbac"} 1' in gw.envoy.prometheus(),
             10, "auth metrics")
    prom = gw.envoy.prometheus()
    assert 'sluice_auth_decisions{sluice_action="deny",sluice_reason="missing"} 1' in prom
    assert 'sluice_auth_decisions{sluice_action="allow",sluice_reason="jwt"} 3' in prom


def _raw_request(gw, headers: list[tuple[str, str]]) -> tuple[int, dict]:
    """A request with repeated headers (requests merges them)."""
    port = int(gw.base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps(chat("hi")).encode()
    conn.putrequest("POST", "/qwen")
    for k, v in headers + [("content-type", "application/json"), ("content-length", str(len(body)))]:
        conn.putheader(k, v)
    conn.endheaders(body)
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, data


@pytest.mark.composable
def test_hostile_tokens(gateway, jwks_servers, tmp_path):
    key, jwks = keys(tmp_path)
    other_key, _ = keys(tmp_path, "k-other")
    server = jwks_servers(jwks)
    gw = gateway(EXAMPLE, mocks=QWEN, ports={18100: server.port})
    good = alice(key)
    h, p, s = good.split(".")
    public_pem = (key.parent / "public.pem").read_bytes()

    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    none_token = b64(b'{"alg":"none","typ":"JWT"}') + "." + p + "."
    # HS256 keyed with the RSA public key (the classic algorithm-confusion attack).
    hs_head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    hs_sig = b64(hmac.new(public_pem, f"{hs_head}.{p}".encode(), hashlib.sha256).digest())
    confused = f"{hs_head}.{p}.{hs_sig}"
    tampered = f"{h}.{b64(json.dumps({**claims, 'team': 'admins'}).encode())}.{s}"

    cases = [
        ("alg none", none_token, "algorithm"),
        ("HS256 with the RSA public key", confused, "algorithm"),
        ("unknown kid", mint_jwt.mint(other_key, "alice", "dev", kid="k-unknown"), "signature"),
        ("signed by another key, same kid", mint_jwt.mint(other_key, "alice", "dev", kid="k1"), "signature"),
        ("expired", alice(key, exp=-3600), "expired"),
        ("nbf in the future", alice(key, nbf=3600), "not yet valid"),
        ("wrong issuer", alice(key, iss="evil.example"), "issuer"),
        ("wrong audience", alice(key, aud="another-api"), "audience"),
        ("payload tampered after signing", tampered, "signature"),
        # Cut so the signature's length is 1 mod 4, which no base64 encoding has: always malformed.
        # (A cut leaving a legal length decodes 1 time in 16 and is then, correctly, `signature`.)
        ("truncated", good[: len(good) - (12 + (len(s) - 12 - 1) % 4)], "malformed"),
        ("truncated to two parts", f"{h}.{p}", "malformed"),
        ("10 KB of garbage", "A" * 10_240, "malformed"),
        ("non-base64 characters", f"{h}.{p}$%!.{s}", "malformed"),
    ]
    for name, token, cls in cases:
        r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(token))
        assert r.status_code == 401, (name, r.status_code, r.text)
        err = error(r)
        assert err["message"] == f"Jwt verification fails: {cls}", (name, err)
        assert "BEGIN" not in r.text and "panicked" not in r.text, name
    # Two Authorization headers, and malformed schemes.
    status, body = _raw_request(gw, [("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")])
    assert status == 401 and body["error"]["message"] == "Jwt verification fails: malformed", body
    for value in ("Basic YWxpY2U6c2VjcmV0", "Bearer", f"Token {good}"):
        status, body = _raw_request(gw, [("authorization", value)])
        assert status == 401 and body["error"]["code"] == "jwt_malformed", (value, body)
    # The gateway is still healthy and the good token still works; nothing reached the model.
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(good))
    assert r.status_code == 200, r.text
    assert len(gw.mocks[18001].log()) == 1


def test_jwks_down_at_start_fails_closed_then_recovers(gateway, jwks_servers, tmp_path):
    key, jwks = keys(tmp_path)
    server = jwks_servers(jwks, start=False)  # port reserved, nothing listening
    gw = gateway(EXAMPLE, mocks=QWEN, ports={18100: server.port})
    token = alice(key)
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(token))
    assert r.status_code == 503, r.text
    assert error(r)["code"] == "jwks_unavailable"
    assert len(gw.mocks[18001].log()) == 0
    # The identity provider comes back: the next fetch (rate-limited to one per 2s) loads it.
    server.start()

    def ok():
        return gw.post("/qwen", json_body=chat("hi"), headers=bearer(token)).status_code == 200

    wait_for(ok, 20, "JWKS recovery", interval=0.5)


def test_jwks_down_after_fetch_keeps_cached_keys_and_rotation(gateway, jwks_servers, tmp_path):
    key1, jwks1 = keys(tmp_path, "k1")
    key2, jwks2 = keys(tmp_path, "k2")
    server = jwks_servers(jwks1)
    gw = gateway(EXAMPLE, mocks=QWEN, ports={18100: server.port})
    assert gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(key1))).status_code == 200
    server.stop()
    # New tokens (never cached) signed with the known key keep working while the JWKS is down.
    for _ in range(4):
        r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(bob(key1)))
        assert r.status_code == 200, r.text
        time.sleep(0.3)
    # A token signed with a key the gateway has never seen is refused (the refresh fails).
    rotated = alice(key2)
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(rotated))
    assert r.status_code == 401 and error(r)["message"] == "Jwt verification fails: signature"
    # Rotation: the identity provider publishes k2 (and still k1); no Envoy restart.
    server.jwks = {"keys": jwks1["keys"] + jwks2["keys"]}
    server.start()

    def accepted():
        return gw.post("/qwen", json_body=chat("hi"), headers=bearer(rotated)).status_code == 200

    wait_for(accepted, 20, "rotated key accepted", interval=0.5)
    assert gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(key1))).status_code == 200


def test_bad_config_refuses_to_start(gateway, tmp_path):
    text = (ROOT / EXAMPLE).read_text().replace('"issuer": "solo.io"', '"issuer": ""')
    cfg = tmp_path / "bad" / "envoy.yaml"
    cfg.parent.mkdir()
    cfg.write_text(text)
    with pytest.raises(RuntimeError) as exc:
        gateway(str(cfg), mocks=QWEN)
    assert "auth: invalid config: providers[0].issuer: empty" in str(exc.value)


JWT_AUTHN_FILTERS = """          http_filters:
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                solo:
                  issuer: solo.io
                  local_jwks: { inline_string: '%s' }
                  payload_in_metadata: jwt_payload
              rules:
              - match: { prefix: "/" }
                requires: { requires_any: { requirements: [ { provider_name: solo }, { allow_missing: {} } ] } }
          - name: sluice.auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: auth
                root_id: auth
                allow_on_headers_stop_iteration: true
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: sluice-auth
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: target/wasm32-wasip1/release/sluice_auth.wasm } }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"jwt_authn": {"payload_in_metadata": "jwt_payload"},
                           "claims_to_headers": {"x-sluice-user": "sub"},
                           "policies": {"dev-only": {"all": [{"claim": "org", "equals": "solo.io"},
                                                              {"claim": "team", "equals": "dev"}]}}}'
"""


def test_jwt_authn_payload_in_metadata(gateway, tmp_path):
    """Envoy's own jwt_authn verifies; sluice auth reads the payload from dynamic metadata
    (property path metadata.filter_metadata.envoy.filters.http.jwt_authn.jwt_payload)."""
    key, jwks = keys(tmp_path)
    text = (ROOT / EXAMPLE).read_text()
    head = text[: text.index("          http_filters:")]
    tail = text[text.index("          - name: envoy.filters.http.router"):]
    cfg = tmp_path / "jwt-authn" / "envoy.yaml"
    cfg.parent.mkdir()
    cfg.write_text(head + JWT_AUTHN_FILTERS % json.dumps(jwks) + tail)
    gw = gateway(str(cfg), mocks=QWEN)

    r = gw.post("/qwen", json_body=chat("hi"))
    assert r.status_code == 401 and error(r)["message"] == "Jwt is missing"
    r = gw.post("/qwen-dev", json_body=chat("hi"), headers=bearer(alice(key)))
    assert r.status_code == 200, r.text
    r = gw.post("/qwen-dev", json_body=chat("hi"), headers=bearer(bob(key)))
    assert r.status_code == 403 and error(r)["message"] == "RBAC: access denied"
    # jwt_authn itself refuses a bad token before sluice runs.
    assert gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(key, exp=-3600))).status_code == 401
    seen = [{k.lower(): v for k, v in e["headers"].items()} for e in gw.mocks[18001].log()]
    assert [h.get("x-sluice-user") for h in seen] == ["alice"]
    log = wait_for(lambda: [e for e in gw.envoy.access_log() if e.get("http.status") == 200] or None, 10, "access log")
    assert log[0]["user"] == "alice"


def test_pem_keys_several_issuers_and_audiences(gateway, tmp_path):
    """Two issuers at once, keys as PEM public keys (RSA and EC P-256), one with audiences."""
    rsa_key, _ = keys(tmp_path, "r1", "RS256")
    ec_key, _ = keys(tmp_path, "e1", "ES256")
    providers = [
        {"name": "corp", "issuer": "corp.example", "algorithms": ["RS256"], "audiences": ["sluice"],
         "public_key_pem": (rsa_key.parent / "public.pem").read_text()},
        {"name": "partner", "issuer": "partner.example", "algorithms": ["ES256"],
         "public_key_pem": (ec_key.parent / "public.pem").read_text()},
    ]
    text = (ROOT / EXAMPLE).read_text()
    start = text.index('                      "providers": [')
    end = text.index('                      "claims_to_filter_state"')
    sources = [{"header": "authorization", "prefix": "Bearer "}, {"query": "access_token"}, {"cookie": "jwt"}]
    conf = "                      " + json.dumps({"providers": providers, "from": sources})[1:-1] + ",\n"
    cfg = tmp_path / "pem" / "envoy.yaml"
    cfg.parent.mkdir()
    cfg.write_text(text[:start] + conf + text[end:])
    gw = gateway(str(cfg), mocks=QWEN)

    def status(token: str) -> int:
        return gw.post("/qwen-dev", json_body=chat("hi"), headers=bearer(token)).status_code

    assert status(alice(rsa_key, iss="corp.example", aud="sluice", kid="r1")) == 200
    assert status(alice(ec_key, iss="partner.example", kid="e1")) == 200
    assert status(bob(ec_key, iss="partner.example", kid="e1")) == 403  # RBAC still applies
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(rsa_key, iss="corp.example", kid="r1")))
    assert r.status_code == 401 and error(r)["message"] == "Jwt verification fails: audience"
    # A token from one issuer signed with the other issuer's key.
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(ec_key, iss="corp.example", aud="sluice")))
    assert r.status_code == 401 and error(r)["message"] == "Jwt verification fails: algorithm"
    r = gw.post("/qwen", json_body=chat("hi"), headers=bearer(alice(rsa_key, iss="nobody.example")))
    assert r.status_code == 401 and error(r)["message"] == "Jwt verification fails: issuer"
    # Other token sources: query parameter and cookie, stripped before the request leaves.
    token = alice(ec_key, iss="partner.example", kid="e1")
    assert gw.post(f"/qwen-dev?x=1&access_token={token}", json_body=chat("hi")).status_code == 200
    assert gw.post("/qwen-dev", json_body=chat("hi"), headers={"cookie": f"theme=dark; jwt={token}"}).status_code == 200
    seen = gw.mocks[18001].log()[-2:]
    assert "access_token" not in json.dumps(seen), seen
    assert "jwt=" not in json.dumps(seen), seen
