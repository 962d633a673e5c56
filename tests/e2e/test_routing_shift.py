"""Seed 000 with the model-failover filter: weighted traffic shift between two local models
(no model in the request), local-to-local and public-to-local failover (connection refused
and 429), and time to first byte with and without the filter."""
from __future__ import annotations

import json
from collections import Counter

import yaml

from harness import ROOT, chat, sse_events
from test_routing_helpers import models_seen, served_by, ttfb_ms, variant

SEED_PROMPT = [
    {"role": "system", "content": "You are a solutions architect for kubernetes networking."},
    {"role": "user", "content": "Write me a 20 word pitch on why I should use a service mesh"},
]
ENV = {"OPENAI_API_KEY": "sk-test-public"}


def seed_body(**extra) -> dict:
    return {"messages": SEED_PROMPT, **extra}


def test_traffic_shift_50_50_without_a_model(gateway):
    gw = gateway("examples/traffic-shift/envoy.yaml", mocks={
        18001: {"name": "qwen-0.5b", "model": "ollama-default"},
        18002: {"name": "qwen-1.8b", "model": "ollama-default"},
    })
    want = {"qwen-0.5b": "qwen:0.5b", "qwen-1.8b": "qwen:1.8b"}
    served = Counter()
    for _ in range(400):
        r = gw.post("/qwen", json_body=seed_body())
        assert r.status_code == 200, r.text
        backend = served_by(r)
        assert r.json()["model"] == want[backend], (backend, r.json()["model"])
        served[backend] += 1
    print(f"traffic-shift split over 400 requests: {dict(served)}")
    for backend in want:
        assert 160 <= served[backend] <= 240, served
    for port, backend in ((18001, "qwen-0.5b"), (18002, "qwen-1.8b")):
        assert set(models_seen(gw.mocks[port])) == {want[backend]}


def test_failover_local_to_local_healthy_then_429_and_ttfb(gateway):
    gw = gateway("examples/failover-local-to-local/envoy.yaml", mocks={
        18001: {"name": "qwen-1.8b", "model": "ollama-default"},
        18002: {"name": "qwen-0.5b", "model": "ollama-default"},
    })
    preferred, fallback = gw.mocks[18001], gw.mocks[18002]
    for _ in range(5):
        r = gw.post("/failover", json_body=seed_body())
        assert r.status_code == 200 and served_by(r) == "qwen-1.8b"
        assert r.json()["model"] == "qwen:1.8b"
    assert fallback.log() == []

    # TTFB: the same streaming request through the failover route and a route without filters.
    body = seed_body(stream=True)
    for path in ("/failover", "/direct"):  # warm both connection pools
        ttfb_ms(gw.base, path, body)
    with_filter, status_a, raw_a = ttfb_ms(gw.base, "/failover", body)
    without, status_b, raw_b = ttfb_ms(gw.base, "/direct", body)
    print(f"TTFB streaming: failover route (model-failover upstream filter) {with_filter:.2f} ms, "
          f"route without filter {without:.2f} ms, difference {with_filter - without:+.2f} ms")
    assert status_a == status_b == 200
    assert b"data: [DONE]" in raw_a and b"data: [DONE]" in raw_b

    # The preferred backend starts answering 429: the request is retried on the fallback.
    preferred.configure(rate_429=100, retry_after="20")
    preferred.clear_log()
    fallback.clear_log()
    r = gw.post("/failover", json_body=seed_body(), headers={"authorization": "Bearer client"})
    assert r.status_code == 200, r.text
    assert served_by(r) == "qwen-0.5b" and r.json()["model"] == "qwen:0.5b"
    assert models_seen(preferred) == ["qwen:1.8b"]
    assert "authorization" not in fallback.log()[0]["headers"]
    # ...and outlier detection keeps the rate-limited host out of later requests.
    for _ in range(5):
        r = gw.post("/failover", json_body=seed_body())
        assert r.status_code == 200 and served_by(r) == "qwen-0.5b"
    assert len(preferred.log()) == 1
    assert gw.envoy.stats().get("cluster.qwen-failover.outlier_detection.ejections_enforced_total", 0) >= 1


def test_failover_local_to_local_connection_refused(gateway):
    # No mock on 18001: the preferred endpoint refuses connections (the seed's invalid host).
    gw = gateway("examples/failover-local-to-local/envoy.yaml", mocks={18002: {"name": "qwen-0.5b"}})
    for _ in range(3):
        r = gw.post("/failover", json_body=seed_body())
        assert r.status_code == 200, r.text
        assert served_by(r) == "qwen-0.5b" and r.json()["model"] == "qwen:0.5b"


PUBLIC_AS_MOCK = [
    # The test's copy points the public endpoint at a local mock, in plaintext.
    ("address: api.openai.com, port_value: 443", "address: 127.0.0.1, port_value: 18001"),
    (", envoy.transport_socket_match: { tls: openai }", ""),
]


def test_public_example_config_targets_openai_over_tls():
    cfg = yaml.safe_load((ROOT / "examples/failover-public-to-local/envoy.yaml").read_text())
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "openai-to-local"]
    p0 = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    sock = p0["endpoint"]["address"]["socket_address"]
    assert (sock["address"], sock["port_value"]) == ("api.openai.com", 443)
    assert p0["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tls": "openai"}
    tls = [m for m in cluster["transport_socket_matches"] if m["match"] == {"tls": "openai"}][0]
    assert tls["transport_socket"]["typed_config"]["sni"] == "api.openai.com"


def test_failover_public_to_local_429(gateway, workdir):
    cfg = variant(workdir, "examples/failover-public-to-local/envoy.yaml", PUBLIC_AS_MOCK)
    gw = gateway(cfg, mocks={18001: {"name": "openai"}, 18002: {"name": "qwen-0.5b"}}, env=ENV)
    openai, local = gw.mocks[18001], gw.mocks[18002]
    r = gw.post("/openai", json_body=seed_body(), headers={"authorization": "Bearer client-token"})
    assert r.status_code == 200 and served_by(r) == "openai"
    assert r.json()["model"] == "gpt-4o-mini"
    (e,) = openai.log()
    assert e["headers"]["authorization"] == "Bearer sk-test-public"
    assert e["headers"]["host"] == "api.openai.com"
    assert e["path"] == "/v1/chat/completions"

    openai.configure(rate_429=100)
    openai.clear_log()
    r = gw.post("/openai", json_body=seed_body(stream=True), headers={"authorization": "Bearer client-token"})
    assert r.status_code == 200
    assert served_by(r) == "qwen-0.5b"
    assert json.loads(sse_events(r)[0])["model"] == "qwen:0.5b"
    assert models_seen(openai) == ["gpt-4o-mini"]
    (e,) = local.log()
    assert "authorization" not in e["headers"]


def test_failover_public_to_local_connection_refused(gateway, workdir):
    cfg = variant(workdir, "examples/failover-public-to-local/envoy.yaml", PUBLIC_AS_MOCK)
    gw = gateway(cfg, mocks={18002: {"name": "qwen-0.5b"}}, env=ENV)
    r = gw.post("/openai", json_body=seed_body())
    assert r.status_code == 200, r.text
    assert served_by(r) == "qwen-0.5b" and r.json()["model"] == "qwen:0.5b"


def test_a_provider_5xx_still_ejects_with_the_429_error_matcher(gateway):
    """HttpProtocolOptions.outlier_detection.error_matcher replaces Envoy's own 5xx rule: the
    examples list 429 and 5xx in it, so a provider's 503 still ejects (with only 429 listed,
    it would not)."""
    gw = gateway("examples/failover-local-to-local/envoy.yaml", mocks={
        18001: {"name": "qwen-1.8b", "rate_503": 100},
        18002: {"name": "qwen-0.5b"},
    })
    preferred = gw.mocks[18001]
    for _ in range(5):
        r = gw.post("/failover", json_body=seed_body())
        assert r.status_code == 200 and served_by(r) == "qwen-0.5b", r.text
    assert len(preferred.log()) == 1, "the 503ing host was not ejected"
    assert gw.envoy.stats().get("cluster.qwen-failover.outlier_detection.ejections_enforced_consecutive_5xx") == 1
