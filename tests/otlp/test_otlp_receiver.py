"""Tests of the test-only OTLP/gRPC trace receiver (tests/otlp/otlp_receiver.py) without Envoy:
a real OTLP client export through the generated `TraceServiceStub` (PyPI opentelemetry-proto),
in-process and through the CLI.

Run: .venv/bin/pytest -q tests/otlp/test_otlp_receiver.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from otlp_receiver import SCOPE, SCOPE_SPANS, Receiver  # noqa: E402

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SERVER_ID = bytes.fromhex("b7ad6b7169203331")
CLIENT_ID = bytes.fromhex("00f067aa0ba902b7")
PARENT_ID = bytes.fromhex("1111111111111111")


def kv(key: str, **value) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**value))


def export_request() -> trace_service_pb2.ExportTraceServiceRequest:
    """What Envoy sends: one resource, one scope, a SERVER span and its CLIENT child."""
    server = trace_pb2.Span(
        trace_id=TRACE, span_id=SERVER_ID, parent_span_id=PARENT_ID, name="chat gpt-4o",
        kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=1_000_000_000, end_time_unix_nano=1_250_000_000,
        attributes=[
            kv("gen_ai.request.model", string_value="gpt-4o"),
            kv("gen_ai.usage.input_tokens", int_value=12),
            kv("gen_ai.usage.output_tokens", int_value=2**40),
            kv("sluice.ttft_ms", double_value=7.5),
            kv("sluice.usage.estimated", bool_value=False),
            kv("raw", bytes_value=b"\x00\x01"),
            kv("list", array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(string_value="a"),
                                                                  common_pb2.AnyValue(int_value=2)])),
            kv("map", kvlist_value=common_pb2.KeyValueList(values=[kv("k", bool_value=True)])),
            common_pb2.KeyValue(key="unset"),
        ],
        events=[trace_pb2.Span.Event(name="first_token", time_unix_nano=1_100_000_000,
                                     attributes=[kv("n", int_value=1)])],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK),
    )
    client = trace_pb2.Span(
        trace_id=TRACE, span_id=CLIENT_ID, parent_span_id=SERVER_ID, name="chat gpt-4o",
        kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=1_010_000_000, end_time_unix_nano=1_200_000_000,
        attributes=[kv("gen_ai.provider.name", string_value="openai"), kv("retry.count", string_value="1")],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="upstream 503"),
    )
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", string_value="sluice-gateway"))
    ss = getattr(rs, SCOPE_SPANS).add()  # scope_spans (instrumentation_library_spans in xds-protos' copy)
    getattr(ss, SCOPE).name, getattr(ss, SCOPE).version = "envoy", "1.40.0"
    ss.spans.extend([server, client])
    return req


def export(port: int, request=None, metadata=None) -> trace_service_pb2.ExportTraceServiceResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = trace_service_pb2_grpc.TraceServiceStub(ch)
        return stub.Export(request or export_request(), timeout=5, metadata=metadata)


@pytest.fixture
def rx():
    r = Receiver()
    r.start()
    yield r
    r.stop()


def test_export_is_stored_and_decoded(rx):
    resp = export(rx.port, metadata=[("x-test", "yes")])
    assert isinstance(resp, trace_service_pb2.ExportTraceServiceResponse)
    assert resp.ByteSize() == 0  # full success: no partial_success (a field only the newer proto has)
    spans = rx.wait_for_spans(2, timeout=5)
    server, client = spans
    assert (server.trace_id, server.span_id, server.parent_span_id) == (TRACE.hex(), SERVER_ID.hex(), PARENT_ID.hex())
    assert (server.name, server.kind, server.status_code) == ("chat gpt-4o", "SERVER", "OK")
    assert server.duration_ms == 250.0
    a = server.attributes
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.usage.input_tokens"] == 12 and type(a["gen_ai.usage.input_tokens"]) is int
    assert a["gen_ai.usage.output_tokens"] == 2**40
    assert a["sluice.ttft_ms"] == 7.5 and type(a["sluice.ttft_ms"]) is float
    assert a["sluice.usage.estimated"] is False
    assert a["raw"] == b"\x00\x01"
    assert a["list"] == ["a", 2] and a["map"] == {"k": True}
    assert a["unset"] is None
    assert server.events == [{"name": "first_token", "time_unix_nano": 1_100_000_000, "attributes": {"n": 1}}]
    assert server.resource == {"service.name": "sluice-gateway"}
    assert (server.scope_name, server.scope_version) == ("envoy", "1.40.0")
    assert (client.kind, client.parent_span_id, client.status_code, client.status_message) == (
        "CLIENT", SERVER_ID.hex(), "ERROR", "upstream 503")
    assert client.attributes == {"gen_ai.provider.name": "openai", "retry.count": "1"}
    assert len(rx.requests()) == 1 and rx.requests()[0] == export_request()
    assert rx.metadata()[0]["x-test"] == "yes"
    json.loads(server.to_json())  # serialisable (bytes as hex)


def test_root_span_has_empty_parent_and_filters(rx):
    req = export_request()
    getattr(req.resource_spans[0], SCOPE_SPANS)[0].spans[0].ClearField("parent_span_id")
    export(rx.port, req)
    export(rx.port)
    assert len(rx.wait_for_spans(4)) == 4
    roots = rx.spans(lambda s: s.kind == "SERVER" and s.parent_span_id == "")
    assert len(roots) == 1
    rx.clear()
    assert rx.spans() == [] and rx.requests() == []


def test_wait_for_spans_times_out_with_what_arrived(rx):
    export(rx.port)
    with pytest.raises(TimeoutError, match="got 0 matching.*chat gpt-4o"):
        rx.wait_for_spans(1, timeout=0.2, predicate=lambda s: s.name == "nope")


def test_wait_for_spans_wakes_on_arrival(rx):
    sender = threading.Timer(0.2, export, args=(rx.port,))
    sender.start()
    t0 = time.monotonic()
    assert len(rx.wait_for_spans(2, timeout=5)) == 2
    assert time.monotonic() - t0 < 4
    sender.join(5)


def test_fail_with_returns_grpc_error(rx):
    rx.fail_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as e:
        export(rx.port)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rx.spans() == []


def test_unknown_method_is_unimplemented(rx):
    with grpc.insecure_channel(rx.address) as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_context_manager_and_fixed_port():
    with Receiver() as r:
        port = r.port
        export(port)
        assert len(r.wait_for_spans(2)) == 2
    with Receiver() as r2:  # the port is free again after stop()
        r2.stop()
        r2.start(port)
        assert r2.port == port
        export(port)
        assert len(r2.wait_for_spans(2)) == 2


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """One stdout line of the CLI, or fail (with its stderr) instead of hanging."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        proc.kill()
        pytest.fail(f"no line from otlp_receiver.py within {timeout}s; rc={proc.wait()} stderr={proc.stderr.read()!r}")
    return out[0].strip()


def test_port_in_use_is_an_error(rx):
    with pytest.raises(OSError, match="cannot listen"):
        Receiver().start(rx.port)


def stop_cli(proc: subprocess.Popen) -> None:
    """SIGTERM must stop the CLI cleanly (exit 0); never leave it running."""
    proc.terminate()
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("otlp_receiver.py ignored SIGTERM")
    assert rc == 0, proc.stderr.read()


def test_cli_prints_listening_and_spans(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "otlp_receiver.py"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith("LISTENING 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        export(port)
        got = [json.loads(read_line(proc)) for _ in range(2)]
        assert [g["kind"] for g in got] == ["SERVER", "CLIENT"]
        assert got[0]["attributes"]["gen_ai.usage.input_tokens"] == 12
        assert got[0]["attributes"]["raw"] == "0001"
        assert got[1]["parent_span_id"] == SERVER_ID.hex()
    finally:
        stop_cli(proc)


def test_cli_jsonl_file(tmp_path):
    out = tmp_path / "spans.jsonl"
    proc = subprocess.Popen([sys.executable, str(HERE / "otlp_receiver.py"), "--jsonl", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(read_line(proc).rsplit(":", 1)[1])
        export(port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.05)
        names = [json.loads(x)["span_id"] for x in out.read_text().splitlines()]
        assert names == [SERVER_ID.hex(), CLIENT_ID.hex()]
    finally:
        stop_cli(proc)
