"""Across-request failover that honours each provider's own Retry-After (issue 16 §3, the
agentgateway lab): examples/retry-after-cooldown. The upstream role records a 429's wait as
its cluster's cooldown (shared data); the downstream role leaves cooling clusters out of the
request's group order (x-sluice-failover-groups -> Envoy's header_to_metadata -> the
priority_group specifier, with route_refresh clearing the route cache so attempt 1 follows
it too)."""
from __future__ import annotations

import time
from collections import Counter

from harness import chat
from test_routing_helpers import access_log_entries, served_by

EXAMPLE = "examples/retry-after-cooldown/envoy.yaml"
ENV = {"OPENAI_API_KEY": "sk-test-cooldown"}
A, B, C = 18001, 18002, 18003


def hits(mock) -> list[float]:
    return [e["ts"] for e in mock.log() if e["path"].endswith("/chat/completions")]


def gaps(ts: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(ts, ts[1:])]


def test_each_provider_receives_nothing_until_its_own_retry_after_passed(gateway):
    gw = gateway(EXAMPLE, env=ENV, mocks={
        A: {"name": "openai-a", "rate_429": 100, "retry_after": "2"},
        B: {"name": "openai-b", "rate_429": 100, "retry_after": "5"},
        C: {"name": "openai-fallback"},
    })
    a, b, c = gw.mocks[A], gw.mocks[B], gw.mocks[C]
    served = Counter()
    start = time.monotonic()
    while time.monotonic() - start < 11.5:
        r = gw.post("/v1/chat/completions", json_body=chat("What is 2+2?", model="client-model"))
        assert r.status_code == 200, r.text
        served[served_by(r)] += 1
        time.sleep(0.05)
    assert set(served) == {"openai-fallback"}, served
    ta, tb = hits(a), hits(b)
    print(f"requests {sum(served.values())}; provider-a hit at gaps {gaps(ta)}; provider-b at {gaps(tb)}")
    # Each provider is left alone for exactly its own Retry-After, then used again (one
    # request, answered 429 again, cools it again).
    assert len(ta) >= 5 and len(tb) >= 2, (ta, tb)
    for g in gaps(ta):
        assert 2.0 <= g <= 2.6, gaps(ta)
    for g in gaps(tb):
        assert 5.0 <= g <= 5.6, gaps(tb)
    # Every hit on a cooling provider's cluster came from a request whose order still had it.
    assert all(e["status"] == 429 for e in a.log() + b.log())
    prom = gw.envoy.prometheus()
    assert 'sluice_failover_cooldown_recorded{gen_ai_provider_name="openai-a",gen_ai_request_model="gpt-4o"}' in prom
    assert "sluice_failover_cooldown_override " in prom or "sluice_failover_cooldown_override{" in prom


def test_both_group_1_providers_429_then_no_request_reaches_either(gateway):
    """After the first request, whose attempts hit both group-1 providers and then group 2, no
    request reaches either of them: attempt 1 of every later request goes to group 2."""
    gw = gateway(EXAMPLE, env=ENV, mocks={
        A: {"name": "openai-a", "rate_429": 100, "retry_after": "60"},
        B: {"name": "openai-b", "rate_429": 100, "retry_after": "60"},
        C: {"name": "openai-fallback"},
    })
    a, b, c = gw.mocks[A], gw.mocks[B], gw.mocks[C]
    r = gw.post("/v1/chat/completions", json_body=chat("first"))
    assert r.status_code == 200 and served_by(r) == "openai-fallback", r.text
    assert (len(a.log()), len(b.log())) == (1, 1), "attempts 1 and 2 took group 1's two providers"
    for i in range(40):
        r = gw.post("/v1/chat/completions", json_body=chat(f"n{i}"))
        assert r.status_code == 200 and served_by(r) == "openai-fallback"
    assert (len(a.log()), len(b.log())) == (1, 1), "a cooling provider got a request"
    entries = access_log_entries(gw.envoy, 41)
    assert [e["attempts"] for e in entries[1:]] == [1] * 40, "attempt 1 already followed the order"
    assert {e["cluster"] for e in entries[1:]} == {"provider-c"}
    assert 'sluice_failover_route_refreshed' in gw.envoy.prometheus()


def test_every_provider_cooling_gets_a_429_with_the_shortest_wait(gateway):
    gw = gateway(EXAMPLE, env=ENV, mocks={
        A: {"name": "openai-a", "rate_429": 100, "retry_after": "30"},
        B: {"name": "openai-b", "rate_429": 100, "retry_after": "30"},
        C: {"name": "openai-fallback", "rate_429": 100, "retry_after": "3"},
    })
    a, b, c = gw.mocks[A], gw.mocks[B], gw.mocks[C]
    # Every attempt refused: Envoy itself hands the client the last provider's own 429.
    r = gw.post("/v1/chat/completions", json_body=chat("hi"))
    assert r.status_code == 429, r.text
    assert r.headers.get("retry-after") == "3"
    assert r.headers.get("x-mock-provider") == "openai-fallback"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-sluice-original-status" not in r.headers
    # Now every cluster cools: the gateway answers, no provider is asked.
    r = gw.post("/v1/chat/completions", json_body=chat("hi again"))
    assert r.status_code == 429
    assert r.headers.get("x-mock-provider") is None
    assert 1 <= int(r.headers["retry-after"]) <= 3
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert [len(m.log()) for m in (a, b, c)] == [1, 1, 1]
    # Once the shortest wait passed, that provider is asked again (and serves).
    c.configure(rate_429=0)
    time.sleep(3.2)
    r = gw.post("/v1/chat/completions", json_body=chat("later"))
    assert r.status_code == 200 and served_by(r) == "openai-fallback", r.text
    assert [len(m.log()) for m in (a, b)] == [1, 1]


def test_a_client_cannot_choose_the_group_order(gateway):
    """x-sluice-failover-groups from a client (here: "group-2 only") is removed before Envoy's
    header_to_metadata reads it, and never reaches a provider."""
    gw = gateway(EXAMPLE, env=ENV, mocks={A: {"name": "openai-a"}, B: {"name": "openai-b"}, C: {"name": "openai-fallback"}})
    forged = "MhcKFSoTChEKBG5hbWUSCRoHZ3JvdXAtMg=="  # base64 protobuf Value [{"name": "group-2"}]
    served = Counter()
    for _ in range(20):
        r = gw.post("/v1/chat/completions", json_body=chat("hi"), headers={"x-sluice-failover-groups": forged})
        assert r.status_code == 200
        served[served_by(r)] += 1
    assert "openai-fallback" not in served, served
    for m in gw.mocks.values():
        assert all("x-sluice-failover-groups" not in e["headers"] for e in m.log())
