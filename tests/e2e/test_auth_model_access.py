"""auth filter, seed 004 (examples/model-access): per-model access from JWT claims
(`llms.<provider>`), the route's default model, /v1/models filtered per caller, API keys."""
from __future__ import annotations

import pytest

import hashlib

from harness import chat
from test_auth import alice, bearer, bob, error, keys

EXAMPLE = "examples/model-access/envoy.yaml"
MOCKS = {
    18001: {"name": "openai", "model": "gpt-4o", "models": "gpt-4o,gpt-4o-mini,gpt-3.5-turbo"},
    18002: {"name": "mistralai", "model": "mistral-large-latest",
            "models": "mistral-large-latest,open-mistral-nemo"},
}
CI_KEY = "sk-sluice-demo-ci"  # its SHA-256 is in the example config


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return sorted(m["id"] for m in resp.json()["data"])


@pytest.mark.composable
def test_seed_004_model_access(gateway, jwks_servers, tmp_path):
    key, jwks = keys(tmp_path)
    server = jwks_servers(jwks)
    gw = gateway(EXAMPLE, mocks=MOCKS, ports={18100: server.port})
    a, b = bearer(alice(key)), bearer(bob(key))

    # Each caller on their own route, with their model.
    r = gw.post("/openai", json_body=chat("recursion poem", model="gpt-4o-mini", max_tokens=128), headers=a)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gpt-4o-mini"
    r = gw.post("/mistralai", json_body=chat("recursion poem", model="open-mistral-nemo"), headers=b)
    assert r.status_code == 200, r.text

    # Each refused on the other's route (and on a model of their own provider they lack).
    for path, model, headers in (("/mistralai", "open-mistral-nemo", a), ("/openai", "gpt-4o-mini", b),
                                 ("/openai", "gpt-4o", a)):
        r = gw.post(path, json_body=chat("hi", model=model), headers=headers)
        assert r.status_code == 403, (path, model, r.text)
        err = error(r)
        assert err["code"] == "model_not_allowed"
        assert model in err["message"]

    # No model in the request: the route's default model is what is checked.
    assert gw.post("/openai", json_body=chat("hi"), headers=a).status_code == 200
    r = gw.post("/openai", json_body=chat("hi"), headers=b)
    assert r.status_code == 403 and "gpt-4o-mini" in error(r)["message"]

    # Malformed body on a model-checked route: 400, not a crash.
    r = gw.post("/openai", data=b"{not json", headers={**a, "content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"

    # /v1/models through the gateway lists only what the caller may use.
    assert ids(gw.get("/openai/v1/models", headers=a)) == ["gpt-4o-mini"]
    assert ids(gw.get("/openai/v1/models", headers=b)) == []
    assert ids(gw.get("/mistralai/v1/models", headers=b)) == ["open-mistral-nemo"]
    assert gw.get("/openai/v1/models").status_code == 401

    # Only allowed requests reached the providers.
    openai_models = gw.mocks[18001].models_seen()
    # explicit, then the route default: what auth checked is what the provider gets (never its own default)
    assert openai_models == ["gpt-4o-mini", "gpt-4o-mini"], openai_models
    assert gw.mocks[18002].models_seen() == ["open-mistral-nemo"]


@pytest.mark.composable
def test_api_key_identity(gateway, jwks_servers, tmp_path):
    key, jwks = keys(tmp_path)
    server = jwks_servers(jwks)
    gw = gateway(EXAMPLE, mocks=MOCKS, ports={18100: server.port})
    k = {"x-api-key": CI_KEY}
    r = gw.post("/openai", json_body=chat("hi", model="gpt-4o"), headers=k)
    assert r.status_code == 200, r.text
    r = gw.post("/openai", json_body=chat("hi", model="gpt-4o-mini"), headers=k)
    assert r.status_code == 403 and error(r)["code"] == "model_not_allowed"
    assert gw.post("/mistralai", json_body=chat("hi", model="open-mistral-nemo"), headers=k).status_code == 200
    assert ids(gw.get("/mistralai/v1/models", headers=k)) == ["mistral-large-latest", "open-mistral-nemo"]
    r = gw.post("/openai", json_body=chat("hi", model="gpt-4o"), headers={"x-api-key": "sk-guessed"})
    assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
    # The key never reaches the provider; the access log names the key's subject.
    for e in gw.mocks[18001].log():
        assert "x-api-key" not in {h.lower() for h in e["headers"]}
    n_ok = sum(1 for e in gw.mocks[18001].log() if e["path"].endswith("/chat/completions"))
    log = [e for e in gw.envoy.wait_access_log(lambda es: sum(e.get("http.status") == 200 for e in es) >= n_ok)
           if e.get("http.status") == 200]
    assert log and all(e["user"] == "ci-bot" and e["team"] == "platform" for e in log), log
    # A stable id of the key for per-key buckets (issue 14 §6): the first 32 hex digits of its
    # SHA-256, never the key itself.
    key_id = hashlib.sha256(CI_KEY.encode()).hexdigest()[:32]
    assert all(e["key_id"] == key_id for e in log), log
    # JWT callers have none (buckets go by user and team).
    r = gw.post("/openai", json_body=chat("hi", model="gpt-4o-mini"), headers=bearer(alice(key)))
    assert r.status_code == 200, r.text
    log = gw.envoy.wait_access_log(lambda es: any(e.get("user") == "alice" for e in es))
    assert [e["key_id"] for e in log if e.get("user") == "alice"] in ([None], ["-"]), log


def test_model_access_on_every_endpoint(gateway, jwks_servers, tmp_path):
    """The model is read from every API the gateway forwards (issue 19 §1): Responses,
    embeddings, completions, Anthropic Messages and count_tokens."""
    key, jwks = keys(tmp_path)
    gw = gateway(EXAMPLE, mocks=MOCKS, ports={18100: jwks_servers(jwks).port})
    alice_bearer = bearer(alice(key))  # llms.openai = [gpt-4o-mini]
    bodies = {
        "/openai/v1/responses": {"input": "hi"},
        "/openai/v1/embeddings": {"input": "hi"},
        "/openai/v1/completions": {"prompt": "hi"},
        "/openai/v1/messages": {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        "/openai/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}]},
    }
    for path, body in bodies.items():
        a = {**alice_bearer, "anthropic-version": "2023-06-01"} if "/messages" in path else alice_bearer
        r = gw.post(path, json_body={**body, "model": "gpt-4o"}, headers=a)
        assert r.status_code == 403, (path, r.text)
        assert error(r)["code"] == "model_not_allowed", path
        r = gw.post(path, json_body={**body, "model": "gpt-4o-mini"}, headers=a)
        assert r.status_code == 200, (path, r.text)
        # No model and no route default_model on /openai/: 400, not a pass.
        r = gw.post(path, json_body=body, headers=a)
        assert r.status_code == 400 and error(r)["code"] == "model_required", (path, r.text)
    seen = [e.get("model") for e in gw.mocks[18001].log()]
    assert seen == ["gpt-4o-mini"] * len(bodies), seen
