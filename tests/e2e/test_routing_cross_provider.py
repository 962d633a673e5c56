"""Cross-provider failover in one request (issue 16 §2): examples/failover-cross-provider with
its OpenAI cluster pointed at a local TLS proxy (tests/e2e/tls_mock.py: a test CA, a
certificate for api.openai.com, the mock provider behind it). Envoy's priority_group
specifier with refresh_cluster_on_retry moves a retry to the local cluster; model-failover's
upstream role rewrites each attempt for its own cluster (model, path, :authority, credential);
a certificate Envoy cannot verify never carries a request."""
from __future__ import annotations

import json

import pytest

from harness import chat, sse_events
from test_routing_helpers import access_log_entries, served_by, variant
from tls_mock import ProviderCA, TlsProxy

EXAMPLE = "examples/failover-cross-provider/envoy.yaml"
ENV = {"OPENAI_API_KEY": "sk-test-cross"}


@pytest.fixture
def tls_proxy(workdir):
    """tls_proxy(upstream_port, ca, name) -> a TLS proxy process, stopped by PID after the test."""
    started: list[TlsProxy] = []

    def start(upstream_port: int, ca: ProviderCA, name: str = "openai") -> TlsProxy:
        p = TlsProxy(workdir, upstream_port, ca, name)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def local_tls_variant(workdir, ca_path) -> str:
    return variant(workdir, EXAMPLE, [
        ("address: api.openai.com, port_value: 443", "address: 127.0.0.1, port_value: 18001"),
        ("trusted_ca: { filename: /etc/ssl/certs/ca-certificates.crt }", f"trusted_ca: {{ filename: {ca_path} }}"),
    ])


def test_openai_over_tls_then_local_with_each_attempt_rewritten_for_its_cluster(gateway, mock, tls_proxy, workdir):
    ca = ProviderCA(workdir / "ca")
    openai = mock("openai")
    proxy = tls_proxy(openai.port, ca)
    gw = gateway(local_tls_variant(workdir, ca.ca_path), mocks={18002: {"name": "ollama"}},
                 ports={18001: proxy.port}, env=ENV)
    local = gw.mocks[18002]
    client = {"authorization": "Bearer client-token-for-the-gateway", "x-api-key": "client-key"}

    # OpenAI healthy: served over TLS (SNI api.openai.com, certificate verified against the CA).
    r = gw.post("/llm/chat", json_body=chat("Write a haiku about Envoy.", model="client-model"), headers=client)
    assert r.status_code == 200, r.text
    assert served_by(r) == "openai" and r.json()["model"] == "gpt-4o-mini"
    (e,) = openai.log()
    assert e["path"] == "/v1/chat/completions"
    assert e["headers"]["host"] == "api.openai.com"
    assert e["headers"]["authorization"] == "Bearer sk-test-cross"
    assert "x-api-key" not in e["headers"]
    conns = proxy.connections()
    assert conns and all(c["handshake"] == "ok" and c["sni"] == "api.openai.com" for c in conns), conns
    assert local.log() == []

    # OpenAI answers 429: the same request goes to the local cluster, rewritten for it.
    openai.configure(rate_429=100, retry_after="20")
    openai.clear_log()
    r = gw.post("/llm/chat", json_body=chat("Write a haiku about Envoy.", model="client-model", stream=True),
                headers=client)
    assert r.status_code == 200, r.text
    assert served_by(r) == "ollama"
    events = sse_events(r)
    assert json.loads(events[0])["model"] == "qwen2.5:0.5b" and events[-1] == "[DONE]"
    (a1,) = openai.log()
    (a2,) = local.log()
    assert (a1["attempt"], a1["model"], a1["status"]) == (1, "gpt-4o-mini", 429)
    assert (a2["attempt"], a2["model"]) == (2, "qwen2.5:0.5b")
    assert a2["path"] == "/v1/chat/completions"
    assert a2["headers"]["host"] == "localhost:11434"
    assert "authorization" not in a2["headers"] and "x-api-key" not in a2["headers"], a2["headers"]
    assert a2["body"]["messages"] == a1["body"]["messages"]
    assert a2["body"]["stream"] is True
    entry = access_log_entries(gw.envoy, 2)[-1]
    assert (entry["cluster"], entry["attempts"], entry["upstream_model"]) == ("local", 2, "qwen2.5:0.5b")
    assert entry["gen_ai.provider.name"] == "ollama"
    stats = gw.envoy.stats()
    # The router saw the provider's own 429 (a retried attempt counts under retry.*).
    assert stats.get("cluster.openai.retry.upstream_rq_429", 0) >= 1, {k: v for k, v in stats.items() if "429" in k}
    assert stats.get("cluster.openai.ssl.handshake", 0) >= 1

    # A large body (several hundred KB) reaches each cluster complete, with its own model.
    openai.clear_log()
    local.clear_log()
    big = chat("x" * 300_000, model="client-model")
    r = gw.post("/llm/chat", json_body=big)
    assert r.status_code == 200 and served_by(r) == "ollama"
    (a1,) = openai.log()
    (a2,) = local.log()
    for e, model in ((a1, "gpt-4o-mini"), (a2, "qwen2.5:0.5b")):
        assert e["model"] == model
        assert e["body"]["messages"] == big["messages"]


def test_a_certificate_envoy_cannot_verify_carries_no_request(gateway, mock, tls_proxy, workdir):
    """The cluster trusts another CA than the one that signed the proxy's certificate: the
    handshake fails (no request is sent over it) and the local cluster serves."""
    ca = ProviderCA(workdir / "ca")
    other = ProviderCA(workdir / "other-ca")
    openai = mock("openai")
    proxy = tls_proxy(openai.port, ca)
    gw = gateway(local_tls_variant(workdir, other.ca_path), mocks={18002: {"name": "ollama"}},
                 ports={18001: proxy.port}, env=ENV)
    r = gw.post("/llm/chat", json_body=chat("hi"))
    assert r.status_code == 200, r.text
    assert served_by(r) == "ollama"
    assert openai.log() == [], "a request went over an unverified connection"
    assert gw.envoy.stats().get("cluster.openai.ssl.fail_verify_error", 0) >= 1
