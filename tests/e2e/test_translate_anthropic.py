"""Cross-API failover, OpenAI → Anthropic (issue 19 §2): examples/failover-openai-to-anthropic.
Attempt 1 goes to an OpenAI-compatible mock that answers 429; the retry lands on an Anthropic
Messages mock (`--require-api-key`: it validates the request shape and headers as the real API
does). model-failover's upstream role translates that attempt and its answer, so the official
`openai` SDK sees OpenAI format throughout: JSON, streams, tool calls, usage and errors, over
HTTP/1.1 and HTTP/2."""
from __future__ import annotations

import json

import openai
import pytest

from h2client import h2_request
from harness import sse_events
from test_routing_helpers import access_log_entries, served_by

EXAMPLE = "examples/failover-openai-to-anthropic/envoy.yaml"
ENV = {"OPENAI_API_KEY": "sk-openai-test", "ANTHROPIC_API_KEY": "sk-ant-test"}
MOCKS = {18001: {"name": "openai"}, 18002: {"name": "anthropic", "require_api_key": True}}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                          "required": ["q"]}}}]


@pytest.fixture
def gw(gateway):
    g = gateway(EXAMPLE, mocks=MOCKS, env=ENV)
    g.mocks[18001].configure(rate_429=100, retry_after="0")
    return g


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + "/v1", api_key="client-key", max_retries=0)


def anthropic_attempts(gw) -> list[dict]:
    return [e for e in gw.mocks[18002].log() if e["path"].endswith("/messages")]


def test_json_failover_to_anthropic_is_openai_format(gw):
    r = sdk(gw).chat.completions.with_raw_response.create(
        model="client-model", max_tokens=64, temperature=1.5, stop="END",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}])
    assert served_by(r) == "anthropic"
    c = r.parse()
    assert c.object == "chat.completion" and c.model == "claude-sonnet-4-5"
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == "Hello from anthropic."
    assert c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens == 3
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    (o,) = gw.mocks[18001].log()
    assert (o["attempt"], o["status"], o["path"]) == (1, 429, "/v1/chat/completions")
    (a,) = anthropic_attempts(gw)
    assert (a["attempt"], a["status"], a["path"]) == (2, 200, "/v1/messages")
    assert a["headers"]["x-api-key"] == "sk-ant-test" and a["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in a["headers"], a["headers"]
    body = a["body"]
    assert body["model"] == "claude-sonnet-4-5" and body["max_tokens"] == 64
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
    assert body["temperature"] == 1.0 and body["stop_sequences"] == ["END"]

    # Usage is counted from the translated answer (usage-metrics reads OpenAI format).
    (e,) = access_log_entries(gw.envoy, 1)
    assert e["gen_ai.provider.name"] == "anthropic" and e["upstream_model"] == "claude-sonnet-4-5"
    assert int(e["gen_ai.usage.input_tokens"]) == c.usage.prompt_tokens
    assert int(e["gen_ai.usage.output_tokens"]) == c.usage.completion_tokens
    assert e["gen_ai.usage.estimated"] in ("false", "0"), e


def test_stream_failover_to_anthropic_is_openai_chunks(gw):
    stream = sdk(gw).chat.completions.create(
        model="client-model", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello"}])
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" and ch.model == "claude-sonnet-4-5" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello from anthropic."
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["stop"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 3 and usage.usage.prompt_tokens > 0
    (a,) = anthropic_attempts(gw)
    assert a["body"]["stream"] is True and a["body"]["max_tokens"] == 1024, "the profile's max_tokens"
    assert "stream_options" not in a["body"]
    (e,) = access_log_entries(gw.envoy, 1)
    assert int(e["gen_ai.usage.input_tokens"]) == usage.usage.prompt_tokens
    assert int(e["gen_ai.usage.output_tokens"]) == 3


def test_stream_without_include_usage_ends_with_done_and_no_usage_chunk(gw):
    r = gw.post(json_body={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks), chunks
    assert "event:" not in r.text


def test_tool_calls_round_trip(gw):
    client = sdk(gw)
    c = client.chat.completions.create(
        model="m", tools=TOOLS, tool_choice="auto", messages=[{"role": "user", "content": "Look up x"}],
        extra_headers={"x-mock-tool-args": '{"q":"x"}'})
    msg = c.choices[0].message
    assert c.choices[0].finish_reason == "tool_calls"
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"q": "x"}
    (a,) = anthropic_attempts(gw)
    assert a["body"]["tools"] == [{"name": "lookup", "description": "Look a word up",
                                   "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert a["body"]["tool_choice"] == {"type": "auto"}

    # The result goes back: assistant tool_calls → tool_use, tool message → tool_result.
    gw.mocks[18002].clear_log()
    c2 = client.chat.completions.create(model="m", tools=TOOLS, messages=[
        {"role": "user", "content": "Look up x"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "x is a letter"}])
    assert c2.choices[0].message.content == "Hello from anthropic."
    (a,) = anthropic_attempts(gw)
    assert a["status"] == 200
    msgs = a["body"]["messages"]
    assert msgs[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.id, "name": "lookup", "input": {"q": "x"}}]}
    assert msgs[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "x is a letter"}]}

    # Streamed tool calls: id and name first, then the arguments in pieces.
    stream = client.chat.completions.create(
        model="m", tools=TOOLS, stream=True, messages=[{"role": "user", "content": "Look up x"}],
        extra_headers={"x-mock-tool-args": '{"q":"x"}', "x-mock-stream-chunks": "3"})
    deltas = [ch.choices[0].delta for ch in stream if ch.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id == "toolu_mock_1" and calls[0].function.name == "lookup"
    assert all(tc.index == 0 for tc in calls)
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"q": "x"}


def test_anthropic_errors_become_openai_errors_with_the_same_status(gw):
    gw.mocks[18002].configure(context_window=1)
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "a long enough prompt"}])
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "invalid_request_error" and "prompt is too long" in body["message"], body
    (a,) = anthropic_attempts(gw)
    assert a["status"] == 400

    # A request Anthropic cannot express is refused before it is sent.
    gw.mocks[18002].clear_log()
    r = gw.post(json_body={"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "untranslatable_request", r.text
    assert anthropic_attempts(gw) == []


def test_without_the_provider_key_the_mock_answers_401_like_anthropic(gateway):
    g = gateway(EXAMPLE, mocks=MOCKS, env={"OPENAI_API_KEY": "sk-openai-test"})
    g.mocks[18001].configure(rate_429=100, retry_after="0")
    r = g.post(json_body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


def test_http2_json_and_stream(gw):
    port = gw.envoy.listener_port
    h = {"content-type": "application/json"}
    r = h2_request(port, "POST", "/v1/chat/completions", h,
                   json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert r.status == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from anthropic."
    r = h2_request(port, "POST", "/v1/chat/completions", h, json.dumps(
        {"model": "m", "stream": True, "stream_options": {"include_usage": True},
         "messages": [{"role": "user", "content": "hi"}]}))
    assert r.status == 200
    events = [b.removeprefix("data: ") for b in r.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
        "Hello from anthropic."
    assert chunks[-1]["usage"]["completion_tokens"] == 3
