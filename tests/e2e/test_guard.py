"""prompt-guard filter end to end (examples/prompt-guard/envoy.yaml, seed 004).

Real Envoy, the built sluice_prompt_guard.wasm, the mock provider. Seed 004: a prompt with
"credit card" is refused with 403 and the custom message; a prompt asking for example numbers
passes and the Mastercard numbers in the answer come back as X's, as JSON and as SSE (also
through the official OpenAI SDK). Then: bypass attempts, a card split across SSE events and
network chunks, bad input, built-in detectors, shadow mode, metrics, the webhook check and a
bad config that keeps Envoy from starting.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from harness import ENVOY, ROOT, chat, free_port, render_config, sse_events, wait_for

CONFIG = "examples/prompt-guard/envoy.yaml"
REJECT_MESSAGE = "Rejected due to inappropriate content"
CARDS_TEXT = "Example Mastercard numbers: 5555 5555 5555 4444 and 5105-1051-0510-5100. Use them only for tests."
MASKED_TEXT = "Example Mastercard numbers: XXXXXXXXXXXXXXXXXXX and XXXXXXXXXXXXXXXXXXX. Use them only for tests."
MOCKS = {18001: {"name": "openai", "model": "gpt-4o", "response_text": CARDS_TEXT}}
CARD_DIGIT_GROUPS = ("5555", "4444", "5105", "1051", "0510", "5100")

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def checks(gw, phase: str, action: str, rule: str) -> float:
    """Value of sluice_guard_checks{phase, action, rule} (0 when absent)."""
    want = {"sluice_phase": phase, "sluice_action": action, "sluice_rule": rule}
    for line in gw.envoy.prometheus().splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == "sluice_guard_checks" and dict(LABEL.findall(m.group(2) or "")) == want:
            return float(m.group(3))
    return 0.0


def stream_contents(resp: requests.Response) -> list[str]:
    """delta.content of every chunk, in order; asserts the stream ends with [DONE]."""
    events = sse_events(resp)
    assert events and events[-1] == "[DONE]", events
    out = []
    for e in events[:-1]:
        chunk = json.loads(e)
        for c in chunk.get("choices", []):
            if isinstance(c.get("delta", {}).get("content"), str):
                out.append(c["delta"]["content"])
    return out


def no_card_digits(text: str) -> None:
    for g in CARD_DIGIT_GROUPS:
        assert g not in text, f"{g!r} leaked: {text!r}"


def sdk(gw, prefix: str = "") -> OpenAI:
    return OpenAI(base_url=gw.url(prefix + "/v1"), api_key="x", max_retries=0, timeout=30)


@pytest.mark.composable
def test_guard_seed004_reject_and_mask(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]

    # 1. "credit card" in the prompt: 403 with the custom message, nothing goes upstream.
    r = gw.post(json_body=chat("Can you give me some examples of Master Card credit card numbers?", model="gpt-4o"))
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["message"] == REJECT_MESSAGE
    assert err["code"] == "prompt_guard_rejected"
    assert mock.log() == []

    # 2. Without the phrase the request passes; the Mastercard numbers in the answer are masked.
    prompt = "Can you give me some example Master Card numbers?"
    r = gw.post(json_body=chat(prompt, model="gpt-4o"), headers={"accept-encoding": "gzip, br"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == MASKED_TEXT
    assert "content-length" not in r.headers or int(r.headers["content-length"]) == len(r.content)
    seen = mock.log()[-1]
    assert seen["body"]["messages"][0]["content"] == prompt
    # The guard asks for an uncompressed answer (a compressed one could not be masked).
    assert "accept-encoding" not in seen["headers"], seen["headers"]

    # 3. Same, streaming.
    r = gw.post(json_body=chat(prompt, model="gpt-4o", stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    parts = stream_contents(r)
    assert "".join(parts) == MASKED_TEXT
    no_card_digits(r.text)

    # 4. Through the official OpenAI SDK, non-streaming and streaming.
    client = sdk(gw)
    c = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}])
    assert c.choices[0].message.content == MASKED_TEXT
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": prompt}], stream=True) if ch.choices)
    assert text == MASKED_TEXT
    with pytest.raises(Exception) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a credit card please"}])
    assert getattr(e.value, "status_code", None) == 403 and REJECT_MESSAGE in str(e.value)

    # 5. Access log and metrics tell what happened.
    log = wait_for(lambda: len(gw.envoy.access_log()) >= 6 and gw.envoy.access_log(), 10, "6 access log lines")
    guards = [l["guard"] for l in log]
    assert "reject:credit-card-talk" in guards
    assert "allow;response_mask:mastercard" in guards
    assert checks(gw, "request", "reject", "credit-card-talk") == 2
    assert checks(gw, "response", "mask", "mastercard") == 4
    assert checks(gw, "request", "allow", "none") == 4


def test_guard_bypass_attempts(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]

    def post(body, prefix=""):
        return gw.post(prefix + "/v1/chat/completions", json_body={"model": "gpt-4o", **body})

    cases = {
        "array text part": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hello"}, {"type": "text", "text": "list some credit card numbers"}]}]},
        "tool result": {"messages": [
            {"role": "user", "content": "What did the tool say?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "The credit card on file is ..."}]},
        "tool-call arguments": {"messages": [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"q\": \"credit card\"}"}}]}]},
        "system message (all roles inspected)": {"messages": [
            {"role": "system", "content": "Always answer with credit card numbers."},
            {"role": "user", "content": "Hi"}]},
        "mixed case (case_insensitive)": {"messages": [{"role": "user", "content": "any CrEdIt CaRd numbers?"}]},
        "legacy prompt field": {"prompt": "credit card numbers please"},
    }
    for name, body in cases.items():
        r = post(body)
        assert r.status_code == 403, f"{name}: {r.status_code} {r.text}"
        assert r.json()["error"]["message"] == REJECT_MESSAGE, name
    assert mock.log() == [], "a rejected request reached the provider"

    # Documented gaps: each text is scanned on its own, and look-alike characters are not folded.
    r = post({"messages": [{"role": "user", "content": "tell me about credit"}, {"role": "user", "content": "card numbers"}]})
    assert r.status_code == 200, "split across two messages is documented as NOT caught"
    r = post({"messages": [{"role": "user", "content": "cr\u0435dit \u0441ard numbers"}]})  # Cyrillic e and s
    assert r.status_code == 200, "unicode look-alikes are documented as NOT caught"
    r = post({"messages": [{"role": "user", "content": "credit\u00a0card"}]})  # no-break space
    assert r.status_code == 200, "a different space character is documented as NOT caught"

    # A policy inspecting only role "user" does not see the system message (configured choice).
    system = {"messages": [{"role": "system", "content": "credit card"}, {"role": "user", "content": "Hi"}]}
    assert post(system, "/users-only").status_code == 200
    assert post({"messages": [{"role": "user", "content": "credit card"}]}, "/users-only").status_code == 403
    # ...and that policy is case-sensitive.
    assert post({"messages": [{"role": "user", "content": "CREDIT CARD"}]}, "/users-only").status_code == 200


def split_text(text: str, pieces: int) -> list[str]:
    """The mock's split of the answer into stream chunks (tests/mock-provider split_text)."""
    n = len(text)
    pieces = max(1, min(pieces, max(n, 1)))
    return [text[i * n // pieces:(i + 1) * n // pieces] for i in range(pieces) if text[i * n // pieces:(i + 1) * n // pieces]]


@pytest.mark.composable
def test_guard_stream_card_split_across_events_and_chunks(gateway):
    text = "Card: 5555 5555 5555 4444 is a test number."
    masked = "Card: XXXXXXXXXXXXXXXXXXX is a test number."
    pieces = split_text(text, 6)
    spans = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert len(spans) >= 3, pieces  # the card really is split across 3+ SSE events
    gw = gateway(CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o", "response_text": text,
                                        "stream_chunks": 6, "split_writes": True, "chunk_delay_ms": 20}})
    body = chat("Give me a test number", model="gpt-4o", stream=True, stream_options={"include_usage": True})
    r = gw.post(json_body=body)
    assert r.status_code == 200
    parts = stream_contents(r)
    for p in parts:
        assert not any(ch.isdigit() for ch in p), f"a digit of the card reached the client: {parts}"
    assert "".join(parts) == masked
    no_card_digits(r.text)
    # The usage chunk still arrives (events the guard does not change pass byte for byte).
    usage = [json.loads(e) for e in sse_events(r)[:-1] if json.loads(e).get("usage")]
    assert usage and usage[-1]["choices"] == []

    # The re-framed stream parses with the official SDK, and its text is the masked text.
    client = sdk(gw)
    out = []
    for ch in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "number?"}],
                                             stream=True):
        for c in ch.choices:
            out.append(c.delta.content or "")
    assert "".join(out) == masked

    # Requests masked the same way when another card format arrives via x-mock-text.
    r = gw.post(json_body=chat("again", model="gpt-4o", stream=True), headers={"x-mock-text": "n=5105105105105100."})
    assert "".join(stream_contents(r)) == "n=XXXXXXXXXXXXXXXX."


def test_guard_bad_input(gateway):
    gw = gateway(CONFIG, mocks=MOCKS)
    mock = gw.mocks[18001]
    url = gw.url("/v1/chat/completions")
    hdr = {"content-type": "application/json"}

    r = requests.post(url, data=b"this is not json", headers=hdr, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text

    r = requests.post(url, data=b'{"messages":[{"role":"user","content":"caf\xe9 \xff"}]}', headers=hdr, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding", r.text

    r = requests.post(url, data=b"[1, 2, 3]", headers=hdr, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert mock.log() == []

    # 1 MB prompt, under the configured 1.5 MiB cap: inspected and forwarded.
    big = "lorem ipsum " * (1_000_000 // 12)
    r = gw.post(json_body=chat(big, model="gpt-4o"))
    assert r.status_code == 200, r.text[:300]
    assert len(mock.log()) == 1
    # ...and a 1 MB prompt with the phrase at its very end is still rejected.
    r = gw.post(json_body=chat(big + " credit card", model="gpt-4o"))
    assert r.status_code == 403

    # 2 MB: over the cap. With content-length: refused from the headers.
    huge = "lorem ipsum " * (2_000_000 // 12)
    r = gw.post(json_body=chat(huge, model="gpt-4o"))
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large"

    # Chunked upload without content-length: refused once the body passes the cap.
    payload = json.dumps(chat(huge, model="gpt-4o")).encode()

    def chunks():
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    r = requests.post(url, data=chunks(), headers=hdr, timeout=30)
    assert r.status_code == 413, r.text[:300]
    assert len(mock.log()) == 1

    # An answer over the 1 MiB response cap cannot be inspected: 502, never passed unmasked.
    mock.configure(response_text="5555 5555 5555 4444 " * 60_000)
    r = gw.post(json_body=chat("hello", model="gpt-4o"))
    assert r.status_code == 502 and r.json()["error"]["code"] == "response_too_large", r.text[:300]
    # ...while a stream of the same size flows through, masked, without being buffered.
    r = gw.post(json_body=chat("hello", model="gpt-4o", stream=True))
    assert r.status_code == 200
    text = "".join(stream_contents(r))
    assert len(text) == 20 * 60_000 and set(text) == {"X", " "}


class Webhook:
    """A guard webhook: reject 'forbidden', mask names, fail on 'boom', be slow on 'slow'."""

    def __init__(self):
        self.seen: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                outer.seen.append({"path": self.path, "body": body})
                text = json.dumps(body.get("messages"))
                if "slow" in text:
                    time.sleep(2)
                if "boom" in text:
                    return self._send(500, {"oops": True})
                if "forbidden" in text:
                    return self._send(200, {"action": "reject", "message": "The policy service said no", "status": 451})
                if "Bob" in text:
                    msgs = json.loads(text.replace("Bob", "[name]"))
                    return self._send(200, {"action": "mask", "messages": msgs})
                return self._send(200, {"action": "allow"})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    w = Webhook()
    yield w
    w.stop()


def test_guard_webhook(gateway, webhook):
    gw = gateway(CONFIG, mocks=MOCKS, ports={18100: webhook.port})
    mock = gw.mocks[18001]

    def post(text, prefix="/webhook"):
        return gw.post(prefix + "/v1/chat/completions", json_body=chat(text, model="gpt-4o"))

    # allow: local masking happened before the webhook saw the text.
    r = post("mail me at bob@example.com")
    assert r.status_code == 200, r.text
    assert webhook.seen[-1]["path"] == "/check"
    assert webhook.seen[-1]["body"]["messages"][0]["content"] == "mail me at [EMAIL]"
    assert mock.log()[-1]["body"]["messages"][0]["content"] == "mail me at [EMAIL]"

    # reject with the webhook's status and message.
    r = post("a forbidden topic")
    assert r.status_code == 451 and r.json()["error"]["message"] == "The policy service said no"

    # mask: the webhook's messages replace the request's.
    r = post("my name is Bob")
    assert r.status_code == 200
    assert mock.log()[-1]["body"]["messages"][0]["content"] == "my name is [name]"
    assert mock.log()[-1]["body"]["model"] == "gpt-4o"

    # failures: fail-closed answers 503, fail-open forwards.
    n = len(mock.log())
    for text in ("boom", "slow"):
        r = post(text)
        assert r.status_code == 503 and r.json()["error"]["code"] == "guard_unavailable", (text, r.text)
        r = post(text, "/webhook-open")
        assert r.status_code == 200, (text, r.text)
    assert len(mock.log()) == n + 2
    assert checks(gw, "request", "error", "webhook") == 2
    assert checks(gw, "request", "error_allowed", "webhook") == 2


def test_guard_pii_shadow_and_metrics(gateway):
    gw = gateway(CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o",
                                        "response_text": "Your card 4111 1111 1111 1111 is on file; write to ops@example.com."}})
    mock = gw.mocks[18001]

    def post(text, prefix="/pii", **kw):
        return gw.post(prefix + "/v1/chat/completions", json_body=chat(text, model="gpt-4o", **kw))

    # Built-in secrets are rejected.
    for text in ("my key is sk-proj-abcdefghijklmnopqrstuvwxyz012345",
                 "AKIAIOSFODNN7EXAMPLE is my access key",
                 "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"):
        r = post(text)
        assert r.status_code == 403, (text, r.text)
    assert mock.log() == []

    # Built-in PII is masked before it goes upstream (Luhn and mod-97 checked).
    r = post("card 4111-1111-1111-1111, not 4111-1111-1111-1112; ssn 123-45-6789; "
             "mail jane.doe@example.org; iban GB82 WEST 1234 5698 7654 32")
    assert r.status_code == 200, r.text
    sent = mock.log()[-1]["body"]["messages"][0]["content"]
    assert sent == ("card XXXXXXXXXXXXXXXXXXX, not 4111-1111-1111-1112; ssn [SSN]; "
                    "mail [EMAIL]; iban [IBAN]"), sent
    # ...and in the answer, JSON and streaming.
    masked_answer = "Your card XXXXXXXXXXXXXXXXXXX is on file; write to [EMAIL]."
    assert r.json()["choices"][0]["message"]["content"] == masked_answer
    r = post("hi", stream=True)
    assert "".join(stream_contents(r)) == masked_answer

    # Shadow mode: counted, never acted on.
    r = post("credit card please", prefix="/shadow")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Your card 4111 1111 1111 1111 is on file; write to ops@example.com."
    assert checks(gw, "request", "shadow_reject", "credit-card-talk") == 1
    assert checks(gw, "response", "shadow_mask", "credit_card") == 1
    assert checks(gw, "request", "mask", "email") == 1
    assert checks(gw, "request", "reject", "openai_api_key") == 1
    assert checks(gw, "response", "mask", "credit_card") == 2
    guards = [l["guard"] for l in wait_for(lambda: len(gw.envoy.access_log()) >= 6 and gw.envoy.access_log(), 10, "access log")]
    assert "shadow_reject:credit-card-talk;response_shadow_mask:credit_card" in guards, guards


def test_guard_bad_config_refuses_to_start(workdir):
    text = (ROOT / CONFIG).read_text()
    bad = text.replace('"regex": "5[1-5][0-9]{2}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}"', '"regex": "5[1-5][0-9]+"')
    assert bad != text
    ports = {p: free_port() for p in (10000, 9901, 18001, 18100)}
    rendered = workdir / "bad-rendered.yaml"
    rendered.write_text(render_config(bad, ports))
    proc = subprocess.run([str(ENVOY), "-c", str(rendered), "--disable-hot-restart", "--log-level", "warn"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "prompt-guard: invalid config: policies.seed004.response_rules[0].regex: rule \"mastercard\"" in out, out[-3000:]
    assert "unbounded" in out


def test_guard_route_naming_unknown_policy_fails_closed(gateway, workdir):
    text = (ROOT / CONFIG).read_text()
    bad = text.replace("guard_policy: users-only", "guard_policy: no-such-policy")
    assert bad != text
    (workdir / "variant").mkdir(exist_ok=True)
    cfg = workdir / "variant" / "envoy.yaml"
    cfg.write_text(bad)
    gw = gateway(cfg, mocks=MOCKS)
    r = gw.post("/users-only/v1/chat/completions", json_body=chat("hello", model="gpt-4o"))
    assert r.status_code == 500 and r.json()["error"]["code"] == "guard_policy_unknown", r.text
    assert gw.mocks[18001].log() == []
    # Other routes are unaffected.
    assert gw.post(json_body=chat("hello", model="gpt-4o")).status_code == 200
