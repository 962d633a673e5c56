"""The demo gateway (envoy/envoy.yaml, the composed sluice filter) emits OpenTelemetry spans
with gen_ai attributes: the collector port 4317 is pointed at tests/otlp/otlp_receiver.py,
Alice's JWT comes from the demo's own key tooling, openai (P0) answers 429 and local (P1)
serves, so one request gives a SERVER span and two CLIENT spans (one per attempt).

    flock /tmp/sluice-heavy.lock .venv/bin/pytest -q -p no:cacheprovider tests/otlp/test_demo_spans.py
"""
from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
from otlp_receiver import Receiver  # noqa: E402
import harness  # noqa: E402
import demo  # noqa: E402  (scripts/demo.py: the tour's JWT and JWKS helpers)

COLLECTOR_PORT = 4317      # envoy/envoy.yaml's otel_collector

pytestmark = pytest.mark.skipif(
    not (harness.WASM_DIR / "sluice_gateway.wasm").exists() or not harness.MOCK_BIN.exists(),
    reason="sluice gateway / mock provider not built",
)


def demo_price(model: str) -> dict:
    """The usage_metrics stage's price entry for `model` in the demo config (first match,
    `prefix*` patterns as the filter matches them)."""
    import json
    import yaml

    doc = yaml.safe_load((demo.ROOT / demo.CONFIG).read_text())
    http_filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"]
    (gateway,) = [f for f in http_filters if f["name"] == "sluice.gateway"]
    stages = json.loads(gateway["typed_config"]["config"]["configuration"]["value"])["stages"]
    (metrics,) = [s["usage_metrics"] for s in stages if "usage_metrics" in s]
    assert metrics["currency"] == "USD"
    for p in metrics["prices"]:
        pat = p["model"]
        if model == pat or (pat.endswith("*") and model.startswith(pat[:-1])):
            return p
    raise AssertionError(f"the demo's price table has no {model}")


@pytest.fixture
def demo_gw(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, str(demo.ROOT / "scripts" / "mint-jwt"), "keygen", str(keys)], check=True,
                   capture_output=True)
    token = demo.mint(keys, "alice", "dev", "openai=gpt-4o-mini")
    rx = Receiver()
    rx.start()
    jwks = demo.serve_dir(keys, harness.free_port())
    gw = None
    try:
        gw = harness.Gateway(
            tmp_path, demo.CONFIG,
            mocks={18001: {**demo.PROVIDERS[18001], "rate_429": 100, "retry_after": "0"},
                   18002: {**demo.PROVIDERS[18002], "prompt_tokens": 11, "completion_tokens": 7}},
            ports={COLLECTOR_PORT: rx.port, 18100: jwks.server_address[1]},
            env={"OPENAI_API_KEY": "sk-demo-not-a-real-key"},
        )
        yield gw, rx, token
    finally:
        if gw:
            gw.stop()
        jwks.shutdown()
        rx.stop()


def test_demo_gateway_emits_gen_ai_spans(demo_gw):
    gw, rx, token = demo_gw
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = gw.post("/v1/chat/completions", harness.chat("hi"),
                headers={"authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-mock-provider") == "local"          # failed over after openai's 429
    spans = rx.wait_for_spans(3, timeout=10, predicate=lambda s: s.trace_id == trace_id)
    (server,) = [s for s in spans if s.kind == "SERVER"]
    a1, a2 = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_time_unix_nano)

    # The client's W3C context is kept; each attempt is a child of the SERVER span.
    assert server.parent_span_id == parent
    assert a1.parent_span_id == a2.parent_span_id == server.span_id
    assert server.resource["service.name"] == "sluice-gateway"

    # Per attempt: the provider's own 429, then the local provider with its endpoint model.
    assert (a1.attributes["gen_ai.provider.name"], a1.attributes["http.status_code"], a1.status_code) \
        == ("openai", "429", "ERROR")
    assert (a2.attributes["gen_ai.provider.name"], a2.attributes["http.status_code"]) == ("local", "200")
    assert a2.attributes["sluice.endpoint.model"] == "qwen-0.5b" and a2.attributes["sluice.upstream_model"] == "qwen-0.5b"
    assert (a1.attributes["sluice.attempt"], a2.attributes["sluice.attempt"]) == (1, 2)

    # The request: the route default model auth checked, the answering provider, the usage.
    s = server.attributes
    assert server.name == "chat gpt-4o-mini", server.name
    assert s["gen_ai.operation.name"] == "chat"
    assert s["gen_ai.request.model"] == "gpt-4o-mini"
    assert s["gen_ai.provider.name"] == "local" and s["sluice.upstream_model"] == "qwen-0.5b"
    assert s["gen_ai.response.model"] == "qwen-0.5b"
    assert s["gen_ai.usage.output_tokens"] == 7
    # Input tokens are the provider's count (11), not the estimate.
    assert s["gen_ai.usage.input_tokens"] == 11 and s["sluice.usage.estimated"] is False
    assert isinstance(s["sluice.ttft_ms"], float)
    # Cost (issue 18): the successful attempt's usage (11 in, 7 out) at the demo's price for
    # the model that answered, qwen-0.5b (0.10 / 0.30 USD per million: 3.2 micro-USD, rounded).
    price = demo_price("qwen-0.5b")
    assert s["sluice.cost_micros"] == round(11 * price["input"] + 7 * price["output"]) == 3
    assert s["http.status_code"] == "200"
    # The caller is opt-in: not tagged by the demo config.
    assert "sluice.user" not in s
