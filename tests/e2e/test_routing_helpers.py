"""Helpers shared by the test_routing_*.py files (model-failover examples); holds no tests."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from pathlib import Path

from harness import ENVOY, ROOT, config_ports, free_port, render_config, wait_for

FILTER_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "sluice_model_failover.wasm"
# Where example configs are read from; another checkout's root (e.g. the pre-fix tree) runs the
# same test against that tree's examples (with SLUICE_TARGET_DIR pointing at its .wasm files).
EXAMPLES_ROOT = Path(os.environ.get("SLUICE_EXAMPLES_ROOT", ROOT))


def example(config: str) -> Path:
    """An example config (e.g. "examples/priority-groups/envoy.yaml") from EXAMPLES_ROOT."""
    return EXAMPLES_ROOT / config


def variant(workdir: Path, config: str, replacements: list[tuple[str, str]]) -> Path:
    """A copy of `config` (e.g. "examples/priority-groups/envoy.yaml") with text replaced
    (each `old` must occur), written into the test's workdir; pass the result to gateway()."""
    text = example(config).read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} not found in {config}"
        text = text.replace(old, new)
    d = workdir / Path(config).parent.name
    d.mkdir(parents=True, exist_ok=True)
    path = d / "envoy.yaml"
    path.write_text(text)
    return path


def models_seen(mock) -> list[str | None]:
    return [e.get("model") for e in mock.log() if e["path"].endswith("/chat/completions")]


def served_by(resp) -> str | None:
    return resp.headers.get("x-mock-provider")


def access_log_entries(envoy, n: int, timeout: float = 10.0) -> list[dict]:
    """The access log once it holds at least `n` entries (Envoy flushes it asynchronously)."""
    return wait_for(lambda: (lambda e: e if len(e) >= n else None)(envoy.access_log()), timeout,
                    f"{n} access log entries")


def envoy_refuses(workdir: Path, text: str, timeout: float = 60.0) -> tuple[int, str]:
    """Start Envoy on config `text` (ports rendered to free ones) and wait for it to exit.
    Returns (exit code, log text). Fails if Envoy is still running after `timeout`."""
    ports = {p: free_port() for p in config_ports(text)}
    cfg = workdir / "refused.yaml"
    cfg.write_text(render_config(text, ports))
    log = workdir / "refused.log"
    proc = subprocess.Popen(
        [str(ENVOY), "-c", str(cfg), "--concurrency", "2", "--disable-hot-restart", "--log-level", "warn", "--log-path", str(log)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"Envoy accepted the config and kept running:\n{log.read_text(errors='replace')[-3000:]}")
    return code, log.read_text(errors="replace")


def ttfb_ms(base_url: str, path: str, body: dict) -> tuple[float, int, bytes]:
    """Time from sending a request to the first response body byte, in ms (plus status and
    the whole body)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, body=data, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    first = resp.read1(1) if hasattr(resp, "read1") else resp.read(1)
    t1 = time.perf_counter()
    rest = resp.read()
    conn.close()
    return (t1 - t0) * 1000.0, resp.status, first + rest
