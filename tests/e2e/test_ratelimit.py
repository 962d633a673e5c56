"""token-ratelimit, local mode: real Envoy (--concurrency 2), the built wasm, mock providers.

Identities come from the `x-user` header (the filter's `user_header` fallback), so these tests
do not depend on the auth filter. Usage is made exact and known: the prompt is 40 bytes
(the mock reports ceil(40/4) = 10 prompt tokens, the filter estimates the same) and the mock
reports a fixed number of completion tokens.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness import ENVOY, ROOT, chat, free_port, render_config, sse_events, wait_for

TIERED = "examples/tiered-ratelimit/envoy.yaml"
INPUT = "examples/input-token-limit/envoy.yaml"
PROMPT = "x" * 40  # 10 prompt tokens, for the mock and for the filter's estimate


def variant(workdir: Path, example: str, name: str, edit) -> Path:
    """A copy of an example config with `edit(text)` applied (e.g. shorter windows)."""
    text = (ROOT / example).read_text()
    new = edit(text)
    assert new != text, "edit changed nothing"
    d = workdir / name
    d.mkdir(exist_ok=True)
    p = d / "envoy.yaml"
    p.write_text(new)
    return p


def ask(gw, user: str, max_tokens: int | None = 40, headers: dict | None = None, **extra) -> requests.Response:
    body = chat(PROMPT, model="gpt-4o", **extra)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return gw.post(json_body=body, headers={"x-user": user, **(headers or {})})


def align_to_window(seconds: int) -> None:
    """Sleep to just after the start of a fresh clock-aligned window of `seconds`."""
    into = time.time() % seconds
    if into > 0.3:
        time.sleep(seconds - into + 0.05)


def test_tiered_limits_alice_refused_bob_passes(gateway, workdir):
    # Same config as the example, with the minute window shortened to 3 s so the test
    # does not wait a minute; the hour (300) and the day (800) are unchanged.
    cfg = variant(workdir, TIERED, "tiered", lambda t: t.replace('"window": "minute"', '"window": "3s"'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}})
    align_to_window(3)

    # Each request: 10 prompt + 40 completion = 50 tokens, reserved exactly (max_tokens 40).
    seen = []
    for _ in range(3):
        r = ask(gw, "alice")
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 50
        seen.append((r.headers["x-ratelimit-limit-tokens"], r.headers["x-ratelimit-remaining-tokens"]))
        assert re.fullmatch(r"\d+s", r.headers["x-ratelimit-reset-tokens"]), r.headers
    # the tightest window is the 150-token one: 100, 50, 0 left after each reservation
    assert seen == [("150", "100"), ("150", "50"), ("150", "0")]

    r = ask(gw, "alice")
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "tokens"
    assert "per 3s window" in err["message"] and "per-user" in err["message"], err
    assert r.headers["x-envoy-ratelimited"] == "true"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 3
    assert r.headers["x-ratelimit-limit-tokens"] == "150"
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"

    # Bob has his own budget.
    r = ask(gw, "bob")
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining-tokens"] == "100"

    # After the short window: 150 more fit, then the hour's 300 refuses her.
    time.sleep(retry + 0.1)
    for _ in range(3):
        r = ask(gw, "alice")
        assert r.status_code == 200, r.text
    r = ask(gw, "alice")
    assert r.status_code == 429, r.text
    assert "per hour window" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-limit-tokens"] == "300"
    assert int(r.headers["retry-after"]) > 3
    # Refused requests never reached the provider: 6 of alice + 1 of bob.
    assert len(gw.mocks[18001].log()) == 7

    # The verdict is in filter state, printed by the access log.
    log = wait_for(lambda: (lambda l: l if len(l) >= 9 else None)(gw.envoy.access_log()), 10, "access log")
    verdicts = [e["ratelimit"] for e in log]
    assert verdicts.count("refused:per-user/3s") == 1
    assert verdicts.count("refused:per-user/hour") == 1
    assert verdicts.count("ok") == 7


def test_input_token_limit(gateway):
    gw = gateway(INPUT, mocks={18001: {"name": "openai", "model": "gpt-4o"}})
    prompt = "y" * 100  # 25 input tokens
    codes = []
    for _ in range(4):
        body = chat(prompt, model="gpt-4o", max_tokens=4000)  # output is not counted by this rule
        r = gw.post(json_body=body, headers={"x-user": "alice"})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert "70 input_tokens per hour window" in r.json()["error"]["message"]
            assert r.headers["x-envoy-ratelimited"] == "true"
    assert codes == [200, 200, 429, 429]  # 25 + 25 = 50; a third would make 75 > 70
    # a short prompt still fits: 50 + 5 <= 70
    r = gw.post(json_body=chat("z" * 20, model="gpt-4o"), headers={"x-user": "alice"})
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-tokens"] == "15"
    assert gw.post(json_body=chat(prompt, model="gpt-4o"), headers={"x-user": "bob"}).status_code == 200


def _parallel(gw, user: str, n: int, max_tokens: int | None) -> list[requests.Response]:
    def one(_):
        return ask(gw, user, max_tokens=max_tokens)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrency_never_overspends(gateway, workdir):
    # Limit 500 total tokens an hour: fits exactly 10 requests of 50 tokens.
    cfg = variant(workdir, TIERED, "conc", lambda t: t.replace(
        '{"window": "minute", "limit": 150},\n                             {"window": "hour", "limit": 300},\n'
        '                             {"window": "day", "limit": 800}',
        '{"window": "hour", "limit": 500}').replace('"default_output_tokens": 256', '"default_output_tokens": 40'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}})

    # 1) Estimate exact (max_tokens 40 = real output): 50 parallel, exactly 10 admitted, 500 counted.
    rs = _parallel(gw, "alice", 50, 40)
    ok = [r for r in rs if r.status_code == 200]
    assert all(r.status_code in (200, 429) for r in rs), [r.status_code for r in rs]
    admitted_tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert admitted_tokens <= 500
    assert len(ok) == 10 and admitted_tokens == 500
    r = ask(gw, "alice")
    assert r.status_code == 429 and "500 used" in r.json()["error"]["message"], r.text

    # 2) Estimate low (no max_tokens: 40 reserved, 60 produced: 20 over per request).
    #    Documented bound: counted <= limit + admitted * (real - reserved).
    gw.mocks[18001].configure(completion_tokens=60)
    rs = _parallel(gw, "carol", 50, None)
    ok = [r for r in rs if r.status_code == 200]
    admitted_tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert 1 <= len(ok) <= 10
    assert admitted_tokens <= 500 + len(ok) * 20, (len(ok), admitted_tokens)
    # refused requests never reached the provider
    assert len(gw.mocks[18001].log()) == 10 + len(ok)


def _metric(gw, name: str, action: str) -> int:
    m = re.search(rf'^{name}{{sluice_action="{action}"}} (\d+)', gw.envoy.prometheus(), re.M)
    return int(m.group(1)) if m else 0


def _remaining(gw, user: str) -> int:
    r = ask(gw, user)  # reserves 50 (and uses 50)
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"]) + 50  # before this probe's reservation


def test_streaming_reconciliation_and_releases(gateway, workdir):
    cfg = variant(workdir, TIERED, "stream", lambda t: t.replace(
        '{"window": "minute", "limit": 150},\n                             {"window": "hour", "limit": 300},\n'
        '                             {"window": "day", "limit": 800}',
        '{"window": "hour", "limit": 1000}'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}})

    # Stream with a usage chunk: reserved 10 + 100, real 10 + 40: exactly 50 counted.
    r = ask(gw, "dave", max_tokens=100, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    events = sse_events(r)
    usage = [json.loads(e)["usage"] for e in events if e != "[DONE]" and json.loads(e).get("usage")]
    assert usage[-1]["total_tokens"] == 50
    assert r.headers["x-ratelimit-remaining-tokens"] == str(1000 - 110)  # reservation at admission
    assert _remaining(gw, "dave") == 1000 - 50
    # (probe used 50) -> 900 left

    # Stream without usage: the estimate (110) stands.
    r = ask(gw, "dave", max_tokens=100, stream=True)
    assert r.status_code == 200 and "[DONE]" in sse_events(r)
    assert _remaining(gw, "dave") == 900 - 110

    # 5xx from the provider: released.
    before = 900 - 110 - 50
    r = ask(gw, "dave", max_tokens=100, headers={"x-mock-fail": "503"})
    assert r.status_code == 503
    assert _remaining(gw, "dave") == before
    before -= 50

    # Upstream reset mid-stream: released when the stream ends (on_log).
    released = _metric(gw, "sluice_ratelimit_settled", "released")
    assert released == 1  # the 503 above
    try:
        r = ask(gw, "dave", max_tokens=100, headers={"x-mock-fail": "truncate"}, stream=True,
                stream_options={"include_usage": True})
        cut = "[DONE]" not in r.text
    except requests.exceptions.RequestException:
        cut = True  # the reset reached the client as a broken chunked body
    assert cut
    wait_for(lambda: _metric(gw, "sluice_ratelimit_settled", "released") == 2, 10, "release of the reset request")
    assert _remaining(gw, "dave") == before


def test_shadow_mode_reports_without_refusing(gateway, workdir):
    cfg = variant(workdir, TIERED, "shadow", lambda t: t.replace('"user_header": "x-user",', '"shadow": true, "user_header": "x-user",'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}})
    codes = [ask(gw, "alice").status_code for _ in range(5)]
    assert codes == [200] * 5  # 250 tokens > 150 a minute, but shadow mode never refuses
    assert _metric(gw, "sluice_ratelimit_requests", "shadow") == 2
    assert _metric(gw, "sluice_ratelimit_requests", "allow") == 3


def test_counter_cap_follows_failure_mode(gateway, workdir):
    # max_counters 1: a second user's counter cannot be created -> failure mode deny (503).
    cfg = variant(workdir, TIERED, "cap", lambda t: t.replace('"user_header": "x-user",', '"max_counters": 1, "user_header": "x-user",'))
    gw = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o", "completion_tokens": 40}})
    assert ask(gw, "alice").status_code == 200
    r = ask(gw, "bob")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "ratelimit_unavailable"
    assert "too_many_counters" in r.json()["error"]["message"]
    assert _metric(gw, "sluice_ratelimit_requests", "error") == 1


def test_bad_config_refuses_to_start(workdir):
    # Run Envoy directly: it must exit (fail-closed plugin) naming the field.
    cfg = variant(workdir, TIERED, "bad", lambda t: t.replace('"limit": 150', '"limit": 0'))
    ports = {p: free_port() for p in (10000, 9901, 18001)}
    rendered = workdir / "bad-rendered.yaml"
    rendered.write_text(render_config(cfg.read_text(), ports))
    proc = subprocess.run([str(ENVOY), "-c", str(rendered), "--disable-hot-restart", "--log-level", "warn"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "token-ratelimit: invalid config: rule_sets.tiered[0].windows[0].limit: must be at least 1" in out, out
