"""Seed 003, priority groups: group 1 holds an always-429 provider (Retry-After: 60) and a
healthy one, group 2 a degraded fallback. The 429 ejects the failing provider (Envoy counts
the provider's 429 itself: HttpProtocolOptions.outlier_detection.error_matcher); group 1's
healthy provider then serves everything, group 2 is never reached; when every group-1
provider fails, group 2 serves. The example's 60 s ejection is shortened for the test.
Also: the ejection acts at once (update_merge_window: 0s) and lasts exactly
[base_ejection_time, base_ejection_time + interval] (max_ejection_time = base) — issue 16 §3."""
from __future__ import annotations

from collections import Counter

import time

from harness import wait_for
from test_routing_helpers import access_log_entries, served_by, variant

ENV = {"OPENAI_API_KEY": "sk-test-groups"}
BODY = {"model": "", "messages": [{"role": "user", "content": "What is 2+2?"}]}


def ejections_active(gw) -> int:
    return gw.envoy.stats().get("cluster.priority-groups.outlier_detection.ejections_active", 0)


def test_priority_groups(gateway, workdir):
    cfg = variant(workdir, "examples/priority-groups/envoy.yaml", [("base_ejection_time: 60s", "base_ejection_time: 3s")])
    gw = gateway(cfg, env=ENV, mocks={
        18001: {"name": "mock-gpt-4o", "rate_429": 100, "retry_after": "60"},
        18002: {"name": "openai-primary"},
        18003: {"name": "openai-fallback"},
    })
    failing, primary, fallback = gw.mocks[18001], gw.mocks[18002], gw.mocks[18003]

    # Until the failing provider is picked once, requests land on either group-1 provider;
    # its 429 is retried on gpt-4o within the same request (group 1 first), so the client
    # sees 200 from the primary every time.
    for _ in range(10):
        r = gw.post("/openai", json_body=BODY, headers={"authorization": "Bearer client"})
        assert r.status_code == 200, r.text
        assert served_by(r) == "openai-primary" and r.json()["model"] == "gpt-4o"
        if failing.log():
            break
    (hit,) = failing.log()
    assert hit["status"] == 429 and hit["model"] == "mock-gpt-4o"
    assert hit["headers"].get("authorization") == "Bearer client"  # passthrough endpoint
    wait_for(lambda: ejections_active(gw) == 1, 10, "the failing provider ejected")
    stats = gw.envoy.stats()
    assert stats.get("cluster.priority-groups.outlier_detection.ejections_enforced_consecutive_5xx") == 1
    assert stats.get("cluster.priority-groups.retry.upstream_rq_429") == 1, "the router saw the provider's 429"

    for _ in range(20):
        r = gw.post("/openai", json_body=BODY)
        assert r.status_code == 200
        assert served_by(r) == "openai-primary" and r.json()["model"] == "gpt-4o"
    assert len(failing.log()) == 1, "an ejected provider got traffic"
    assert fallback.log() == [], "group 2 reached while group 1 had a healthy provider"
    assert all(e["headers"].get("authorization") == "Bearer sk-test-groups" for e in primary.log())
    entries = access_log_entries(gw.envoy, 21)
    assert {e["gen_ai.provider.name"] for e in entries[-20:]} == {"openai-provider-primary"}
    assert any(e["retry_after_s"] == "60" for e in entries)

    # After the ejection time the failing provider gets a request again (and is re-ejected);
    # the client still sees only 200s.
    statuses = []

    def probed():
        r = gw.post("/openai", json_body=BODY)
        statuses.append((r.status_code, served_by(r)))
        return len(failing.log()) >= 2
    wait_for(probed, 30, "the failing provider probed again after its ejection", interval=0.1)
    assert set(statuses) == {(200, "openai-primary")}, Counter(statuses)
    assert fallback.log() == []

    # Every group-1 provider fails: group 2 serves, the client still gets 200.
    primary.configure(rate_429=100)
    for _ in range(5):
        r = gw.post("/openai", json_body=BODY)
        assert r.status_code == 200, r.text
        assert served_by(r) == "openai-fallback" and r.json()["model"] == "gpt-4o-mini"
    assert len(fallback.log()) == 5


def test_both_group_1_providers_answer_429_then_no_request_reaches_either(gateway, workdir):
    """The first request's attempts take both group-1 providers (429 each) and then group 2.
    Both are ejected by those 429s, and the ejection applies at once: no later request reaches
    either of them (with Envoy's default update_merge_window of 1 s, back-to-back requests kept
    reaching them for about a second)."""
    cfg = variant(workdir, "examples/priority-groups/envoy.yaml", [("base_ejection_time: 60s", "base_ejection_time: 30s")])
    gw = gateway(cfg, env=ENV, mocks={
        18001: {"name": "mock-gpt-4o", "rate_429": 100, "retry_after": "60"},
        18002: {"name": "openai-primary", "rate_429": 100, "retry_after": "60"},
        18003: {"name": "openai-fallback"},
    })
    failing, primary, fallback = gw.mocks[18001], gw.mocks[18002], gw.mocks[18003]
    r = gw.post("/openai", json_body=BODY)
    assert r.status_code == 200 and served_by(r) == "openai-fallback", r.text
    assert (len(failing.log()), len(primary.log())) == (1, 1), "attempts 1 and 2 took both group-1 providers"
    statuses = []
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        r = gw.post("/openai", json_body=BODY)
        statuses.append((r.status_code, served_by(r)))
    print(f"{len(statuses)} requests in the 2 s after the first")
    assert set(statuses) == {(200, "openai-fallback")}, Counter(statuses)
    assert (len(failing.log()), len(primary.log())) == (1, 1), \
        f"group-1 providers reached after their ejection: {len(failing.log()) - 1} and {len(primary.log()) - 1} more"


def test_the_ejection_lasts_base_ejection_time_plus_at_most_one_interval(gateway, workdir):
    """max_ejection_time = base_ejection_time: every ejection of a provider that keeps
    answering 429 lasts [base, base + interval] (here 2 s and 1 s), never longer."""
    cfg = variant(workdir, "examples/priority-groups/envoy.yaml", [
        ("base_ejection_time: 60s", "base_ejection_time: 2s"), ("max_ejection_time: 60s", "max_ejection_time: 2s")])
    gw = gateway(cfg, env=ENV, mocks={
        18001: {"name": "mock-gpt-4o", "rate_429": 100, "retry_after": "60"},
        18002: {"name": "openai-primary"},
        18003: {"name": "openai-fallback"},
    })
    failing = gw.mocks[18001]
    t_end = time.monotonic() + 10.5
    while time.monotonic() < t_end:
        r = gw.post("/openai", json_body=BODY)
        assert r.status_code == 200
        time.sleep(0.02)
    ts = [e["ts"] for e in failing.log()]
    gaps = [round(b - a, 2) for a, b in zip(ts, ts[1:])]
    print(f"the rate-limited provider was asked at gaps {gaps}")
    assert len(gaps) >= 3, gaps
    for g in gaps:
        assert 2.0 <= g <= 3.3, gaps


def test_when_every_provider_answers_429_the_client_gets_a_providers_own_429(gateway, workdir):
    """Natively (no 429 -> 503 rewrite): with no retry left, Envoy hands the client the last
    attempt's answer, the provider's 429 and its retry-after. All three providers get
    ejected on the way; panic routing (default healthy_panic_threshold) still sends the last
    attempt to one of them rather than answering 503 "no healthy upstream" itself."""
    cfg = variant(workdir, "examples/priority-groups/envoy.yaml", [("base_ejection_time: 60s", "base_ejection_time: 30s")])
    gw = gateway(cfg, env=ENV, mocks={
        18001: {"name": "mock-gpt-4o", "rate_429": 100, "retry_after": "61"},
        18002: {"name": "openai-primary", "rate_429": 100, "retry_after": "62"},
        18003: {"name": "openai-fallback", "rate_429": 100, "retry_after": "63"},
    })
    want = {"mock-gpt-4o": "61", "openai-primary": "62", "openai-fallback": "63"}
    for _ in range(3):
        r = gw.post("/openai", json_body=BODY)
        assert r.status_code == 429, r.text
        assert r.headers.get("retry-after") == want[served_by(r)]
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "x-sluice-original-status" not in r.headers
