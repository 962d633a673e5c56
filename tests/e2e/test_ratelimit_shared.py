"""token-ratelimit, shared mode: two real Envoy processes (--concurrency 2 each) count one
budget in one rate-limit service (tests/rls/rls.py, a test fixture) over redis-server."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness import ROOT, VENV_BIN, _stop, chat, free_port, sse_events, wait_for
from test_ratelimit import PROMPT, _raw_post, _read_until, _reset, ask, variant

SHARED = "examples/shared-ratelimit/envoy.yaml"
HOUR_500 = ('{"window": "minute", "limit": 150},\n                             {"window": "hour", "limit": 300},\n'
            '                             {"window": "day", "limit": 800}', '{"window": "hour", "limit": 500}')

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


class Redis:
    def __init__(self, workdir: Path, port: int):
        self.port, self.workdir = port, workdir
        self.start()

    def start(self):
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ping, 10, "redis-server")

    def _ping(self) -> bool:
        import socket
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self):
        _stop(self.proc)


class Rls:
    def __init__(self, workdir: Path, redis_port: int, negative_hits: bool = True):
        self.port = free_port()
        extra = [] if negative_hits else ["--no-negative-hits"]
        with open(workdir / "rls.log", "ab") as err:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "python"), str(ROOT / "tests/rls/rls.py"), "--port", str(self.port),
                 "--redis-port", str(redis_port), *extra],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING"), line

    def stop(self):
        _stop(self.proc)


@pytest.fixture
def rls_stack(workdir):
    redis = Redis(workdir, free_port())
    rls = Rls(workdir, redis.port)
    yield redis, rls
    rls.stop()
    redis.stop()


def test_two_envoys_share_one_budget(gateway, workdir, rls_stack):
    redis, rls = rls_stack
    cfg = variant(workdir, SHARED, "shared", lambda t: t.replace(*HOUR_500))
    a = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                ports={18100: rls.port})
    mock_port = a.mocks[18001].port
    b = gateway(cfg, ports={18100: rls.port, 18001: mock_port})

    # 50 parallel requests of 50 tokens, alternating between the two Envoys, limit 500.
    def one(i):
        return ask(a if i % 2 else b, "alice")

    with ThreadPoolExecutor(max_workers=50) as pool:
        rs = list(pool.map(one, range(50)))
    assert all(r.status_code in (200, 429) for r in rs), [(r.status_code, r.text) for r in rs]
    ok = [r for r in rs if r.status_code == 200]
    admitted_tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
    # exact estimate (max_tokens = real output): the bound is 0
    assert admitted_tokens <= 500
    assert len(ok) == 10
    assert len(a.mocks[18001].log()) == 10
    refused = next(r for r in rs if r.status_code == 429)
    assert refused.headers["x-envoy-ratelimited"] == "true"
    assert "per hour window" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # Bob passes on either replica and sees the RLS's remaining count.
    r = ask(a, "bob")
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "450"
    r = ask(b, "bob")
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "400"

    # Real usage above the reservation is sent as a correction: reserve 10 + 20, use 10 + 40.
    r = ask(b, "carol", max_tokens=20)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "470"
    r = ask(a, "carol")
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-tokens"] == str(500 - 50 - 50)


def away_from_the_hour() -> None:
    """Start a test that counts in the hour window at least two minutes before it ends.

    The RLS's windows are clock-aligned (Redis key per window start): a test that fills an
    hour window and then expects a 429 fails if the hour turns in between (the count starts
    again from 0). The sleep is at most two minutes, and only in the last two of an hour."""
    left = 3600 - time.time() % 3600
    if left < 120:
        time.sleep(left + 0.5)


def test_rls_down_and_redis_restart(gateway, workdir, rls_stack):
    # Issue 14 §8, the flake ("a request in the loop of nine after the restart got 429 early:
    # something was counted twice"). Cause: the request refused with 503 while Redis was down
    # was counted later. The RLS fixture's Redis client retried it with backoff (redis-py's
    # default) after Envoy's 500 ms deadline had given up, and the write landed once Redis was
    # back — so the budget held one phantom reservation. When it landed after the first 200
    # (which still showed 450), a request of the nine got 429. Reproduced against the old
    # fixture (see the report); fixed in tests/rls/rls.py (no client retries, no counting after
    # the deadline), which tests/rls/test_rls.py checks. The filter itself sends no retries
    # (one call per decision; corrections only for answered, admitted requests).
    redis, rls = rls_stack
    away_from_the_hour()
    cfg = variant(workdir, SHARED, "faults", lambda t: t.replace(*HOUR_500))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                 ports={18100: rls.port})
    assert ask(gw, "alice").status_code == 200

    # Redis restarted: the RLS answers UNAVAILABLE meanwhile -> failure mode deny (503).
    redis.stop()
    r = ask(gw, "alice")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "ratelimit_unavailable"
    redis.start()
    # counting resumes (the restarted Redis kept nothing: --save "")
    r = wait_for(lambda: (lambda x: x if x.status_code == 200 else None)(ask(gw, "alice")), 10, "RLS back")
    assert r.headers["x-ratelimit-remaining-tokens"] == "450"
    for _ in range(9):
        assert ask(gw, "alice").status_code == 200
    assert ask(gw, "alice").status_code == 429

    # RLS process gone: deny by default ...
    rls.stop()
    r = ask(gw, "bob")
    assert r.status_code == 503 and r.json()["error"]["code"] == "ratelimit_unavailable"
    # ... and allow when configured so.
    cfg_allow = variant(workdir, SHARED, "allow", lambda t: t.replace('"failure_mode": "deny"', '"failure_mode": "allow"'))
    gw2 = gateway(cfg_allow, ports={18100: rls.port, 18001: gw.mocks[18001].port})
    r = ask(gw2, "bob")
    assert r.status_code == 200
    assert "x-ratelimit-limit-tokens" not in r.headers


# ----- issue 14 §8: the wire format and negative hits -------------------------------------------

sys.path.insert(0, str(ROOT / "tests" / "rls"))


class RecordingRls:
    """An RLS that parses every request with Envoy's generated messages (xds-protos, plus
    1.38's is_negative_hits as in tests/rls/rls.py), records it and answers OK."""

    def __init__(self):
        import grpc
        import rls as fixture
        from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

        self.requests: list = []
        outer = self

        class Servicer(rls_pb2_grpc.RateLimitServiceServicer):
            def ShouldRateLimit(self, request, context):  # noqa: N802
                msg = fixture.RateLimitRequestV138.FromString(request.SerializeToString())
                assert fixture.unknown(msg) == [], fixture.unknown(msg)
                outer.requests.append(msg)
                Code = rls_pb2.RateLimitResponse.Code
                return rls_pb2.RateLimitResponse(
                    overall_code=Code.OK,
                    statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK, limit_remaining=1000)
                              for _ in msg.descriptors])

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def recording_rls():
    r = RecordingRls()
    yield r
    r.stop()


def test_hits_travel_at_request_and_descriptor_level_and_refunds_are_negative(gateway, workdir, recording_rls):
    # A service that reads only the request-level hits_addend counted every request as 1
    # (the filter left it 0). Both levels now say the same; an unused reservation goes back as
    # negative hits (RateLimitDescriptor.is_negative_hits, Envoy 1.38+).
    gw = gateway(SHARED, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                 ports={18100: recording_rls.port})
    r = ask(gw, "alice", max_tokens=100)  # reserves 10 + 100, uses 10 + 40
    assert r.status_code == 200, r.text
    check = recording_rls.requests[0]
    assert check.domain == "sluice"
    assert len(check.descriptors) == 3  # minute, hour, day
    assert check.hits_addend == 110
    for d in check.descriptors:
        assert d.HasField("hits_addend") and d.hits_addend.value == 110 and not d.is_negative_hits
        assert (d.entries[0].key, d.entries[0].value) == ("rule", "tiered.per-user")
        assert d.limit.requests_per_unit in (150, 300, 800)
    wait_for(lambda: len(recording_rls.requests) >= 2, 10, "the refund")
    refund = recording_rls.requests[1]
    assert refund.hits_addend == 60
    assert [(d.hits_addend.value, d.is_negative_hits) for d in refund.descriptors] == [(60, True)] * 3


def _redis_count(redis_port: int, user: str) -> int:
    import redis as redis_py

    c = redis_py.Redis(host="127.0.0.1", port=redis_port)
    keys = [k for k in c.keys(f"*user_{user}_*") if b"window_hour" in k]
    return sum(int(c.get(k) or 0) for k in keys)


def test_unused_reservations_are_returned(gateway, workdir, rls_stack):
    # Reserve 10 + 100, use 10 + 40: the RLS gets the 60 back, so the window counts 50.
    redis, rls = rls_stack
    away_from_the_hour()
    cfg = variant(workdir, SHARED, "refund", lambda t: t.replace(*HOUR_500))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                 ports={18100: rls.port})
    r = ask(gw, "carol", max_tokens=100)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "390"
    wait_for(lambda: _redis_count(redis.port, "carol") == 50, 10, "the refund of 60")
    r = ask(gw, "carol")
    assert r.headers["x-ratelimit-remaining-tokens"] == "400"


def test_refused_hits_are_returned(gateway, workdir, rls_stack):
    # The RLS adds before it compares, so a refused request's hits used to stay counted: once a
    # window had too little left for one big request, it stayed exhausted for small ones too.
    redis, rls = rls_stack
    away_from_the_hour()
    cfg = variant(workdir, SHARED, "refused", lambda t: t.replace(*HOUR_500))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                 ports={18100: rls.port})
    for _ in range(9):
        assert ask(gw, "dave").status_code == 200  # 450 of 500
    r = ask(gw, "dave", max_tokens=100)  # 110 does not fit
    assert r.status_code == 429
    wait_for(lambda: _redis_count(redis.port, "dave") == 450, 10, "the refund of the refused hits")
    assert ask(gw, "dave").status_code == 200  # 50 still fits


def test_without_negative_hits_nothing_is_sent_back(gateway, workdir, redis_rls_old):
    # rls.negative_hits: false, for services on the pre-1.38 schema: such a service would
    # count a refund as hits, so the filter sends none and the window over-counts instead.
    redis, rls = redis_rls_old
    away_from_the_hour()
    cfg = variant(workdir, SHARED, "noneg", lambda t: t.replace(*HOUR_500).replace(
        '"timeout": "500ms"}', '"timeout": "500ms", "negative_hits": false}'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}},
                 ports={18100: rls.port})
    r = ask(gw, "erin", max_tokens=100)
    assert r.status_code == 200
    time.sleep(0.5)
    assert _redis_count(redis.port, "erin") == 110
    r = ask(gw, "erin")
    assert r.headers["x-ratelimit-remaining-tokens"] == str(500 - 110 - 50)


@pytest.fixture
def redis_rls_old(workdir):
    redis = Redis(workdir, free_port())
    rls = Rls(workdir, redis.port, negative_hits=False)
    yield redis, rls
    rls.stop()
    redis.stop()


def test_overshoot_bound_shared_under_50_parallel_streams(gateway, workdir, rls_stack):
    # The README's bound in shared mode, two Envoys: 50 parallel streams that reserve 10 + 40
    # and use 10 + 60, a fifth of them reset by the client after their first token (charged
    # what was streamed, settled from the root context): counted <= L + admitted * 20.
    redis, rls = rls_stack
    away_from_the_hour()
    cfg = variant(workdir, SHARED, "bound", lambda t: t.replace(
        HOUR_500[0], '{"window": "hour", "limit": 1000}').replace('"default_output_tokens": 256', '"default_output_tokens": 40'))
    a = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 60, "chunk_delay_ms": 5}},
                ports={18100: rls.port})
    b = gateway(cfg, ports={18100: rls.port, 18001: a.mocks[18001].port})

    def one(i):
        gw = a if i % 2 else b
        body = chat(PROMPT, model="gpt-4o", stream=True, stream_options={"include_usage": True})
        if i % 5 == 0:
            sock = _raw_post(gw.envoy.listener_port, body, {"x-user": b"frank"})
            got = _read_until(sock, lambda x: b"\r\n\r\n" in x and (b" 429 " in x[:20] or b'"content":"' in x))
            _reset(sock)
            return ("aborted", b" 200 " in got[:20])
        r = gw.post(json_body=body, headers={"x-user": "frank"})
        return (r.status_code, r)

    with ThreadPoolExecutor(max_workers=50) as pool:
        out = list(pool.map(one, range(50)))
    assert all(s in (200, 429, "aborted") for s, _ in out), [s for s, _ in out]
    admitted = sum(1 for s, r in out if s == 200 or (s == "aborted" and r))
    assert admitted >= 1
    done = [r for s, r in out if s == 200]
    for r in done:
        assert [e for e in sse_events(r) if '"usage"' in e], "a complete stream has its usage"
    # corrections and refunds land (the admitted ones: +20 each; aborted: charged what was seen)
    time.sleep(2)
    counted = _redis_count(redis.port, "frank")
    assert counted <= 1000 + admitted * 20, (admitted, counted)
    aborted = sum(1 for s, r in out if s == "aborted" and r)
    assert counted >= len(done) * 70 + aborted * 10, (len(done), aborted, counted)
