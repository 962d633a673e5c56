"""usage-metrics filter end to end (examples/usage-metrics/envoy.yaml, seeds 003 and 004).

A known mix of requests (non-streaming, streaming with and without include_usage, two
models, two providers, one route without provider metadata) goes through real Envoy to two
mock providers. Then /stats/prometheus must show exactly the token sums the mocks reported,
the access log lines must carry the same numbers, stream clients must get exactly the usage
chunks they asked for (also through the official OpenAI SDK), a real Prometheus must scrape
the totals, and broken provider answers must complete and be counted as estimates.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import requests

from harness import ENVOY, ROOT, chat, free_port, render_config, sse_events, wait_for

CONFIG = "examples/usage-metrics/envoy.yaml"
EXAMPLE = ROOT / "examples" / "usage-metrics"
OPENAI_TEXT = "The quick brown fox jumps"  # 5 completion tokens (the mock counts words)
MISTRAL_TEXT = "Bonjour from mistral"  # 3
MOCKS = {
    18001: {"name": "openai", "model": "gpt-4o", "response_text": OPENAI_TEXT},
    18002: {"name": "mistral", "model": "mistral-small", "response_text": MISTRAL_TEXT},
}

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(prom_text: str, name: str) -> list[tuple[dict, float]]:
    """Every sample of metric `name` in Prometheus text: (labels, value)."""
    out = []
    for line in prom_text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def prompt_tokens(text: str) -> int:
    """The mock's rule: ceil(UTF-8 bytes of the message texts / 4)."""
    return math.ceil(len(text.encode()) / 4)


def usage_chunks(events: list[str]) -> list[dict]:
    out = []
    for e in events:
        if e == "[DONE]":
            continue
        chunk = json.loads(e)
        if chunk.get("usage"):
            out.append(chunk)
    return out


def wait_access_log(gw, n: int) -> list[dict]:
    return wait_for(lambda: (lambda lines: lines if len(lines) >= n else None)(gw.envoy.access_log()),
                    15, f"{n} access log lines")


@pytest.mark.composable
def test_known_mix_gives_exact_tokens_in_prometheus_and_access_log(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    expected = Counter()  # (provider, model, token_type) -> tokens
    per_request = []  # (provider, model, input, output)

    def expect(provider: str, model: str, text: str, completion: int):
        p = prompt_tokens(text)
        expected[(provider, model, "input")] += p
        expected[(provider, model, "output")] += completion
        per_request.append((provider, model, p, completion))

    # 1-2. Non-streaming, two models on the openai route.
    for model, text in [("gpt-4o", "What is two plus two, please?"), ("gpt-4o-mini", "Name a colour")]:
        r = gw.post(json_body=chat(text, model=model))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(text)
        expect("openai", model, text, 5)

    # 3. Streaming without include_usage: the filter asks the provider for usage and hides
    #    that chunk again, so the client sees no usage chunk.
    text = "Tell me a story about a lighthouse keeper"
    gw.mocks[18001].clear_log()
    r = gw.post(json_body=chat(text, model="gpt-4o", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert usage_chunks(events) == [], events
    assert all(json.loads(e)["choices"] for e in events[:-1]), "no choices-less chunk reaches the client"
    upstream_body = gw.mocks[18001].log()[0]["body"]
    assert upstream_body["stream_options"] == {"include_usage": True}, "filter asked the provider for usage"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == OPENAI_TEXT
    expect("openai", "gpt-4o", text, 5)

    # 4. Streaming with include_usage on the mistral route: exactly one usage chunk, untouched.
    text = "Quelle heure est-il ?"
    r = gw.post("/mistral/v1/chat/completions",
                json_body=chat(text, model="mistral-small", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    chunks = usage_chunks(sse_events(r))
    assert len(chunks) == 1 and chunks[0]["choices"] == []
    assert chunks[0]["usage"]["prompt_tokens"] == prompt_tokens(text)
    assert chunks[0]["usage"]["completion_tokens"] == 3
    expect("mistral", "mistral-small", text, 3)

    # 5. A route without provider metadata: the provider label is the cluster name.
    text = "Short one"
    r = gw.post("/raw/v1/chat/completions", json_body=chat(text, model="mistral-large"))
    assert r.status_code == 200
    expect("mistral-upstream", "mistral-large", text, 3)

    # 6-8. The official OpenAI SDK parses all three shapes.
    from openai import OpenAI

    client = OpenAI(base_url=gw.url("/v1"), api_key="sk-test", max_retries=0)
    text = "SDK stream without usage"
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}], stream=True)
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == OPENAI_TEXT
    assert all(c.usage is None for c in got), "no usage chunk when the client did not ask"
    assert all(c.choices for c in got)
    expect("openai", "gpt-4o", text, 5)

    mistral = OpenAI(base_url=gw.url("/mistral/v1"), api_key="sk-test", max_retries=0)
    text = "SDK stream with usage please"
    stream = mistral.chat.completions.create(model="mistral-small", messages=[{"role": "user", "content": text}],
                                             stream=True, stream_options={"include_usage": True})
    got = list(stream)
    with_usage = [c for c in got if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].choices == []
    assert with_usage[0].usage.prompt_tokens == prompt_tokens(text)
    assert with_usage[0].usage.completion_tokens == 3
    expect("mistral", "mistral-small", text, 3)

    text = "SDK plain call"
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    assert resp.usage.total_tokens == prompt_tokens(text) + 5
    expect("openai", "gpt-4o-mini", text, 5)

    # Prometheus text: exactly the expected sums, nothing else, nothing estimated.
    prom = gw.envoy.prometheus()
    got = Counter()
    for labels, value in samples(prom, "gen_ai_client_token_usage"):
        assert labels["gen_ai_operation_name"] == "chat"
        assert labels["gen_ai_response_model"] == labels["gen_ai_request_model"], labels  # the mock echoes it
        got[(labels["gen_ai_provider_name"], labels["gen_ai_request_model"], labels["gen_ai_token_type"])] += value
    assert dict(got) == {k: float(v) for k, v in expected.items()}, prom
    n = len(per_request)
    requests_2xx = sum(v for lab, v in samples(prom, "sluice_usage_requests") if lab["sluice_status_class"] == "2xx")
    assert requests_2xx == n
    assert sum(v for _, v in samples(prom, "sluice_usage_estimated")) == 0
    # Histograms appear after a stats flush (1 s): one TTFT sample per stream (4 streams).
    streams = 4
    wait_for(lambda: sum(v for _, v in samples(gw.envoy.prometheus(), "gen_ai_server_time_to_first_token_count"))
             == streams, 10, "time-to-first-token histogram samples")
    assert sum(v for _, v in samples(gw.envoy.prometheus(), "gen_ai_server_time_per_output_token_count")) == streams

    # Access log: one line per request carrying the same numbers.
    lines = wait_access_log(gw, n)
    chat_lines = [ln for ln in lines if ln["path"].endswith("/chat/completions")]
    assert len(chat_lines) == n, lines
    logged = Counter(
        (ln["gen_ai.provider.name"], ln["gen_ai.request.model"], int(ln["gen_ai.usage.input_tokens"]),
         int(ln["gen_ai.usage.output_tokens"]))
        for ln in chat_lines
    )
    assert logged == Counter(per_request), chat_lines
    for ln in chat_lines:
        assert ln["http.status"] == 200
        assert int(ln["gen_ai.usage.total_tokens"]) == int(ln["gen_ai.usage.input_tokens"]) + int(
            ln["gen_ai.usage.output_tokens"])
        assert ln["gen_ai.usage.estimated"] == "false"
        assert ln["gen_ai.response.model"] == ln["gen_ai.request.model"]
        assert ln["endpoint"].startswith("127.0.0.1:")
        assert int(ln["time_to_first_token_ms"]) >= 0


def test_broken_provider_answers_complete_and_count_as_estimates(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    openai = gw.mocks[18001]

    def send(body, **kw):
        """Send and read everything; a cut-off answer may raise, which is fine: it ended."""
        try:
            r = gw.post(json_body=body, timeout=20, **kw)
            return r.status_code, r.content
        except requests.exceptions.RequestException as e:  # truncated by the provider
            return None, repr(e).encode()

    text = "twelve bytes"  # 3 prompt tokens either way
    cases = [
        # (mock settings, request, expected sluice_reason)
        ({"rate_truncate": 100}, chat(text, model="m1"), "incomplete"),
        ({"rate_truncate": 100}, chat(text, model="m1", stream=True), "incomplete"),
        ({"malformed_usage": True}, chat(text, model="m2"), "invalid_usage"),
        ({"malformed_usage": True}, chat(text, model="m2", stream=True), "invalid_usage"),
        ({"malformed_usage": True}, chat(text, model="m2", stream=True, stream_options={"include_usage": True}),
         "invalid_usage"),
        ({"rate_malformed": 100}, chat(text, model="m3"), "invalid_body"),
        ({"rate_malformed": 100}, chat(text, model="m3", stream=True), "no_usage"),
    ]
    want = Counter()
    for settings, body, reason in cases:
        openai.configure(rate_truncate=0, malformed_usage=False, rate_malformed=0)
        openai.configure(**settings)
        status, content = send(body)
        if status is not None:
            assert status == 200, content
        if body.get("stream") and not body.get("stream_options") and status == 200:
            # The client did not ask for usage: even a garbage usage chunk is hidden.
            assert b'"choices":[]' not in content, content
        want[(body["model"], reason)] += 1

    # Every request completed and was accounted for (truncated ones at stream end).
    def estimated():
        return Counter({(lab["gen_ai_request_model"], lab["sluice_reason"]): int(v)
                        for lab, v in samples(gw.envoy.prometheus(), "sluice_usage_estimated")})

    wait_for(lambda: estimated() == want, 10, f"estimates {dict(want)}")
    prom = gw.envoy.prometheus()
    est_input = sum(v for lab, v in samples(prom, "sluice_usage_estimated_tokens")
                    if lab["gen_ai_token_type"] == "input")
    assert est_input == 3 * len(cases), "prompt estimate: ceil(12 bytes / 4) per request"
    # The estimates are in the token counter too.
    tok_input = sum(v for lab, v in samples(prom, "gen_ai_client_token_usage") if lab["gen_ai_token_type"] == "input")
    assert tok_input == est_input

    # The VM is alive and exact again once the provider behaves.
    openai.configure(rate_truncate=0, malformed_usage=False, rate_malformed=0)
    r = gw.post(json_body=chat("back to normal", model="ok"))
    assert r.status_code == 200
    prom = gw.envoy.prometheus()
    assert sum(v for lab, v in samples(prom, "gen_ai_client_token_usage")
               if lab["gen_ai_request_model"] == "ok" and lab["gen_ai_token_type"] == "output") == 5
    log = gw.envoy.log_path.read_text(errors="replace")
    assert "panicked" not in log and "RuntimeError" not in log
    lines = wait_access_log(gw, len(cases) + 1)
    # Every broken answer's line says "estimated", the truncated ones (accounted in on_log) too.
    broken = [ln for ln in lines if ln["gen_ai.request.model"] in ("m1", "m2", "m3")]
    assert len(broken) == len(cases), lines
    for ln in broken:
        assert ln["gen_ai.usage.estimated"] == "true", ln
        assert ln["gen_ai.usage.input_tokens"] == "3", ln
    assert sum(1 for ln in broken if ln["response_flags"] == "UPE") == 2, "the two truncated answers"


def variant(workdir: Path, config_json: str) -> Path:
    """The example with another filter configuration, written under the test's workdir."""
    text = (ROOT / CONFIG).read_text()
    old = re.search(r"value: '\{\"inject_include_usage\".*'", text)
    assert old, "the example's filter configuration line"
    path = workdir / "usage-metrics-variant" / "envoy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(old.group(0), f"value: '{config_json}'"))
    return path


def test_request_cap_and_opt_in_user_labels(gateway, workdir):
    cfg = variant(workdir, '{"max_request_body_bytes":2048,"user_label":true,"team_label":true,'
                          '"known_models":["gpt-4o","gpt-4o-mini"]}')
    gw = gateway(cfg, mocks=MOCKS)
    # Over the cap: 413 in the OpenAI error shape, nothing reaches the provider.
    r = gw.post(json_body=chat("x" * 4000, model="gpt-4o"))
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "2048" in err["message"]
    assert gw.mocks[18001].log() == []
    # Under the cap: counted, with the opt-in labels (`none`: no auth filter wrote a user here).
    r = gw.post(json_body=chat("fits", model="gpt-4o"))
    assert r.status_code == 200
    prom = gw.envoy.prometheus()
    tokens = samples(prom, "gen_ai_client_token_usage")
    assert tokens and all(lab["sluice_user"] == "none" and lab["sluice_team"] == "none" for lab, _ in tokens)
    by_class = {lab["sluice_status_class"]: v for lab, v in samples(prom, "sluice_usage_requests")}
    assert by_class == {"2xx": 1.0, "4xx": 1.0}


def test_prometheus_server_scrapes_the_token_total(gateway, workdir):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (Debian package `prometheus`, see scripts/apt-packages.txt)")
    gw = gateway(CONFIG, mocks=MOCKS)
    total = 0
    for i, (path, model) in enumerate([("/v1/chat/completions", "gpt-4o"), ("/mistral/v1/chat/completions", "mistral-small")]):
        text = f"prometheus check number {i}"
        r = gw.post(path, json_body=chat(text, model=model, stream=bool(i)))
        assert r.status_code == 200
        total += prompt_tokens(text) + (5 if model == "gpt-4o" else 3)

    # The example's scrape config, pointed at this Envoy's admin port.
    scrape = (EXAMPLE / "prometheus.yml").read_text().replace("127.0.0.1:9901", f"127.0.0.1:{gw.envoy.admin_port}")
    (workdir / "prometheus.yml").write_text(scrape)
    port = free_port()
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={workdir / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={workdir / 'tsdb'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def query_total():
            r = requests.get(api, params={"query": "sum(gen_ai_client_token_usage)"}, timeout=2).json()
            result = r["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        got = wait_for(lambda: query_total() == total, 30, f"Prometheus to report {total} tokens")
        assert got
        r = requests.get(api, params={"query": 'sum by (gen_ai_provider_name) (gen_ai_client_token_usage{gen_ai_token_type="output"})'},
                         timeout=2).json()
        by_provider = {s["metric"]["gen_ai_provider_name"]: float(s["value"][1]) for s in r["data"]["result"]}
        assert by_provider == {"openai": 5.0, "mistral": 3.0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_bad_config_makes_envoy_refuse_to_start_naming_the_field(workdir):
    text = variant(workdir, '{"inject_include_usage":true,"max_label_values":0}').read_text()
    assert "max_label_values" in text
    port_map = {p: free_port() for p in (10000, 9901, 18001, 18002)}
    bad = workdir / "envoy-bad.yaml"
    bad.write_text(render_config(text, port_map))
    # A plugin whose on_configure fails is fatal at load even with FAIL_OPEN: Envoy exits.
    r = subprocess.run([str(ENVOY), "-c", str(bad), "--concurrency", "1", "--disable-hot-restart",
                        "--log-level", "warn"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "usage-metrics: invalid config: max_label_values: must be greater than 0" in out, out[-3000:]


def test_dashboard_and_scrape_config_are_valid():
    dash = json.loads((EXAMPLE / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    text = " ".join(exprs)
    for metric in ["gen_ai_client_token_usage", "gen_ai_server_time_to_first_token_bucket",
                   "sluice_usage_requests", "sluice_usage_estimated", "envoy_cluster_upstream_rq_retry"]:
        assert metric in text, metric
    for needle in ["gen_ai_provider_name", "gen_ai_request_model", "sluice_user", "sluice_team"]:
        assert needle in text, needle
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    import yaml

    scrape = yaml.safe_load((EXAMPLE / "prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9901"]
