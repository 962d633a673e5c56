"""pytest fixtures: `gateway(...)` starts Envoy + mocks for one test and always stops them;
logs of a failed test are kept under .work/e2e/<test>/ and printed."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import WORK, Chroma, Gateway, JwksServer, Mock, clean_workdir  # noqa: E402


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _workdir_for(node) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.nodeid)[-120:]
    d = WORK / name
    clean_workdir(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def workdir(request) -> Path:
    d = _workdir_for(request.node)
    yield d
    failed = any(getattr(request.node, f"rep_{w}", None) and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    if failed:
        print(f"\n[logs kept in {d}]")
        for f in sorted(d.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-30:]
            print(f"--- {f.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    else:
        clean_workdir(d)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "composable: also run with the config's sluice filters composed into the gateway filter")


def pytest_generate_tests(metafunc):
    # Seed scenarios run twice: separate filters, and the same config composed (compose.py).
    if metafunc.definition.get_closest_marker("composable") and "build" in metafunc.fixturenames:
        metafunc.parametrize("build", ["separate", "composed"], indirect=True)


@pytest.fixture
def build(request) -> str:
    """`separate` or `composed` (see the `composable` marker)."""
    return getattr(request, "param", "separate")


@pytest.fixture
def gateway(workdir, build):
    """gateway(config, mocks={port: {mock settings}}, concurrency=2, env={}, ports={cfg_port: real_port}) -> Gateway."""
    started: list[Gateway] = []

    def start(config, mocks=None, **kw) -> Gateway:
        kw.setdefault("composed", build == "composed")
        gw = Gateway(workdir, config, mocks=mocks, **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def mock(workdir):
    """mock(name, **settings) -> a standalone mock provider, stopped after the test."""
    started: list[Mock] = []

    def start(name="mock", **settings) -> Mock:
        m = Mock(workdir, name, **settings)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def chroma(workdir):
    """chroma() -> a real Chroma server on a free 127.0.0.1 port, data in the test's workdir,
    stopped (by PID group) after the test; chroma.stop() stops it earlier ("store down")."""
    started: list[Chroma] = []

    def start(port: int | None = None) -> Chroma:
        c = Chroma(workdir, port)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


@pytest.fixture
def jwks_servers():
    """`jwks_servers(jwks, port=None, start=True)` starts a JwksServer; all are stopped after."""
    started: list[JwksServer] = []

    def make(jwks: dict, **kw) -> JwksServer:
        s = JwksServer(jwks, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
