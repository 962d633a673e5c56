"""Envoy's own OpenTelemetry tracer -> tests/otlp/otlp_receiver.py, with sluice filter state as
gen_ai span attributes (config: tests/otlp/envoy-tracing.yaml, the real usage-metrics and
model-failover filters, two mock providers: P0 always answers 429, P1 serves).

Needs the built filters and mock (scripts/test.sh builds them) and Envoy; hold the machine lock:
    flock /tmp/sluice-heavy.lock .venv/bin/pytest -q tests/otlp/test_envoy_spans.py
Also runs as a script that prints every span it got:
    flock /tmp/sluice-heavy.lock .venv/bin/python tests/otlp/test_envoy_spans.py
"""
from __future__ import annotations

import json
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "e2e"))
from otlp_receiver import Receiver, Span  # noqa: E402
import harness  # noqa: E402

CONFIG = HERE / "envoy-tracing.yaml"
COLLECTOR_PORT = 18317
WASMS = ("sluice_usage_metrics.wasm", "sluice_model_failover.wasm")

pytestmark = pytest.mark.skipif(
    not all((harness.WASM_DIR / w).exists() for w in WASMS) or not harness.MOCK_BIN.exists(),
    reason="sluice filters / mock provider not built",
)


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def start(workdir: Path, rx: Receiver) -> harness.Gateway:
    return harness.Gateway(
        workdir, CONFIG,
        mocks={18001: {"name": "openai", "rate_429": 100, "retry_after": "0"},
               18002: {"name": "mistral", "prompt_tokens": 11, "completion_tokens": 7}},
        ports={COLLECTOR_PORT: rx.port},
    )


def trace_spans(rx: Receiver, trace_id: str, count: int) -> tuple[Span, list[Span]]:
    spans = rx.wait_for_spans(count, timeout=10, predicate=lambda s: s.trace_id == trace_id)
    server = [s for s in spans if s.kind == "SERVER"]
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_time_unix_nano)
    assert len(server) == 1, spans
    return server[0], clients


@pytest.fixture
def rx():
    r = Receiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def gw(tmp_path, rx):
    g = start(tmp_path, rx)
    yield g
    g.stop()


def check_failover_trace(gw: harness.Gateway, rx: Receiver, stream: bool) -> tuple[Span, list[Span]]:
    tp, trace_id, client_span = traceparent()
    r = gw.post("/v1/chat/completions", harness.chat("hi", model="gpt-4o", stream=stream),
                headers={"traceparent": tp})
    assert r.status_code == 200, r.text
    server, clients = trace_spans(rx, trace_id, 3)
    try:
        check_spans(server, clients, client_span)
        # Each attempt propagated its own CLIENT span as the parent to its provider.
        sent = [e["headers"].get("traceparent") for p in (18001, 18002) for e in gw.mocks[p].log()
                if e["path"].endswith("/chat/completions") and trace_id in e["headers"].get("traceparent", "")]
        assert sent == [f"00-{trace_id}-{c.span_id}-01" for c in clients], sent
    except AssertionError:
        print(dump([server, *clients]))
        raise
    return server, clients


def dump(spans: list[Span]) -> str:
    return "\n".join(json.dumps({"name": sp.name, "kind": sp.kind, "trace_id": sp.trace_id, "span_id": sp.span_id,
                                 "parent_span_id": sp.parent_span_id, "status": sp.status_code,
                                 "attributes": sp.attributes}, indent=1, sort_keys=True) for sp in spans)


def check_spans(server: Span, clients: list[Span], client_span: str) -> None:
    # W3C context from the client is kept: same trace id, the SERVER span is a child of the
    # client's span, each attempt's CLIENT span a child of the SERVER span.
    assert server.parent_span_id == client_span
    assert [c.parent_span_id for c in clients] == [server.span_id] * 2
    assert server.resource["service.name"] == "sluice-gateway"

    a1, a2 = clients
    # Per attempt, from the upstream model-failover filter's filter state and the host metadata.
    assert (a1.attributes["gen_ai.provider.name"], a1.attributes["sluice.upstream_model"]) == ("openai", "gpt-4o")
    assert (a2.attributes["gen_ai.provider.name"], a2.attributes["sluice.upstream_model"]) == ("mistral", "mistral-small")
    assert a1.attributes["sluice.endpoint.model"] == "gpt-4o" and a2.attributes["sluice.endpoint.model"] == "mistral-small"
    assert (a1.attributes["sluice.attempt"], a2.attributes["sluice.attempt"]) == (1, 2)
    # The provider's own 429 (failover retries it natively; no 429 -> 503 mapping any more).
    assert a1.attributes["http.status_code"] == "429"
    assert a1.status_code == "ERROR" and a2.status_code == "UNSET"
    assert a2.attributes["retry.count"] == "1" and "retry.count" not in a1.attributes
    assert a1.attributes["upstream_address"] != a2.attributes["upstream_address"]
    # Span names "<gen_ai.operation.name> <model>", rendered when the span ends, like the tags
    # (an unset sluice.operation renders empty: " <model>"; upstream spans have it only when a
    # filter writes it before the attempt ends, i.e. on the request path).
    for sp, model in ((server, "gpt-4o"), (a1, "gpt-4o"), (a2, "mistral-small")):
        assert sp.name == f"{sp.attributes.get('gen_ai.operation.name', '')} {model}", sp.name
    # Response-body facts end after the upstream span did: only on the SERVER span.
    assert "gen_ai.usage.output_tokens" not in a2.attributes

    s = server.attributes
    assert s["gen_ai.request.model"] == "gpt-4o"
    assert s["gen_ai.provider.name"] == "mistral" and s["sluice.upstream_model"] == "mistral-small"
    assert s["gen_ai.usage.input_tokens"] == 11 and s["gen_ai.usage.output_tokens"] == 7
    assert s["sluice.usage.total_tokens"] == 18 and s["sluice.usage.estimated"] is False
    assert s.get("gen_ai.operation.name", "chat") == "chat"
    assert isinstance(s.get("sluice.ttft_ms"), float)
    assert s["http.status_code"] == "200"


def test_failover_trace_json(gw, rx):
    check_failover_trace(gw, rx, stream=False)


def test_failover_trace_stream(gw, rx):
    check_failover_trace(gw, rx, stream=True)


def test_unsampled_parent_is_respected(gw, rx):
    trace_id = secrets.token_hex(16)
    r = gw.post("/v1/chat/completions", harness.chat("hi", model="gpt-4o"),
                headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"})
    assert r.status_code == 200
    # A sampled request afterwards flushes; the unsampled one never shows up.
    check_failover_trace(gw, rx, stream=False)
    assert not rx.spans(lambda s: s.trace_id == trace_id)


if __name__ == "__main__":
    with Receiver() as r, tempfile.TemporaryDirectory() as d:
        g = start(Path(d), r)
        try:
            server, clients = check_failover_trace(g, r, stream=False)
            print(dump([server, *clients]))
            print("OK: spans arrived from Envoy")
        finally:
            g.stop()
