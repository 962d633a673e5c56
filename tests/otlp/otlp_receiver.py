#!/usr/bin/env python3
"""A TEST FIXTURE, not a product: a minimal OTLP/gRPC trace receiver
(`opentelemetry.proto.collector.trace.v1.TraceService/Export`) that keeps every span it is
sent, so tests can check the spans Envoy's own OpenTelemetry tracer
(`envoy.tracers.opentelemetry`) exports. Operators run an OpenTelemetry Collector instead.

Schema: requests are parsed with the messages generated from the OpenTelemetry .proto files
(PyPI `opentelemetry-proto`, pinned in tests/requirements.txt). PyPI `xds-protos` (also pinned,
for tests/rls) ships its own, older copy of the same `opentelemetry/proto/.../*_pb2.py` module
files (OTLP before the 2022 rename: `instrumentation_library_spans` / `instrumentation_library`
where the current proto has `scope_spans` / `scope`, same field numbers, so the same wire
format) and no `_pb2_grpc` stubs. Whichever of the two packages pip installs last owns those
files. So the service is registered with a generic gRPC handler under the exact method name
(not the generated servicer), and the two renamed fields are looked up by whichever name the
installed copy has (`SCOPE_SPANS`, `SCOPE`): the fixture works with either copy.

In-process use (what tests do):

    from otlp_receiver import Receiver
    rx = Receiver(); port = rx.start()          # 127.0.0.1, a free port unless port= is given
    ...                                         # point Envoy's collector cluster at port
    spans = rx.wait_for_spans(2, timeout=10)    # list[Span], oldest first
    rx.stop()

`Span.attributes` and `Span.resource` are plain dicts of Python values: OTLP string, int,
double and bool become str, int, float and bool; bytes stay bytes; arrays become lists;
kvlists become dicts. Ids are lower-case hex strings ("" for no parent).

CLI (127.0.0.1 only; prints `LISTENING 127.0.0.1:<port>` when ready, then one JSON line per
span on stdout, or into --jsonl FILE; SIGTERM or SIGINT stops it):

    otlp_receiver.py [--port N] [--jsonl FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD = "Export"

# The installed copy's names for ResourceSpans.scope_spans and ScopeSpans.scope (see above).
SCOPE_SPANS = ("scope_spans" if "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
               else "instrumentation_library_spans")
_SCOPE_SPANS_MSG = trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name[SCOPE_SPANS].message_type
SCOPE = "scope" if "scope" in _SCOPE_SPANS_MSG.fields_by_name else "instrumentation_library"

_KIND = {v.number: v.name.removeprefix("SPAN_KIND_") for v in trace_pb2.Span.SpanKind.DESCRIPTOR.values}
_STATUS = {v.number: v.name.removeprefix("STATUS_CODE_") for v in trace_pb2.Status.StatusCode.DESCRIPTOR.values}


def any_value(v: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value (None when unset)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return int(v.int_value)
    if which == "double_value":
        return float(v.double_value)
    if which == "bool_value":
        return bool(v.bool_value)
    if which == "bytes_value":
        return bytes(v.bytes_value)
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return key_values(v.kvlist_value.values)
    return None


def key_values(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class Span:
    """One received span, decoded to plain values."""
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str                       # SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER, UNSPECIFIED
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, Any]
    status_code: str                # UNSET, OK, ERROR
    status_message: str
    trace_state: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.end_time_unix_nano - self.start_time_unix_nano) / 1e6

    def to_json(self) -> str:
        def enc(o: Any) -> Any:
            if isinstance(o, bytes):
                return o.hex()
            raise TypeError(type(o))
        return json.dumps(asdict(self), default=enc, sort_keys=True)


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    """Every span in an export request, in the order sent."""
    out: list[Span] = []
    for rs in request.resource_spans:
        resource = key_values(rs.resource.attributes)
        for ss in getattr(rs, SCOPE_SPANS):
            scope = getattr(ss, SCOPE)
            for s in ss.spans:
                out.append(Span(
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(),
                    name=s.name,
                    kind=_KIND.get(s.kind, str(s.kind)),
                    start_time_unix_nano=int(s.start_time_unix_nano),
                    end_time_unix_nano=int(s.end_time_unix_nano),
                    attributes=key_values(s.attributes),
                    status_code=_STATUS.get(s.status.code, str(s.status.code)),
                    status_message=s.status.message,
                    trace_state=s.trace_state,
                    events=[{"name": e.name, "time_unix_nano": int(e.time_unix_nano),
                             "attributes": key_values(e.attributes)} for e in s.events],
                    links=[{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                            "attributes": key_values(ln.attributes)} for ln in s.links],
                    resource=resource,
                    scope_name=scope.name,
                    scope_version=scope.version,
                ))
    return out


class Receiver:
    """OTLP/gRPC trace receiver on 127.0.0.1 that stores what it is sent."""

    def __init__(self, on_span: Callable[[Span], None] | None = None):
        self._cond = threading.Condition()
        self._spans: list[Span] = []
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._metadata: list[dict[str, str]] = []
        self._on_span = on_span
        self._server: grpc.Server | None = None
        self.port = 0
        # Set to a grpc.StatusCode to make Export fail (tests of the exporter's error handling).
        self.fail_with: grpc.StatusCode | None = None

    # -- gRPC --------------------------------------------------------------------------
    def _export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext):
        if self.fail_with is not None:
            context.abort(self.fail_with, "otlp_receiver: configured to fail")
        spans = decode(request)
        with self._cond:
            self._requests.append(request)
            self._metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
            self._spans.extend(spans)
            self._cond.notify_all()
        if self._on_span:
            for s in spans:
                self._on_span(s)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Start serving; returns the bound port (a free one when port is 0)."""
        if self._server is not None:
            raise RuntimeError("already started")
        # No SO_REUSEPORT (gRPC's default is on): a second server on the same port must fail
        # instead of silently sharing it (and half the exports) with another receiver.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            METHOD: grpc.unary_unary_rpc_method_handler(
                self._export,
                request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:  # grpcio raises on a failed bind (older versions returned 0)
            raise OSError(f"otlp_receiver: cannot listen on {host}:{port}: {e}") from None
        if bound == 0:
            raise OSError(f"otlp_receiver: cannot listen on {host}:{port}")
        server.start()
        self._server, self.port = server, bound
        return bound

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> "Receiver":
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests read ---------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spans(self, predicate: Callable[[Span], bool] | None = None) -> list[Span]:
        with self._cond:
            return [s for s in self._spans if predicate is None or predicate(s)]

    def requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        with self._cond:
            return list(self._requests)

    def metadata(self) -> list[dict[str, str]]:
        """gRPC metadata (headers) of each Export call, e.g. for checking configured headers."""
        with self._cond:
            return list(self._metadata)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._requests.clear()
            self._metadata.clear()

    def wait_for_spans(self, count: int = 1, timeout: float = 10.0,
                       predicate: Callable[[Span], bool] | None = None) -> list[Span]:
        """Wait until at least `count` spans (matching `predicate`) arrived; returns them all.

        Raises TimeoutError with what did arrive, so a failing test shows the spans."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [s for s in self._spans if predicate is None or predicate(s)]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(s.name, s.kind, s.span_id) for s in self._spans]
                    raise TimeoutError(f"wanted {count} span(s), got {len(got)} matching; all received: {seen}")
                self._cond.wait(left)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick a free one)")
    ap.add_argument("--jsonl", help="append one JSON line per span to this file instead of stdout")
    args = ap.parse_args(argv)

    with open(args.jsonl, "a", buffering=1) if args.jsonl else contextlib.nullcontext(sys.stdout) as out:
        return serve(args.port, out)


def serve(port_arg: int, out) -> int:
    """Receive until SIGTERM/SIGINT, writing each span to `out`."""
    lock = threading.Lock()

    def emit(span: Span) -> None:
        with lock:
            out.write(span.to_json() + "\n")
            out.flush()

    rx = Receiver(on_span=emit)
    port = rx.start(port_arg)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    # Poll: a signal delivered to one of gRPC's threads would not wake a blocked main thread.
    while not done.wait(0.2):
        pass
    rx.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
