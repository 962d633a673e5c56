"""No request reaches a provider unchecked (issue 13 §1), on the full demo gateway: over
HTTP/1.1, HTTP/2, and HTTP/2 whose body ends with a trailers frame instead of END_STREAM,
every refusal is the same and the providers see nothing; an allowed request ending with
trailers is served with every check applied (enriched, budget charged, usage counted)."""
from __future__ import annotations

import pytest

from harness import chat
from suite import DEMO, SEPARATE, TRANSPORTS, Suite


@pytest.fixture(params=[DEMO, SEPARATE], ids=["composed", "separate"])
def suite(request, workdir):
    s = Suite(workdir, request.param)
    yield s
    s.stop()


def alice(s: Suite) -> dict:
    return {"authorization": "Bearer " + s.token("alice", "dev", {"openai": ["gpt-4o-mini"]})}


def provider_requests(s: Suite) -> list:
    return [e for m in (s.openai, s.local) for e in m.log() if e["path"].endswith("/completions")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refusals_are_the_same_on_every_transport(suite, transport):
    a = alice(suite)
    cases = [
        # (why, path, body, headers, status, code)
        ("guarded prompt", "/v1/chat/completions", chat("What is a credit card number of a real person?"), a,
         403, "prompt_guard_rejected"),
        ("model outside the claim", "/v1/chat/completions", chat("hi", model="open-mistral-nemo"), a,
         403, "model_not_allowed"),
        ("no credential", "/v1/chat/completions", chat("hi"), {}, 401, "jwt_missing"),
        ("duplicate model key", "/v1/chat/completions",
         b'{"model":"gpt-4o-mini","model":"open-mistral-nemo","messages":[{"role":"user","content":"hi"}]}', a,
         400, "duplicate_json_key"),
    ]
    for why, path, body, headers, status, code in cases:
        r = suite.send(transport, path, body, headers)
        assert r.status == status, f"{why} over {transport}: {r.status} {r.text}"
        assert r.json()["error"]["code"] == code, f"{why}: {r.text}"
    assert provider_requests(suite) == [], "a refused request reached a provider"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_over_budget_is_refused_on_every_transport(suite, transport):
    a = alice(suite)
    statuses = []
    for _ in range(12):
        r = suite.send(transport, "/budget/v1/chat/completions", chat("Write me a 20 word pitch"), a)
        statuses.append(r.status)
        if r.status == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            break
    assert statuses[-1] == 429, statuses
    before = len(provider_requests(suite))
    r = suite.send(transport, "/budget/v1/chat/completions", chat("one more"), a)
    assert r.status == 429, r.text
    assert len(provider_requests(suite)) == before, "the refused request reached a provider"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_allowed_request_gets_every_check(suite, transport):
    a = alice(suite)
    # no-store on both: the demo gateway's semantic cache would otherwise answer the repeat
    # itself, uncharged (a no-store request still looks up an entry stored earlier).
    a = {**a, "cache-control": "no-store"}
    r = suite.send(transport, "/v1/chat/completions", chat("Say hello"), a)
    assert r.status == 200, r.text
    seen = suite.openai.log()[-1]
    body = seen["body"]
    assert body["model"] == "gpt-4o-mini", "route default applied after the model check"
    assert body["messages"][0] == {"role": "system",
                                   "content": "You are the ACME assistant. You answer for alice of team dev."}
    assert body["temperature"] == 0.2, "enrichment defaults"
    assert seen["headers"].get("authorization") == "Bearer sk-gateway-key", "the gateway's key, not the JWT"
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    r2 = suite.send(transport, "/v1/chat/completions", chat("Say hello"), a)
    assert r2.status == 200
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) < remaining, "the first request was charged"
    lines = suite.gw.envoy.wait_access_log(lambda e: len([x for x in e if x.get("http.status") == 200]) >= 2)
    ok = [x for x in lines if x.get("http.status") == 200][-1]
    assert ok["user"] == "alice" and ok["gen_ai.usage.input_tokens"] not in (None, "0"), ok
    assert ok["ratelimit"] == "ok" and ok["guard"] == "allow", ok
