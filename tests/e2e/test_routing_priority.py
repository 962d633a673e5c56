"""Seed 003, priority groups: group 1 holds an always-429 provider (Retry-After: 60) and a
healthy one, group 2 a degraded fallback. The 429 ejects the failing provider (429 shown to
the router as 503); group 1's healthy provider then serves everything, group 2 is never
reached; when every group-1 provider fails, group 2 serves. The example's 60 s ejection is
shortened for the test."""
from __future__ import annotations

from collections import Counter

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
