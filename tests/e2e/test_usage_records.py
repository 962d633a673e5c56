"""Usage records complete enough to bill from (issues 14 and 18), examples/usage-metrics:
cached and reasoning tokens and time per output token in JSON and streams; an aborted stream
is still usage; client-chosen model names cannot create Prometheus series; endpoints that
reject `include_usage` pass unchanged and their own usage is counted."""
from __future__ import annotations

import json
import re
import socket
import time
import uuid

import pytest

from harness import chat, sse_events, wait_for
from test_usage_metrics import CONFIG, MOCKS, samples


def tokens_by_type(gw, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in samples(gw.envoy.prometheus(), "gen_ai_client_token_usage"):
        if lab.get("gen_ai_request_model") == model:
            out[lab["gen_ai_token_type"]] = out.get(lab["gen_ai_token_type"], 0) + v
    return out


@pytest.mark.composable
@pytest.mark.parametrize("mode", ["json", "stream", "stream-injected"])
def test_cached_and_reasoning_tokens_are_recorded(gateway, mode):
    gw = gateway(CONFIG, mocks=MOCKS)
    headers = {"x-mock-cached-tokens": "7", "x-mock-reasoning-tokens": "3"}
    extra = {"stream": True} if mode != "json" else {}
    if mode == "stream":
        extra["stream_options"] = {"include_usage": True}
    r = gw.post(json_body=chat("Tell me about prompt caching, please", model="gpt-4o", **extra), headers=headers)
    assert r.status_code == 200, r.text
    if mode == "stream-injected":
        assert not any('"usage":{' in e for e in sse_events(r)), "the usage chunk the gateway asked for stays hidden"
    got = wait_for(lambda: (lambda t: t if t.get("cached_input") else None)(tokens_by_type(gw, "gpt-4o")), 10,
                   "cached token metric")
    assert got["cached_input"] == 7 and got["reasoning"] == 3, got
    assert got["input"] >= 7 and got["output"] >= 3, "cached and reasoning are parts of input and output"
    line = gw.envoy.wait_access_log(lambda e: any(x.get("gen_ai.usage.cached_input_tokens") for x in e))[-1]
    assert line["gen_ai.usage.cached_input_tokens"] == "7" and line["gen_ai.usage.reasoning_tokens"] == "3", line
    assert line["gen_ai.operation.name"] == "chat"


def test_time_per_output_token_for_streams(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    gw.mocks[18001].configure(chunk_delay_ms=15)
    r = gw.post(json_body=chat("stream slowly", model="gpt-4o", stream=True),
                headers={"x-mock-words": "20", "x-mock-stream-chunks": "10"})
    assert r.status_code == 200
    line = gw.envoy.wait_access_log(lambda e: any(x.get("time_per_output_token_ms") for x in e))[-1]
    # 10 chunks 15 ms apart spread over 20 tokens: several ms per token after the first.
    assert int(line["time_per_output_token_ms"]) >= 3, line
    assert int(line["time_to_first_token_ms"]) >= 0
    hist = [lab for lab, _ in samples(gw.envoy.prometheus(), "gen_ai_server_time_per_output_token_count")]
    assert hist, "the time-per-output-token histogram is exported"


def raw_stream_then_abort(port: int, body: dict, read_events: int) -> bytes:
    """Send a streaming request over a raw socket, read a few events, then reset."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"x-mock-words: 400\r\nx-mock-stream-chunks: 40\r\n"
              b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    got = b""
    while got.count(b"data: ") < read_events:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    return got


def test_an_aborted_stream_is_still_usage(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    gw.mocks[18001].configure(chunk_delay_ms=30)
    got = raw_stream_then_abort(gw.envoy.listener_port, chat("write a lot", model="gpt-4o", stream=True), 5)
    assert b"data: " in got
    line = gw.envoy.wait_access_log(lambda e: any(x.get("gen_ai.usage.output_tokens") for x in e), timeout=20)[-1]
    assert int(line["gen_ai.usage.output_tokens"]) > 0, line
    assert line["gen_ai.usage.estimated"] == "true", "counted from the text the client read"
    est = {lab["sluice_reason"]: v for lab, v in samples(gw.envoy.prometheus(), "sluice_usage_estimated")}
    assert est.get("incomplete", 0) >= 1, est


def test_client_model_names_cannot_create_series(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    for i in range(1000):
        r = gw.post(json_body=chat("hi", model=f"random-{uuid.uuid4().hex[:8]}-{i}"))
        assert r.status_code == 200
    for _ in range(3):
        assert gw.post(json_body=chat("hi", model="gpt-4o")).status_code == 200
    time.sleep(1.2)
    prom = gw.envoy.prometheus()
    series = samples(prom, "gen_ai_client_token_usage")
    models = {lab["gen_ai_request_model"] for lab, _ in series}
    assert models <= {"gpt-4o", "other", "gpt-4o-mini", "mistral-small", "mistral-large", "m1", "m2", "m3", "ok"}, models
    assert len(series) <= 12, f"{len(series)} series from 1000 random names"
    assert sum(v for lab, v in series if lab["gen_ai_request_model"] == "other" and lab["gen_ai_token_type"] == "input") > 0
    known = [v for lab, v in series if lab["gen_ai_request_model"] == "gpt-4o" and lab["gen_ai_token_type"] == "output"]
    assert known and known[0] == 15, "the known model is still counted exactly (3 × 5 words)"
    assert not [ln for ln in prom.splitlines() if re.search(r"random-", ln)], "no series names a random model"


@pytest.mark.composable
def test_endpoints_that_reject_include_usage_pass_unchanged_and_are_counted(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    openai = gw.mocks[18001]
    # Responses API stream: no stream_options may be added (the API rejects it).
    r = gw.post("/v1/responses", json_body={"model": "gpt-4o", "input": "Say hi", "stream": True})
    assert r.status_code == 200, r.text
    sent = openai.log()[-1]["body"]
    assert "stream_options" not in sent, sent
    # Anthropic Messages stream: usage split across message_start and message_delta.
    r = gw.post("/v1/messages", json_body={"model": "claude-sonnet", "max_tokens": 50, "stream": True,
                                           "messages": [{"role": "user", "content": "Say hi"}]},
                headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    sent = openai.log()[-1]["body"]
    assert "stream_options" not in sent, sent
    # Embeddings: input tokens only.
    r = gw.post("/v1/embeddings", json_body={"model": "gpt-4o", "input": "embed this text"})
    assert r.status_code == 200, r.text
    lines = gw.envoy.wait_access_log(lambda e: len([x for x in e if x.get("gen_ai.usage.input_tokens")]) >= 3)
    counted = [x for x in lines if x.get("gen_ai.usage.input_tokens")]
    assert all(x["gen_ai.usage.estimated"] == "false" for x in counted), counted
    ops = [x["gen_ai.operation.name"] for x in counted]
    assert ops == ["chat", "chat", "embeddings"], ops
    messages = counted[1]
    assert int(messages["gen_ai.usage.output_tokens"]) > 0 and int(messages["gen_ai.usage.input_tokens"]) > 0
