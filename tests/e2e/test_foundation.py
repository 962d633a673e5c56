"""Foundation: real Envoy (envoy/bare.yaml, no filters) in front of the mock provider.
Proves the harness, the mock's OpenAI surface and every mock failure mode through Envoy."""
from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from harness import chat, sse_events

BARE = "envoy/bare.yaml"


@pytest.fixture
def bare(gateway):
    return gateway(BARE, mocks={18001: {"name": "local", "model": "qwen-0.5b"}})


def test_json_completion_names_the_model_and_usage(bare):
    r = bare.post(json_body=chat("Write me a 20 word pitch", model="gpt-4o-mini"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert r.headers["x-mock-provider"] == "local"
    usage = body["usage"]
    # Deterministic usage: ceil(24 bytes / 4) = 6 input tokens; output = words of the answer.
    assert usage["prompt_tokens"] == 6
    assert usage["completion_tokens"] == len(body["choices"][0]["message"]["content"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    seen = bare.mocks[18001].log()
    assert len(seen) == 1 and seen[0]["model"] == "gpt-4o-mini" and seen[0]["path"] == "/v1/chat/completions"


def test_no_model_uses_the_providers_own(bare):
    r = bare.post(json_body=chat("hi"))
    assert r.json()["model"] == "qwen-0.5b"


def test_stream_with_and_without_usage(bare):
    r = bare.post(json_body=chat("hi", stream=True, stream_options={"include_usage": True}), stream=False)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from local."

    r = bare.post(json_body=chat("hi", stream=True))
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    assert not any(c.get("usage") for c in chunks)


def test_models_and_health(bare):
    assert bare.get("/v1/models").json()["data"][0]["id"] == "qwen-0.5b"
    assert bare.get("/health").json()["status"] == "ok"


def test_openai_sdk_parses_json_and_stream(bare):
    from openai import OpenAI

    client = OpenAI(base_url=bare.url("/v1"), api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert out.model == "m1" and out.choices[0].message.content == "Hello from local."
    stream = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "Hello from local." and usage.total_tokens > 0


def test_429_with_retry_after_passes_through(bare):
    bare.mocks[18001].configure(rate_429=100, retry_after="7")
    r = bare.post(json_body=chat("hi"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    bare.mocks[18001].configure(rate_429=0)
    assert bare.post(json_body=chat("hi")).status_code == 200


def test_429_rate_is_deterministic(bare):
    bare.mocks[18001].configure(rate_429=50)
    codes = [bare.post(json_body=chat("hi")).status_code for _ in range(4)]
    assert sorted(codes) == [200, 200, 429, 429]


def test_503_and_reset(bare):
    r = bare.post(json_body=chat("hi"), headers={"x-mock-fail": "503"})
    assert r.status_code == 503 and r.headers.get("x-mock-provider") == "local"
    r = bare.post(json_body=chat("hi"), headers={"x-mock-fail": "reset"})
    assert r.status_code == 503  # Envoy's own answer: upstream reset before headers
    assert "x-mock-provider" not in r.headers
    bare.mocks[18001].configure(rate_reset=100)
    assert bare.post(json_body=chat("hi")).status_code == 503
    bare.mocks[18001].configure(rate_reset=0)
    assert bare.post(json_body=chat("hi")).status_code == 200


def test_malformed_json_reaches_the_client(bare):
    r = bare.post(json_body=chat("hi"), headers={"x-mock-fail": "malformed"})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_truncated_stream(bare):
    r = requests.post(bare.url("/v1/chat/completions"), json=chat("hi", stream=True),
                      headers={"x-mock-fail": "truncate"}, stream=True, timeout=15)
    got = b""
    with pytest.raises(requests.exceptions.RequestException):
        for piece in r.iter_content(chunk_size=None):
            got += piece
    assert b"[DONE]" not in got and b"data:" in got


def test_slow_first_byte_and_slow_chunks(bare):
    bare.mocks[18001].configure(first_byte_delay_ms=300, chunk_delay_ms=100, stream_chunks=3)
    t0 = time.monotonic()
    r = requests.post(bare.url("/v1/chat/completions"), json=chat("hi", stream=True), stream=True, timeout=15)
    arrivals = []
    for line in r.iter_lines():
        if line.startswith(b"data:"):
            arrivals.append(round(time.monotonic() - t0, 3))
    # Timing is reported, not asserted (the benchmark script owns numbers); order and count are.
    print(f"SSE event arrival times (s): {arrivals}")
    assert len(arrivals) == 1 + 3 + 1 + 1  # role, 3 pieces, finish, [DONE]


def test_split_writes_keep_events_intact(bare):
    bare.mocks[18001].configure(split_writes=True, stream_chunks=3)
    events = sse_events(bare.post(json_body=chat("hi", stream=True)))
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_invalid_host_gives_503(gateway):
    # No mock on 18001: the port stays closed, as for an invalid host.
    gw = gateway(BARE)
    r = gw.post(json_body=chat("hi"))
    assert r.status_code == 503


def test_mock_logs_chunked_bodies_and_attempts(bare):
    # Envoy forwards a chunked body when the client sends one.
    body = json.dumps(chat("chunked body", model="m2")).encode()

    def gen():
        yield body[:10]
        yield body[10:]

    r = requests.post(bare.url("/v1/chat/completions"), data=gen(), headers={"content-type": "application/json"},
                      timeout=15)
    assert r.status_code == 200 and r.json()["model"] == "m2"
    entry = bare.mocks[18001].log()[-1]
    assert entry["body_size"] == len(body)
    assert entry["body"]["messages"][0]["content"] == "chunked body"


def test_servers_listen_on_loopback_only(bare):
    with pytest.raises(OSError):
        # The mock must not be reachable on another local address (it binds 127.0.0.1).
        host_ip = socket.gethostbyname(socket.gethostname())
        if host_ip.startswith("127."):
            raise OSError("no non-loopback address to check")
        socket.create_connection((host_ip, bare.mocks[18001].port), timeout=1)
