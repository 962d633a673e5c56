"""Fail over before the first token, never after (issue 16 §4): examples/first-token-failover
(per_try_idle_timeout, retry on reset and 5xx, route timeout 0s). Priority 0's mock holds
its first byte (`rate_stall`: the request is read, nothing is sent) or stalls after the first
content event (`x-mock-fail: stall_mid_stream`); the test's copy uses a 1 s idle timeout."""
from __future__ import annotations

import http.client
import json
import time

import pytest
import requests

from h2client import h2_request
from harness import chat, sse_events
from test_routing_helpers import access_log_entries, served_by, variant

EXAMPLE = "examples/first-token-failover/envoy.yaml"
IDLE_1S = [("per_try_idle_timeout: 15s", "per_try_idle_timeout: 1s")]


def stuck_first(gateway, workdir, replacements=IDLE_1S, **p1):
    cfg = variant(workdir, EXAMPLE, replacements)
    return gateway(cfg, mocks={18001: {"name": "stuck", "rate_stall": 100, "stall_timeout_ms": 20000},
                               18002: {"name": "healthy", **p1}})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_silent_provider_is_retried_on_the_next_after_the_idle_timeout(gateway, workdir, stream):
    gw = stuck_first(gateway, workdir, stream_chunks=6)
    stuck, healthy = gw.mocks[18001], gw.mocks[18002]
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", json_body=chat("hi", stream=stream))
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert served_by(r) == "healthy"
    assert 1.0 <= took < 3.0, took
    if stream:
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if json.loads(e).get("choices")) == "Hello from healthy."
        assert json.loads(events[0])["model"] == "qwen2.5-1.5b-instruct"
    else:
        assert r.json()["model"] == "qwen2.5-1.5b-instruct"
    assert len(stuck.log()) == 1 and len(healthy.log()) == 1
    entry = access_log_entries(gw.envoy, 1)[-1]
    assert entry["attempts"] == 2
    assert gw.envoy.stats().get("cluster.local-pool.upstream_rq_per_try_idle_timeout") == 1


def test_per_try_timeout_bounds_the_time_to_response_headers(gateway, workdir):
    """The other knob: per_try_timeout also fails a silent attempt over (it stops at the
    response headers, so it never caps a stream, and it does not catch a stall after them)."""
    gw = stuck_first(gateway, workdir, [("per_try_idle_timeout: 15s", "per_try_timeout: 1s")])
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", json_body=chat("hi"))
    assert r.status_code == 200 and served_by(r) == "healthy", r.text
    assert 1.0 <= time.monotonic() - t0 < 3.0
    assert gw.envoy.stats().get("cluster.local-pool.upstream_rq_per_try_timeout") == 1


def read_sse_until_error(base: str, body: dict, headers: dict) -> tuple[int, list[str], str | None]:
    """Stream a response over HTTP/1.1; returns status, the data payloads received, and the
    transport error that ended it (None for a clean end)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"content-type": "application/json", **headers})
    resp = conn.getresponse()
    buf, err = b"", None
    try:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
    except http.client.IncompleteRead as e:
        buf += e.partial
        err = "IncompleteRead"
    except (ConnectionError, http.client.HTTPException) as e:
        err = type(e).__name__
    conn.close()
    events = [line[6:] for line in buf.decode().split("\n") if line.startswith("data: ")]
    return resp.status, events, err


def test_a_stream_that_stalls_after_its_first_token_is_ended_never_retried(gateway, workdir):
    gw = gateway(variant(workdir, EXAMPLE, IDLE_1S),
                 mocks={18001: {"name": "stalls", "stall_timeout_ms": 20000}, 18002: {"name": "healthy"}})
    stalls, healthy = gw.mocks[18001], gw.mocks[18002]
    body = chat("hi", stream=True)
    t0 = time.monotonic()
    status, events, err = read_sse_until_error(gw.base, body, {"x-mock-fail": "stall_mid_stream"})
    took = time.monotonic() - t0
    assert status == 200
    assert err is not None, "the stream ended as if complete"
    assert "[DONE]" not in events
    contents = [json.loads(e)["choices"][0]["delta"] for e in events]
    assert contents[0].get("role") == "assistant" and len(contents) == 2, contents
    assert 1.0 <= took < 5.0, took
    assert healthy.log() == [], "a started stream was retried"
    assert len(stalls.log()) == 1
    entry = access_log_entries(gw.envoy, 1)[-1]
    assert entry["attempts"] == 1 and "UT" in entry["response_flags"], entry
    assert gw.envoy.stats().get("cluster.local-pool.upstream_rq_retry", 0) == 0

    # HTTP/2: the stream is reset (RST_STREAM), after the same two events.
    r = h2_request(gw.envoy.listener_port, "POST", "/v1/chat/completions",
                   {"content-type": "application/json", "x-mock-fail": "stall_mid_stream"}, json.dumps(body).encode())
    assert r.status == 200 and r.reset, (r.status, r.reset)
    assert b"[DONE]" not in r.body and r.body.count(b"data: ") == 2
    assert healthy.log() == []


def test_a_healthy_stream_longer_than_15_s_is_not_cut(gateway):
    """Envoy's default route timeout (15 s) would end this stream; the example sets 0s, and the
    events' 2 s spacing stays under the 15 s idle timeout."""
    gw = gateway(EXAMPLE, mocks={18001: {"name": "slow", "chunk_delay_ms": 2000, "stream_chunks": 8},
                                 18002: {"name": "healthy"}})
    t0 = time.monotonic()
    r = requests.post(gw.url("/v1/chat/completions"), json=chat("hi", stream=True), timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200 and served_by(r) == "slow"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert took > 16.0, took
    assert gw.mocks[18002].log() == []
