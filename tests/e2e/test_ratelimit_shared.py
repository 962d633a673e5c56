"""token-ratelimit, shared mode: two real Envoy processes (--concurrency 2 each) count one
budget in one rate-limit service (tests/rls/rls.py, a test fixture) over redis-server."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness import ROOT, VENV_BIN, _stop, free_port, wait_for
from test_ratelimit import PROMPT, ask, variant

SHARED = "examples/shared-ratelimit/envoy.yaml"
HOUR_500 = ('{"window": "minute", "limit": 150},\n                             {"window": "hour", "limit": 300},\n'
            '                             {"window": "day", "limit": 800}', '{"window": "hour", "limit": 500}')

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


class Redis:
    def __init__(self, workdir: Path, port: int):
        self.port, self.workdir = port, workdir
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ping, 10, "redis-server")

    def _ping(self) -> bool:
        import socket
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self):
        _stop(self.proc)


class Rls:
    def __init__(self, workdir: Path, redis_port: int):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "python"), str(ROOT / "tests/rls/rls.py"), "--port", str(self.port),
             "--redis-port", str(redis_port)],
            stdout=subprocess.PIPE, stderr=open(workdir / "rls.log", "ab"), text=True, start_new_session=True)
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


def test_rls_down_and_redis_restart(gateway, workdir, rls_stack):
    redis, rls = rls_stack
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
