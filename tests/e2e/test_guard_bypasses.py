"""prompt-guard: the bypasses of issue 13 (§1-§4) and the answer formats of issue 19 §1,
against real Envoy (examples/prompt-guard/envoy.yaml) and the mock provider.

Each test failed on the build before the stage port (see the report of that change):
- §1 a body that ends with an HTTP/2 trailers frame skipped every check;
- §2 reasoning, refusals, audio transcripts, streamed tool-call arguments, log-probabilities
  and answers that are not JSON/SSE came back unmasked;
- §3 a valid card or IBAN inside a longer run of digits or capitals was not found;
- §4 Responses `input`, embeddings `input`, tool descriptions (...) were never scanned;
- issue 19 §1: Messages and Responses streams were not masked.

The mock provider must have the answer-format headers (x-mock-reasoning, x-mock-body, ...):
build it and point SLUICE_MOCK_BIN at it when the checked-in binary is older.
"""
from __future__ import annotations

import json

import pytest

from h2client import h2_request
from harness import chat, sse_events

CONFIG = "examples/prompt-guard/envoy.yaml"
CARD = "4111 1111 1111 1111"
MASKED_CARD = "X" * len(CARD)
REJECT_MESSAGE = "Rejected due to inappropriate content"
MOCKS = {18001: {"name": "openai", "model": "gpt-4o", "response_text": "Hello there."}}
ANTHROPIC = {"anthropic-version": "2023-06-01"}


def no_card(text: str) -> None:
    for digits in ("4111", "1111"):
        assert digits not in text, f"{digits!r} leaked: {text[:2000]!r}"


def events(resp) -> list[dict]:
    return [json.loads(e) for e in sse_events(resp) if e != "[DONE]"]


def h2(gw, path: str, body: dict, headers: dict | None = None, trailers: bool = False):
    data = json.dumps(body).encode()
    half = len(data) // 2
    return h2_request(gw.envoy.listener_port, "POST", path, {"content-type": "application/json", **(headers or {})},
                      [data[:half], data[half:]], trailers={"x-client-trailer": "done"} if trailers else None)


def test_request_trailers_do_not_skip_the_guard(gateway):
    """§1: a body ending with a trailers frame is checked exactly like one ending with END_STREAM."""
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]
    guarded = chat("Can you give me some examples of Master Card credit card numbers?", model="gpt-4o")
    for trailers in (False, True):
        r = h2(gw, "/v1/chat/completions", guarded, trailers=trailers)
        assert r.status == 403, f"trailers={trailers}: {r.status} {r.text}"
        assert r.json()["error"]["code"] == "prompt_guard_rejected"
        assert r.json()["error"]["message"] == REJECT_MESSAGE
    assert mock.log() == [], "a refused request reached the provider"

    # Allowed with trailers: served with every check applied (request masked, answer masked).
    body = chat(f"card {CARD.replace(' ', '-')}, mail jane.doe@example.org", model="gpt-4o")
    r = h2(gw, "/pii/v1/chat/completions", body, headers={"x-mock-text": f"Your card {CARD} is on file."}, trailers=True)
    assert r.status == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == f"Your card {MASKED_CARD} is on file."
    sent = mock.log()[-1]["body"]["messages"][0]["content"]
    assert sent == f"card {MASKED_CARD}, mail [EMAIL]", sent


def test_response_trailers_end_the_answer(gateway):
    """§1, response side: an answer that ends with trailers is masked like one that ends the
    stream (the example's cluster passes the provider's HTTP/1.1 trailers on)."""
    gw = gateway(CONFIG, mocks=MOCKS)
    text = f"Your card {CARD} is on file."
    masked = f"Your card {MASKED_CARD} is on file."
    hdr = {"x-mock-text": text, "x-mock-trailers": "1"}
    for transport in ("h1", "h2"):
        if transport == "h1":
            r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers=hdr)
            status, body = r.status_code, r.text
        else:
            resp = h2(gw, "/pii/v1/chat/completions", chat("hi", model="gpt-4o"), headers=hdr)
            status, body = resp.status, resp.text
            assert resp.trailers.get("x-mock-trailer") == "done", resp.trailers
        assert status == 200, body
        no_card(body)
        assert json.loads(body)["choices"][0]["message"]["content"] == masked
    r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", stream=True), headers=hdr)
    no_card(r.text)
    assert "".join(c["delta"].get("content") or "" for e in events(r) for c in e.get("choices", [])) == masked
    assert sse_events(r)[-1] == "[DONE]"


def test_every_answer_channel_is_masked(gateway):
    """§2: reasoning, refusal, audio transcript and tool-call arguments, in JSON and streams."""
    gw = gateway(CONFIG, mocks=MOCKS)
    text = f"card {CARD} ok"
    masked = f"card {MASKED_CARD} ok"
    channels = {
        "x-mock-reasoning": (["message", "reasoning_content"], ["delta", "reasoning_content"]),
        "x-mock-refusal": (["message", "refusal"], ["delta", "refusal"]),
        "x-mock-audio-transcript": (["message", "audio", "transcript"], ["delta", "audio", "transcript"]),
        "x-mock-tool-args": (["message", "tool_calls", 0, "function", "arguments"],
                             ["delta", "tool_calls", 0, "function", "arguments"]),
    }

    def dig(v, path):
        for p in path:
            if v is None:
                return None
            v = v[p] if isinstance(p, int) else v.get(p)
            if isinstance(p, int) and v is None:
                return None
        return v

    for header, (json_path, delta_path) in channels.items():
        value = json.dumps({"card": CARD}) if header == "x-mock-tool-args" else text
        want = json.dumps({"card": MASKED_CARD}) if header == "x-mock-tool-args" else masked
        r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers={header: value})
        assert r.status_code == 200, r.text
        no_card(r.text)
        assert dig(r.json()["choices"][0], json_path) == want, (header, r.text)

        r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", stream=True),
                    headers={header: value, "x-mock-stream-chunks": "5"})
        assert r.status_code == 200
        no_card(r.text)
        pieces = []
        for e in events(r):
            for c in e.get("choices", []):
                if c.get("delta", {}).get("tool_calls") and not c["delta"]["tool_calls"][0].get("function"):
                    continue
                piece = dig(c, delta_path)
                if isinstance(piece, str):
                    pieces.append(piece)
        assert "".join(pieces) == want, (header, pieces)


def test_logprobs_are_masked_or_refused(gateway):
    """§2: `logprobs: true` must not read a masked answer back token by token."""
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]
    headers = {"x-mock-text": f"Your card {CARD} is on file."}
    r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", logprobs=True, top_logprobs=2),
                headers=headers)
    assert r.status_code == 200, r.text
    no_card(r.text)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == f"Your card {MASKED_CARD} is on file."
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    for t in tokens:
        assert t["bytes"] == list(t["token"].encode())
        for alt in t["top_logprobs"]:
            assert alt["bytes"] == list(alt["token"].encode())

    # A stream cannot be masked exactly token by token: refused before it reaches the provider.
    n = len(mock.log())
    r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", stream=True, logprobs=True),
                headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "logprobs_unavailable"
    assert len(mock.log()) == n


def test_answers_that_are_not_json_or_sse(gateway):
    """§2: missing or other content types are masked as text; binary or compressed is refused."""
    gw = gateway(CONFIG, mocks=MOCKS)
    text = f"Your card {CARD} is on file."
    masked = f"Your card {MASKED_CARD} is on file."
    post = lambda extra, stream=False: gw.post(  # noqa: E731
        "/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", stream=stream),
        headers={"x-mock-text": text, **extra})

    r = post({"x-mock-body": "text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.headers
    assert r.text == masked
    r = post({"x-mock-body": "text"}, stream=True)
    assert r.text == masked
    r = post({"x-mock-content-type": "none"})
    assert r.status_code == 200
    no_card(r.text)
    assert r.json()["choices"][0]["message"]["content"] == masked
    r = post({"x-mock-content-type": "text/html"})
    no_card(r.text)
    assert json.loads(r.text)["choices"][0]["message"]["content"] == masked
    r = post({"x-mock-content-type": "text/plain"}, stream=True)  # SSE bytes, labelled text
    no_card(r.text)

    for extra in ({"x-mock-content-type": "application/octet-stream"}, {"x-mock-content-encoding": "gzip"}):
        r = post(extra)
        assert r.status_code == 502, (extra, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "response_unmaskable", (extra, r.text)
        assert "content-encoding" not in r.headers
        no_card(r.text)


def test_valid_numbers_inside_longer_runs(gateway):
    """§3: the valid card or IBAN inside a longer run is found (JSON request and answer)."""
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]
    cases = {
        f"pay {CARD} 12/26 thanks": f"pay {MASKED_CARD} 12/26 thanks",
        "card 4111111111111111 123": "card XXXXXXXXXXXXXXXX 123",
        "iban BE68 5390 0754 7034 SWIFT GEBABEBB": "iban [IBAN] SWIFT GEBABEBB",
    }
    for prompt, want in cases.items():
        r = gw.post("/pii/v1/chat/completions", json_body=chat(prompt, model="gpt-4o"))
        assert r.status_code == 200, r.text
        assert mock.log()[-1]["body"]["messages"][0]["content"] == want, prompt

    answer = f"Card {CARD} 12/26, CVV 123."
    masked = f"Card {MASKED_CARD} 12/26, CVV 123."
    r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers={"x-mock-text": answer})
    assert r.json()["choices"][0]["message"]["content"] == masked


def test_valid_numbers_inside_longer_runs_in_streams(gateway):
    """§3: the same in a streamed answer, wherever the events cut the number."""
    gw = gateway(CONFIG, mocks=MOCKS)
    answer = f"Card {CARD} 12/26, CVV 123."
    masked = f"Card {MASKED_CARD} 12/26, CVV 123."
    for chunks in ("3", "7", "11"):
        r = gw.post("/pii/v1/chat/completions", json_body=chat("hi", model="gpt-4o", stream=True),
                    headers={"x-mock-text": answer, "x-mock-stream-chunks": chunks})
        no_card(r.text)
        text = "".join(c["delta"].get("content") or "" for e in events(r) for c in e.get("choices", []))
        assert text == masked, (chunks, text)


SCANNED = {
    "responses input item": ("/v1/responses", {"model": "gpt-4o", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "list some credit card numbers"}]}]}, {}),
    "responses instructions": ("/v1/responses", {"model": "gpt-4o", "instructions": "Talk about credit card data.",
                                                 "input": "hi"}, {}),
    "embeddings input": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["fine", "credit card numbers"]}, {}),
    "tool description": ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                                  "tools": [{"type": "function", "function": {
                                                      "name": "lookup", "description": "Looks up a credit card by owner",
                                                      "parameters": {"type": "object", "properties": {}}}}]}, {}),
    "response_format schema": ("/v1/chat/completions", {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"credit card": {"type": "string"}}}}}}, {}),
    "message name": ("/v1/chat/completions", {"model": "gpt-4o",
                                              "messages": [{"role": "user", "name": "credit card", "content": "hi"}]}, {}),
    "messages system": ("/v1/messages", {"model": "claude", "max_tokens": 16, "system": "You discuss credit card numbers.",
                                         "messages": [{"role": "user", "content": "hi"}]}, ANTHROPIC),
}


@pytest.mark.parametrize("case", list(SCANNED))
def test_every_endpoint_is_scanned(gateway, case):
    """§4 / issue 19 §1: text the model reads outside chat message contents is guarded."""
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]
    path, body, headers = SCANNED[case]
    r = gw.post(path, json_body=body, headers=headers)
    assert r.status_code == 403, f"{case}: {r.status_code} {r.text[:300]}"
    assert r.json()["error"]["message"] == REJECT_MESSAGE
    assert mock.log() == [], "a guarded text reached the provider"
    # ...while the same endpoint without the phrase is served.
    clean = json.loads(json.dumps(body).replace("credit card", "weather"))
    assert gw.post(path, json_body=clean, headers=headers).status_code == 200


def test_responses_and_messages_answers_are_masked(gateway):
    """Issue 19 §1: Responses output items / `response.output_text.delta`, Messages blocks /
    `content_block_delta`, JSON and streams."""
    gw = gateway(CONFIG, mocks=MOCKS)
    text = f"Your card {CARD} is on file."
    masked = f"Your card {MASKED_CARD} is on file."
    hdr = {"x-mock-text": text, "x-mock-stream-chunks": "6"}

    r = gw.post("/pii/v1/messages", json_body={"model": "claude", "max_tokens": 64, "stream": True,
                                                "messages": [{"role": "user", "content": "hi"}]},
                headers={**ANTHROPIC, **hdr})
    assert r.status_code == 200, r.text
    no_card(r.text)
    evs = events(r)
    deltas = "".join(e["delta"]["text"] for e in evs if e["type"] == "content_block_delta")
    assert deltas == masked, deltas
    assert [e["type"] for e in evs][-1] == "message_stop"

    r = gw.post("/pii/v1/messages", json_body={"model": "claude", "max_tokens": 64,
                                                "messages": [{"role": "user", "content": "hi"}]},
                headers={**ANTHROPIC, **hdr})
    assert r.json()["content"][0]["text"] == masked, r.text

    r = gw.post("/pii/v1/responses", json_body={"model": "gpt-4o", "input": "hi", "stream": True}, headers=hdr)
    assert r.status_code == 200, r.text
    no_card(r.text)
    evs = events(r)
    deltas = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert deltas == masked, deltas
    done = [e for e in evs if e["type"] == "response.output_text.done"]
    assert done and done[0]["text"] == masked
    completed = [e for e in evs if e["type"] == "response.completed"]
    assert completed[0]["response"]["output"][0]["content"][0]["text"] == masked

    r = gw.post("/pii/v1/responses", json_body={"model": "gpt-4o", "input": "hi"}, headers=hdr)
    assert r.json()["output"][0]["content"][0]["text"] == masked, r.text
