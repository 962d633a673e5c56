"""scripts/bench.sh keeps working: a minimal smoke run (bare Envoy only, 1-second loads, no
build, report written to a temp path, never to docs/benchmarks.md) produces the report's
tables with a measured bare row. No timing assertions: the numbers are not checked, only that
they exist. Also: every bench/envoy-<config>.yaml whose .wasm is built passes
`envoy --mode validate` (which configures the filters), so the bench configs follow the
filters' config schemas."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ENVOY, ROOT

LATENCY_HEADER = ("| config | status | 4 KB p50 | 4 KB p99 | 32 KB p50 | 32 KB p99 | stream TTFB p50 "
                  "| stream TTFB p90 |")
COST_HEADER = ("| config | status | max rps, zero errors (× bare) | at connections | CPU µs/request (× bare) "
               "| CPU µs/streamed request (× bare) | RSS MiB (+ vs bare) | SSE buffered | .wasm KiB | filters active |")
TARGETS_HEADER = "| config | target | measured | verdict |"

BENCH_CONFIGS = sorted((ROOT / "bench").glob("envoy-*.yaml"))


def test_bench_quick_bare(tmp_path: Path):
    out, js = tmp_path / "benchmarks.md", tmp_path / "results.json"
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.stat().st_mtime_ns if docs.exists() else None
    r = subprocess.run(
        ["bash", "scripts/bench.sh", "--quick", "--no-build", "--configs", "bare", "--connections", "4",
         "--stream-requests", "10", "--out", str(out), "--json", str(js), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    sys.stdout.write(r.stdout[-3000:])
    assert r.returncode == 0, r.stderr[-4000:]
    report = out.read_text()
    assert report.strip() in r.stdout  # printed and written
    for header in (LATENCY_HEADER, COST_HEADER, TARGETS_HEADER):
        assert header in report, f"missing table header {header!r}"
    # the bare row is measured in both tables: numbers, not "-"
    rows = [line for line in report.splitlines() if line.startswith("| bare | ok |")]
    assert len(rows) == 2, rows
    latency_row = rows[0].strip("|").split("|")
    assert all(re.fullmatch(r"\s*\d+\s*", c) for c in latency_row[2:]), rows[0]
    cost_row = [c.strip() for c in rows[1].strip("|").split("|")]
    assert re.fullmatch(r"\d+", cost_row[2]) and cost_row[3] == "4", rows[1]
    assert cost_row[7] == "no", "bare Envoy must not buffer the SSE stream"
    # self-description: machine, Envoy version, the command to reproduce
    assert "- Machine:" in report and "1.40.0" in report
    assert "Reproduce: `scripts/bench.sh --quick --configs bare" in report
    data = json.loads(js.read_text())
    assert data["summary"]["bare"]["status"] == "ok"
    assert data["raw"]["bare"]["rounds"][0]["lat_4k"]["errors"] == 0
    # the repo's report was not touched
    assert (docs.stat().st_mtime_ns if docs.exists() else None) == before


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=[p.name for p in BENCH_CONFIGS])
def test_bench_config_validates(path: Path):
    text = path.read_text()
    wasm = re.findall(r"filename:\s*(target/\S+?\.wasm)", text)
    missing = [w for w in wasm if not (ROOT / w).is_file()]
    if missing:
        pytest.skip(f"not built: {missing}")
    r = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path.relative_to(ROOT))],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and " OK" in (r.stdout + r.stderr), \
        f"{path.name}: envoy --mode validate failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
