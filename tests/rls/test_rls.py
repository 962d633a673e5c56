"""Unit tests of the test-only RLS fixture (tests/rls/rls.py) without Envoy: a real
redis-server on a free 127.0.0.1 port, the fixture as a subprocess (its CLI), and a client
built from the generated `RateLimitServiceStub` (xds-protos).

Run: .venv/bin/pytest -q tests/rls/test_rls.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "e2e"))
import rls  # noqa: E402
from harness import free_port  # noqa: E402

Code = rls_pb2.RateLimitResponse.Code
SECOND, MINUTE, HOUR = 1, 2, 3
DIV = {SECOND: 1, MINUTE: 60, HOUR: 3600}

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class RedisServer:
    def __init__(self, workdir: Path):
        self.port, self.workdir, self.proc = free_port(), workdir, None
        self.start()

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path)
    try:
        yield r
    finally:
        r.stop()


def start_rls(redis_port: int, *flags: str):
    proc = subprocess.Popen([sys.executable, str(HERE / "rls.py"), "--port", "0", "--redis-port", str(redis_port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("LISTENING 127.0.0.1:"):
        stop(proc)
        raise RuntimeError(f"rls.py did not start: {line!r} {proc.stderr.read()}")
    return proc, int(line.rsplit(":", 1)[1])


class Client:
    def __init__(self, port: int, proc: subprocess.Popen):
        self.proc = proc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def call(self, request) -> rls_pb2.RateLimitResponse:
        """Send any message: one of the V138 schema goes out as the generated (1.85.0) class, with
        the field that class lacks carried as an unknown field: the same bytes on the wire."""
        if not isinstance(request, rls_pb2.RateLimitRequest):
            request = rls_pb2.RateLimitRequest.FromString(request.SerializeToString())
        return self.stub.ShouldRateLimit(request, timeout=5)

    def close(self) -> str:
        self.channel.close()
        stop(self.proc)
        return self.proc.stderr.read()


@pytest.fixture
def rls_client(redis_server):
    proc, port = start_rls(redis_server.port)
    c = Client(port, proc)
    try:
        yield c
    finally:
        c.close()


def settle(unit: int, margin: float = 2.0) -> None:
    """Don't start near the end of a clock-aligned window (a reset mid-test would flake)."""
    left = DIV[unit] - time.time() % DIV[unit]
    if left < margin:
        time.sleep(left + 0.05)


def req(*descriptors, hits: int = 0, domain: str = "sluice", cls=rls_pb2.RateLimitRequest):
    r = cls(domain=domain, hits_addend=hits)
    for d in descriptors:
        r.descriptors.add().MergeFromString(d.SerializeToString())
    return r


def desc(user: str, limit: int | None = 100, unit: int = HOUR, hits: int | None = None, negative: bool = False):
    d = rls.RateLimitDescriptorV138() if negative else ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="rule", value="tiered.per-user")
    d.entries.add(key="user", value=user)
    if limit is not None:
        d.limit.requests_per_unit = limit
        d.limit.unit = unit
    if hits is not None:
        d.hits_addend.value = hits
    if negative:
        d.is_negative_hits = True
    return d


def neg_req(*descriptors, hits: int = 0):
    return req(*descriptors, hits=hits, cls=rls.RateLimitRequestV138)


def user() -> str:
    return "u-" + uuid.uuid4().hex[:8]


def key(u: str, unit: int = HOUR) -> str:
    div = DIV[unit]
    return f"sluice_rule_tiered.per-user_user_{u}_{int(time.time()) // div * div}"


def count(redis_server, u: str, unit: int = HOUR):
    v = redis_server.client.get(key(u, unit))
    return None if v is None else int(v)


def codes(resp) -> list[int]:
    return [s.code for s in resp.statuses]


def test_plain_hits_count_one_and_report_the_window(rls_client, redis_server):
    settle(MINUTE)
    u = user()
    remaining = []
    for _ in range(4):
        r = rls_client.call(req(desc(u, limit=3, unit=MINUTE)))
        remaining.append((r.overall_code, r.statuses[0].limit_remaining))
    assert remaining == [(Code.OK, 2), (Code.OK, 1), (Code.OK, 0), (Code.OVER_LIMIT, 0)]
    st = r.statuses[0]
    assert (st.current_limit.requests_per_unit, st.current_limit.unit) == (3, MINUTE)
    assert 1 <= st.duration_until_reset.seconds <= 60
    # upstream's key layout: <domain>_<key>_<value>_..._<window start>, EXPIRE = the unit
    assert count(redis_server, u, MINUTE) == 4
    assert 0 < redis_server.client.ttl(key(u, MINUTE)) <= 60
    # request-level hits_addend when the descriptor has none
    u2 = user()
    r = rls_client.call(req(desc(u2), hits=5))
    assert (r.overall_code, r.statuses[0].limit_remaining) == (Code.OK, 95)


def test_descriptor_hits_addend_takes_precedence_over_request_level(rls_client, redis_server):
    settle(HOUR)
    a, b, c = user(), user(), user()
    r = rls_client.call(req(desc(a, hits=2), desc(b), hits=7))
    assert [s.limit_remaining for s in r.statuses] == [98, 93]
    assert (count(redis_server, a), count(redis_server, b)) == (2, 7)
    # request-level 0 (unset) counts 1 ...
    rls_client.call(req(desc(c)))
    assert count(redis_server, c) == 1
    # ... but a descriptor-level 0 is set: check only, nothing added (not "0 means 1")
    r = rls_client.call(req(desc(c, hits=0), hits=9))
    assert (r.overall_code, r.statuses[0].limit_remaining) == (Code.OK, 99)
    assert count(redis_server, c) == 1


def test_over_limit_when_count_after_increment_exceeds_and_hits_stay_counted(rls_client, redis_server):
    settle(HOUR)
    u, other = user(), user()
    r = rls_client.call(req(desc(u, limit=10, hits=10)))
    assert (r.overall_code, r.statuses[0].limit_remaining) == (Code.OK, 0)  # == limit is fine
    r = rls_client.call(req(desc(u, limit=10, hits=1), desc(other, limit=10, hits=4)))
    assert r.overall_code == Code.OVER_LIMIT
    assert codes(r) == [Code.OVER_LIMIT, Code.OK]
    assert [s.limit_remaining for s in r.statuses] == [0, 6]
    assert r.statuses[0].current_limit.requests_per_unit == 10
    assert r.statuses[0].duration_until_reset.seconds > 0
    # refused hits were counted, and so were the other descriptor's
    assert (count(redis_server, u), count(redis_server, other)) == (11, 4)
    # a check-only probe of an exhausted window is OVER_LIMIT too
    assert rls_client.call(req(desc(u, limit=10, hits=0))).overall_code == Code.OVER_LIMIT
    # limit 0 refuses everything; a descriptor without an override matches no limit: OK, uncounted
    assert rls_client.call(req(desc(user(), limit=0))).overall_code == Code.OVER_LIMIT
    nolimit = user()
    r = rls_client.call(req(desc(nolimit, limit=None, hits=1000)))
    assert r.overall_code == Code.OK and not r.statuses[0].HasField("current_limit")
    assert count(redis_server, nolimit) is None


def test_window_resets_at_the_clock_aligned_boundary(rls_client, redis_server):
    into = time.time() % 1
    if into > 0.5:
        time.sleep(1 - into + 0.02)
    u = user()
    got = [rls_client.call(req(desc(u, limit=2, unit=SECOND))).overall_code for _ in range(3)]
    assert got == [Code.OK, Code.OK, Code.OVER_LIMIT]
    time.sleep(1 - time.time() % 1 + 0.02)  # next second: a fresh window
    r = rls_client.call(req(desc(u, limit=2, unit=SECOND)))
    assert (r.overall_code, r.statuses[0].limit_remaining, r.statuses[0].duration_until_reset.seconds) == (
        Code.OK, 1, 1)


def test_negative_hits_decrement_floored_at_zero_and_always_ok(rls_client, redis_server):
    settle(HOUR)
    u = user()
    rls_client.call(req(desc(u, limit=10, hits=12)))  # 12 > 10: over
    # a refund answers OK even while the count stays above the limit
    r = rls_client.call(neg_req(desc(u, limit=10, hits=1, negative=True)))
    assert (r.overall_code, codes(r), r.statuses[0].limit_remaining) == (Code.OK, [Code.OK], 0)
    assert r.statuses[0].current_limit.requests_per_unit == 10
    assert count(redis_server, u) == 11
    r = rls_client.call(neg_req(desc(u, limit=10, hits=5, negative=True)))
    assert r.statuses[0].limit_remaining == 4 and count(redis_server, u) == 6
    # floored at 0
    r = rls_client.call(neg_req(desc(u, limit=10, hits=100, negative=True)))
    assert r.statuses[0].limit_remaining == 10 and count(redis_server, u) == 0
    # without a descriptor-level hits_addend the request-level one is refunded (0 -> 1)
    rls_client.call(req(desc(u, limit=10, hits=3)))
    rls_client.call(neg_req(desc(u, limit=10, negative=True)))
    assert count(redis_server, u) == 2
    rls_client.call(neg_req(desc(u, limit=10, negative=True), hits=2))
    assert count(redis_server, u) == 0
    # nothing to refund: no key is created
    fresh = user()
    r = rls_client.call(neg_req(desc(fresh, limit=10, hits=3, negative=True)))
    assert r.statuses[0].limit_remaining == 10 and not redis_server.client.exists(key(fresh))
    # a refund never makes the overall code OVER_LIMIT; a positive descriptor beside it still can
    over = user()
    rls_client.call(req(desc(over, limit=1, hits=5)))
    r = rls_client.call(neg_req(desc(over, limit=1, hits=1, negative=True)))
    assert r.overall_code == Code.OK
    r = rls_client.call(neg_req(desc(over, limit=1, hits=1, negative=True), desc(u, limit=1, hits=2)))
    assert (r.overall_code, codes(r)) == (Code.OVER_LIMIT, [Code.OK, Code.OVER_LIMIT])


def test_without_negative_hits_support_a_refund_is_counted_as_hits(redis_server):
    settle(HOUR)
    proc, port = start_rls(redis_server.port, "--no-negative-hits")
    c = Client(port, proc)
    try:
        u = user()
        c.call(req(desc(u, limit=10, hits=8)))
        # what a pre-1.38 service does: field 4 is unknown to proto3 and ignored -> +3, over the limit
        r = c.call(neg_req(desc(u, limit=10, hits=3, negative=True)))
        assert (r.overall_code, r.statuses[0].limit_remaining) == (Code.OVER_LIMIT, 0)
        assert count(redis_server, u) == 11
        # any other unknown field is still rejected
        bad = rls_pb2.RateLimitRequest.FromString(req(desc(u)).SerializeToString() + b"\x48\x01")  # field 9
        with pytest.raises(grpc.RpcError) as e:
            c.call(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        log = c.close()
    assert "ignoring unknown field 4" in log


def test_unknown_fields_and_wrong_wire_types_are_rejected_and_count_nothing(rls_client, redis_server):
    settle(HOUR)
    u = user()
    good = req(desc(u)).SerializeToString()
    entries = ratelimit_pb2.RateLimitDescriptor(entries=desc(u).entries).SerializeToString()
    limit = b"\x12\x04\x08\x64\x10\x03"  # limit {requests_per_unit: 100, unit: HOUR}

    def with_descriptor(body: bytes) -> bytes:
        return b"\x0a\x06sluice\x12" + bytes([len(body)]) + body

    cases = {
        # an unknown request-level field (there is no request-level is_negative_hits)
        "request field 4": good + b"\x20\x01",
        # hits_addend as a bare varint instead of a UInt64Value message (a classic encoder slip)
        "hits_addend as varint": with_descriptor(entries + limit + b"\x18\x05"),
        # an unknown field inside the limit override
        "limit field 3": with_descriptor(entries + b"\x12\x06\x08\x64\x10\x03\x18\x01"),
        # is_negative_hits with the wrong wire type (length-delimited)
        "is_negative_hits as bytes": with_descriptor(entries + limit + b"\x22\x01\x01"),
    }
    assert rls_pb2.RateLimitRequest.FromString(with_descriptor(entries + limit)) == req(desc(u))
    for name, raw in cases.items():
        msg = rls_pb2.RateLimitRequest.FromString(raw)
        with pytest.raises(grpc.RpcError) as e:
            rls_client.call(msg)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "unknown fields" in e.value.details(), name
    assert count(redis_server, u) is None
    # the same request without the stray field passes
    assert rls_client.call(rls_pb2.RateLimitRequest.FromString(good)).overall_code == Code.OK


def test_filter_encoding_parses_under_the_real_schema(rls_client, redis_server):
    """The exact bytes filters/token-ratelimit/src/rls.rs's `request_bytes_match_protobuf` expects."""
    settle(MINUTE)
    u = "alice-" + uuid.uuid4().hex[:6]
    entry = b"\x0a\x04user\x12" + bytes([len(u)]) + u.encode()
    desc_bytes = b"\x0a" + bytes([len(entry)]) + entry + b"\x12\x05\x08\x96\x01\x10\x02\x1a\x03\x08\xac\x02"
    raw = b"\x0a\x06sluice" + b"\x12" + bytes([len(desc_bytes)]) + desc_bytes
    msg = rls_pb2.RateLimitRequest.FromString(raw)
    assert rls.unknown(msg) == []
    r = rls_client.call(msg)
    # 300 hits against 150 a minute
    assert (r.overall_code, r.statuses[0].current_limit.requests_per_unit) == (Code.OVER_LIMIT, 150)
    div = 60
    assert int(redis_server.client.get(f"sluice_user_{u}_{int(time.time()) // div * div}")) == 300


def test_service_errors(rls_client):
    for bad, code in [(req(desc(user()), domain=""), grpc.StatusCode.UNKNOWN),
                      (req(), grpc.StatusCode.UNKNOWN),
                      (req(desc(user(), unit=0)), grpc.StatusCode.INVALID_ARGUMENT),
                      (req(desc(user(), unit=42)), grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as e:
            rls_client.call(bad)
        assert e.value.code() == code, bad


def test_redis_down_is_unavailable_at_once_then_counting_resumes(rls_client, redis_server):
    settle(HOUR)
    u = user()
    assert rls_client.call(req(desc(u))).statuses[0].limit_remaining == 99
    redis_server.stop()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        rls_client.call(req(desc(u)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # no client-side retries/backoff: the answer comes well inside an Envoy RLS timeout (500 ms)
    assert time.monotonic() - t0 < 0.4
    redis_server.start()
    time.sleep(1.5)  # a late retry of the failed call would land now (redis-py's default would)
    r = rls_client.call(req(desc(u)))
    # restarted empty (--save ""): the failed call was not counted late
    assert r.statuses[0].limit_remaining == 99
    assert count(redis_server, u) == 1
