"""scripts/bench.sh keeps working: a minimal smoke run (bare Envoy only, 1-second loads, no
build, report written to a temp path, never to docs/benchmarks.md) produces the report's
tables with a measured bare row. No timing assertions: the numbers are not checked, only that
they exist. Also: every bench/envoy-<config>.yaml whose .wasm is built passes
`envoy --mode validate` (which configures the filters), so the bench configs follow the
filters' config schemas. The report's bars and peer rows are rendered from made-up numbers (no
load, no timing), and the peers' pins and configs are checked without installing the peers (they
run only in a full benchmark or with `--peers`)."""
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


# ---------------------------------------------------------------------------------------------
# The report's logic without any load: bench/bench.py's summary, bars and tables on made-up
# numbers (so nothing here depends on timing), the peers' selection and their static configs.

def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sluice_bench", ROOT / "bench" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw(p50: float, cpu_us: float, rss_mib: float, rps: float = 1000.0, buffered: bool = False, **extra) -> dict:
    """One configuration's raw results, one round, as bench.py records them."""
    lat = {"lat_p50_us": p50, "lat_p99_us": 2 * p50, "errors": 0, "requests": 100, "duration_us": 1e6}
    total = [75_000.0] * 10
    ttfb = [60_000.0 if buffered else 600.0 + p50] * 10
    thr = {"rps": rps, "errors": 0, "requests": int(rps), "cpu_ns": int(cpu_us * 1000 * int(rps)), "connections": 4}
    return {"status": "ok", "detail": "", "wasm": [], "probes": {}, "rss_kib": int(rss_mib * 1024),
            "hwm_kib": int(rss_mib * 1024), "processes": 1,
            "rounds": [{"round": 1, "lat_4k": lat, "lat_32k": lat, "throughput": [thr],
                        "stream": {"ttfb_us": ttfb, "total_us": total, "errors": 0, "first_error": None,
                                   "cpu_ns": 1000}}], **extra}


def test_bench_bars_and_peer_rows_render():
    b = _bench_module()
    a = b.parse_args(["--quick", "--peers", "--connections", "4", "--out", "/dev/null"])
    raw = {"bare": _raw(300, 90, 70), "bare-again": _raw(300, 90, 70),
           "auth": _raw(340, 110, 100),                    # 1.22x: within the 1.3x bar
           "prompt-guard": _raw(380, 180, 110),             # 2.0x: misses it
           "suite": _raw(700, 300, 160),                    # 3.33x: within 3.5x
           "composed": _raw(420, 200, 120, rps=600),        # 2.22x, +120 us, +50 MiB, 0.6x
           "litellm-features": _raw(3000, 2500, 900, rps=300,
                                    peer={"peer": "litellm", "version": "LiteLLM 1.108.7", "workers": 2,
                                          "install": {"seconds": 200, "mib": 760}, "startup_s": 60.0}),
           "portkey-features": _raw(900, 600, 150, rps=500, buffered=True,
                                    peer={"peer": "portkey", "version": "Portkey gateway 1.15.2", "workers": 2,
                                          "install": None, "startup_s": 3.0})}
    raw["suite-one-vm"] = {"status": "not built", "detail": "missing target/x.wasm", "wasm": [], "rounds": []}
    s = b.summarise(a, raw)
    rows = {r["id"]: r for r in b.bars(s, reasons={"filter-cpu-prompt-guard": "regex tables"})}
    assert rows["composed-cpu"]["verdict"] == "met" and rows["composed-p50"]["verdict"] == "met"
    assert rows["composed-rss"]["verdict"] == "met" and rows["composed-throughput"]["verdict"] == "met"
    assert rows["filter-cpu-auth"]["verdict"] == "met"
    assert rows["filter-cpu-prompt-guard"]["verdict"] == "MISSED"
    assert rows["filter-cpu-prompt-guard"]["reason"] == "regex tables"
    assert rows["suite-cpu"]["verdict"] == "met"
    assert rows["suite-one-vm-cpu"]["verdict"].startswith("not measured (not built")
    assert rows["filter-cpu-usage-metrics"]["verdict"].startswith("not measured (not run")
    assert rows["vs-litellm-latency"]["verdict"] == "met" and rows["vs-litellm-cpu"]["verdict"] == "met"
    assert rows["vs-portkey-cpu"]["verdict"] == "met"
    report = b.render_report(a, {"nproc": 2, "cpu": "x", "mem_gib": 1, "kernel": "k", "envoy": "1.40.0",
                                 "wrk": "wrk", "loadavg_start": "0 0 0", "commit": "c"}, s)
    assert "## Bars (issue 15)" in report and "| `composed-cpu` |" in report
    assert "## Peers: LiteLLM proxy and the Portkey gateway" in report
    # a features row's status says what it cannot run
    assert f"| litellm-features | {b.PEERS['litellm-features']['short']} |" in report
    assert "| portkey-features | " in report and "**yes**" in report  # buffered shows
    assert b.REASONS_HEADING not in report  # the reasons are in the Bars table, not repeated


def _callout(p50: float, cpu_us: float, requests: int = 500, unexpected: int = 0, **extra) -> dict:
    """One callout run (bench/wrk-callout.lua at c=1) as bench.py records it."""
    return {"requests": requests, "duration_us": 1e6, "errors": unexpected, "errors_unexpected": unexpected,
            "first_unexpected": "200 x-sluice-cache: miss" if unexpected else "", "lat_p50_us": p50,
            "lat_p99_us": 2 * p50, "cpu_ns": int(cpu_us * 1000 * requests), "store_cpu_ns": 1000 * requests, **extra}


def test_bench_cache_rows_render():
    """The semantic-cache and rag rows (issue 17): their own table next to bare's provider call,
    their .wasm sizes in the size table, a miss that was not stored or a hit that was not one is
    MISSED, and they stay out of the latency table (their load is the callout runs only)."""
    b = _bench_module()
    a = b.parse_args(["--quick", "--connections", "4", "--out", "/dev/null"])
    assert {"semantic-cache-miss", "semantic-cache-hit", "semantic-cache-hit-semantic", "rag"} <= set(a.configs)
    assert a.callout and not b.parse_args(["--quick", "--configs", "bare"]).callout
    wasm = {"wasm": ["target/wasm32-wasip1/release/sluice_semantic_cache.wasm"],
            "wasm_kib": {"target/wasm32-wasip1/release/sluice_semantic_cache.wasm": 321.0}}
    bare = _raw(300, 90, 70)
    bare["rounds"][0]["callout"] = _callout(400, 100)
    raw = {"bare": bare,
           "semantic-cache-miss": {**_raw(0, 0, 80), **wasm, "rounds": [
               {"round": 1, "callout": _callout(1800, 400, stored=480, stores_missing=20)}]},
           "semantic-cache-hit": {**_raw(0, 0, 80), **wasm, "rounds": [{"round": 1, "callout": _callout(150, 40)}]},
           "semantic-cache-hit-semantic": {**_raw(0, 0, 80), **wasm, "rounds": [
               {"round": 1, "callout": _callout(1500, 300, unexpected=3)}]},
           "rag": {**_raw(0, 0, 80), "wasm": ["target/wasm32-wasip1/release/sluice_rag.wasm"],
                   "wasm_kib": {"target/wasm32-wasip1/release/sluice_rag.wasm": 250.0},
                   "rounds": [{"round": 1, "callout": _callout(1600, 350, rag_added=500, rag_missing=0)}]}}
    s = b.summarise(a, raw)
    hit = s["semantic-cache-hit"]
    assert hit["c1_p50"] == 150 and hit["add_c1_p50"] == -250 and round(hit["ratio_c1_cpu_us_per_req"], 2) == 0.4
    assert round(s["semantic-cache-miss"]["ratio_c1_cpu_us_per_req"], 1) == 4.0
    verdicts = {(n, c["target"].split(" (")[0]): c["verdict"] for n, r in s.items() for c in r["checks"]}
    assert verdicts[("semantic-cache-miss", "every miss stored in Chroma")] == "MISSED"
    assert verdicts[("semantic-cache-hit", "every request of the c=1 runs got a 200 with `x-sluice-cache: hit-exact`")] == "met"
    assert verdicts[("semantic-cache-hit-semantic",
                     "every request of the c=1 runs got a 200 with `x-sluice-cache: hit-semantic`")] == "MISSED"
    assert verdicts[("rag", "every request got passages")] == "met"
    assert verdicts[("semantic-cache-hit", "sluice_semantic_cache.wasm at most 450 KiB")] == "met"
    report = b.render_report(a, {"nproc": 2, "cpu": "x", "mem_gib": 1, "kernel": "k", "envoy": "1.40.0",
                                 "wrk": "wrk", "loadavg_start": "0 0 0", "commit": "c"}, s)
    assert "## Semantic cache and RAG" in report
    section = report.split("## Semantic cache and RAG", 1)[1].split("\n## ", 1)[0]
    assert "| bare | ok | a provider call" in section and "| 400 | 800 | 100 |" in section
    assert "| semantic-cache-hit | ok | an exact hit" in section and "150 (-250, 0.38×)" in section
    assert "**20 not stored**" in section and "**3 errors or unexpected answers**" in section
    latency = report.split("## Latency at concurrency 1", 1)[1].split("\n## ", 1)[0]
    assert "| semantic-cache-miss |" not in latency and "| rag |" not in latency
    cost = report.split("## Throughput, CPU, memory, size", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| semantic-cache-miss \| ok \| - \| - \| see below \|.*\| 321 \|", cost, re.M), cost
    assert re.search(r"^\| rag \| ok \|.*\| 250 \|", cost, re.M), cost


def test_bench_peers_only_on_request():
    b = _bench_module()
    assert not set(b.PEER_NAMES) & set(b.parse_args(["--quick"]).configs)  # the smoke run stays short
    assert set(b.PEER_NAMES) <= set(b.parse_args([]).configs)  # the full run measures them
    assert not set(b.PEER_NAMES) & set(b.parse_args(["--no-peers"]).configs)
    assert set(b.PEER_NAMES) <= set(b.parse_args(["--quick", "--peers"]).configs)
    assert b.parse_args(["--quick", "--configs", "portkey"]).configs == ["bare", "portkey"]


def test_bench_peer_configs_are_pinned_and_local():
    import yaml

    peers = ROOT / "bench" / "peers"
    reqs = (peers / "litellm-requirements.txt").read_text()
    pin = re.search(r"^litellm\[proxy\]==([\d.]+)$", reqs, re.M)
    assert pin, "litellm[proxy] must be pinned"
    assert f"litellm=={pin.group(1)}" in (peers / "litellm-constraints.txt").read_text()
    pkg = json.loads((peers / "package.json").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", pkg["dependencies"]["@portkey-ai/gateway"])
    lock = json.loads((peers / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@portkey-ai/gateway"]["version"] == pkg["dependencies"]["@portkey-ai/gateway"]
    for name in ("litellm", "litellm-features"):
        cfg = yaml.safe_load((peers / f"{name}.yaml").read_text())
        assert cfg["model_list"] and all(d["litellm_params"]["api_base"].startswith("http://127.0.0.1:18001/")
                                         for d in cfg["model_list"])
        assert "database_url" not in json.dumps(cfg).lower()
    for name in ("portkey", "portkey-features"):
        text = (peers / f"{name}.json").read_text()
        hosts = re.findall(r'"custom_host":\s*"([^"]+)"', text)
        assert hosts and all(h.startswith("http://127.0.0.1:18001/") for h in hosts)
        assert "portkey." not in text  # only the gateway's local (default.*) checks, no hosted ones
