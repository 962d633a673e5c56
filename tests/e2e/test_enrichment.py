"""prompt-enrichment filter end to end (examples/prompt-enrichment/envoy.yaml, seed 004).

Real Envoy with the built sluice_prompt_enrichment.wasm in front of a mock OpenAI provider.
Every assertion about what the gateway did reads the provider's request log: the body the
upstream actually received. One gateway serves the whole module (the tests don't interfere:
each reads back only its own request); bad-config tests start their own Envoy.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest
import requests

from h2client import h2_request
from harness import ENVOY, ROOT, WORK, Gateway, chat, clean_workdir, config_ports, free_port, render_config, sse_events, wait_for

CONFIG = "examples/prompt-enrichment/envoy.yaml"
CSV_PROMPT = "Parse the unstructured text into CSV format and respond only with the CSV data."
SEED_TEXT = (
    "Seattle, Los Angeles, and Chicago are cities in the United States. "
    "London, Paris, and Berlin are cities in Europe."
)
SYSTEM = {"role": "system", "content": CSV_PROMPT}


@pytest.fixture(scope="module", params=["separate", "composed"])
def gw(request):
    """One gateway per build for the module (separate filters, then composed); its logs stay in
    .work/e2e/ only if a test failed."""
    workdir = WORK / f"test_enrichment_shared_{request.param}_{os.getpid()}"
    clean_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    failed_before = request.session.testsfailed
    g = Gateway(workdir, CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o"}},
                composed=request.param == "composed")
    yield g
    g.stop()
    if request.session.testsfailed == failed_before:
        clean_workdir(workdir)
    else:
        print(f"\n[logs kept in {workdir}]")


def send(gw, path: str, body, headers: dict | None = None, port: int | None = None) -> tuple[requests.Response, dict | None]:
    """POST through the gateway with a unique marker header; return the response and the
    upstream's log entry for exactly this request (None when it never reached the upstream)."""
    marker = uuid.uuid4().hex
    h = {"x-test-id": marker, **(headers or {})}
    base = gw.base if port is None else f"http://127.0.0.1:{gw.envoy.port_map[port]}"
    if isinstance(body, (bytes, str)):
        r = requests.post(base + path, data=body, headers=h, timeout=30)
    else:
        r = requests.post(base + path, json=body, headers=h, timeout=30)
    seen = [e for e in gw.mocks[18001].log() if e["headers"].get("x-test-id") == marker]
    assert len(seen) <= 1
    return r, (seen[0] if seen else None)


def error_of(r: requests.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


def counter(gw, **labels) -> float:
    """Value of sluice_enrichment_requests with exactly these labels (0 when absent)."""
    total = 0.0
    for line in gw.envoy.prometheus().splitlines():
        m = re.match(r"^sluice_enrichment_requests\{(.*)\}\s+(\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


# --- seed 004: the gateway adds the team's system prompt ------------------------------------

def test_seed_004_system_prompt_first_client_fields_untouched(gw):
    client = {
        "model": "gpt-4o-mini",
        "max_tokens": 128,
        "temperature": 0.7,
        "seed": 42,
        "response_format": {"type": "text"},
        "vendor_extension": {"keep": ["me", 1, None]},
        "messages": [{"role": "user", "content": SEED_TEXT}],
    }
    r, seen = send(gw, "/v1/chat/completions", client)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gpt-4o-mini"
    body = seen["body"]
    assert body["messages"] == [SYSTEM, {"role": "user", "content": SEED_TEXT}]
    assert {k: v for k, v in body.items() if k != "messages"} == {k: v for k, v in client.items() if k != "messages"}
    # The upstream got a well-framed body (content-length was dropped, the size is the new one).
    assert seen["body_size"] == len(json.dumps(body, separators=(",", ":")).encode())
    # Usage counts the gateway's prompt too: the mock's rule is ceil(bytes/4) over all texts.
    assert r.json()["usage"]["prompt_tokens"] == -(-len((CSV_PROMPT + SEED_TEXT).encode()) // 4)


def test_seed_004_streaming_request(gw):
    client = chat(SEED_TEXT, model="gpt-4o-mini", stream=True, stream_options={"include_usage": True}, max_tokens=128)
    r, seen = send(gw, "/v1/chat/completions", client)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hello from openai."
    assert chunks[-1]["usage"]["prompt_tokens"] == -(-len((CSV_PROMPT + SEED_TEXT).encode()) // 4)
    body = seen["body"]
    assert seen["stream"] is True
    assert body["messages"] == [SYSTEM, {"role": "user", "content": SEED_TEXT}]
    assert {k: v for k, v in body.items() if k != "messages"} == {k: v for k, v in client.items() if k != "messages"}


def test_client_conversation_kept_whatever_its_content_form(gw):
    messages = [
        {"role": "system", "content": "The client's own system prompt."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "result"},
        {"role": "user", "content": "Thanks, now as CSV."},
    ]
    r, seen = send(gw, "/v1/chat/completions", {"model": "gpt-4o", "messages": messages,
                                               "tools": [{"type": "function", "function": {"name": "lookup"}}]})
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"] == [SYSTEM] + messages
    assert seen["body"]["tools"] == [{"type": "function", "function": {"name": "lookup"}}]


# --- defaults vs overrides vs caps (route /fields/, profile "fields") -----------------------

def test_defaults_fill_only_absent_fields(gw):
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", model="gpt-4o"))
    assert r.status_code == 200, r.text
    body = seen["body"]
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 256
    assert body["user"] == "gateway-default"
    assert body["messages"] == [{"role": "user", "content": "hi"}], "a fields-only profile adds no messages"

    # The client's own values win over defaults (explicit null counts as absent).
    r, seen = send(gw, "/fields/v1/chat/completions",
                   chat("hi", temperature=0.9, max_tokens=100, user="bob", presence_penalty=None))
    body = seen["body"]
    assert (body["temperature"], body["max_tokens"], body["user"]) == (0.9, 100, "bob")
    assert body["presence_penalty"] is None


def test_overrides_always_win(gw):
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", top_p=0.1))
    assert r.status_code == 200, r.text
    assert seen["body"]["top_p"] == 0.9
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi"))
    assert seen["body"]["top_p"] == 0.9
    # stream_options is only set on streaming requests (providers reject it otherwise) ...
    assert "stream_options" not in seen["body"]
    # ... where the override forces include_usage, so the client gets a usage chunk.
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", stream=True, stream_options={"include_usage": False}))
    assert r.status_code == 200, r.text
    assert seen["body"]["stream_options"] == {"include_usage": True}
    chunks = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 1


def test_caps_lower_numbers_above_the_cap(gw):
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", max_tokens=5000, max_completion_tokens=4096))
    assert r.status_code == 200, r.text
    assert seen["body"]["max_tokens"] == 1024
    assert seen["body"]["max_completion_tokens"] == 1024
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", max_tokens=1000))
    assert seen["body"]["max_tokens"] == 1000, "below the cap: untouched"
    # A capped field of the wrong type is refused, never forwarded past the cap.
    r, seen = send(gw, "/fields/v1/chat/completions", chat("hi", max_tokens="5000"))
    assert r.status_code == 400
    assert seen is None
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    assert "max_tokens: expected a non-negative integer" in err["message"]


# --- templates (route /team/, profile "team", on_missing_variable: refuse) ------------------

def test_templates_from_headers_and_route_metadata(gw):
    r, seen = send(gw, "/team/v1/chat/completions", chat("Who are you?"),
                   headers={"x-team": "platform", "x-lang": "French"})
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"] == [
        {"role": "system", "content": "You answer for team platform (gold tier)."},
        {"role": "user", "content": "Who are you?"},
        {"role": "user", "content": [{"type": "text", "text": "Answer in French."}]},
    ]


def test_missing_variable_refused_naming_it(gw):
    before = counter(gw, sluice_rule="team", sluice_action="refused", sluice_reason="missing_variable")
    r, seen = send(gw, "/team/v1/chat/completions", chat("Who are you?"), headers={"x-lang": "French"})
    assert r.status_code == 400
    assert seen is None, "a refused request never reaches the provider"
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "missing_template_variable"
    assert "{{header.x-team}}" in err["message"]
    assert counter(gw, sluice_rule="team", sluice_action="refused", sluice_reason="missing_variable") == before + 1


# --- profiles per route ---------------------------------------------------------------------

def test_route_profiles_unknown_and_disabled(gw):
    client = chat("plain", model="gpt-4o", temperature=1)
    # A route naming a profile that doesn't exist: forwarded unchanged, counted (failure_mode allow).
    r, seen = send(gw, "/misnamed/v1/chat/completions", client)
    assert r.status_code == 200, r.text
    assert seen["body"] == client
    assert counter(gw, sluice_rule="no-such-profile", sluice_action="passthrough", sluice_reason="unknown_profile") >= 1
    # The filter switched off on a route.
    r, seen = send(gw, "/raw/v1/chat/completions", client)
    assert r.status_code == 200, r.text
    assert seen["body"] == client


# --- bodies that are not chat requests ------------------------------------------------------

def test_non_json_bodies_pass_unchanged_and_are_counted(gw):
    before = counter(gw, sluice_rule="csv", sluice_action="passthrough", sluice_reason="not_json")
    for body, ctype in [(b"this is not json", "text/plain"), (b'{"messages": [', "application/json"),
                        (b"\xff\xfe{}", "application/json"), (b"[1, 2, 3]", "application/json")]:
        r, seen = send(gw, "/v1/chat/completions", body, headers={"content-type": ctype})
        assert seen is not None, body
        if seen["body"] is None:
            assert seen["body_text"].encode("utf-8", "surrogateescape") in (body, body.decode("utf-8", "replace").encode()), body
        else:
            assert seen["body"] == json.loads(body), body
        assert seen["body_size"] == len(body)
    assert counter(gw, sluice_rule="csv", sluice_action="passthrough", sluice_reason="not_json") == before + 4


def test_a_json_body_sent_as_text_plain_is_enriched_all_the_same(gw):
    """A provider that ignores the content type serves a JSON body labelled text/plain; the
    guard and auth check that body as JSON, so enrichment must add its system prompt to it too
    (it used to forward it unenriched as "not JSON")."""
    client = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": SEED_TEXT}]}
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r, seen = send(gw, "/v1/chat/completions", json.dumps(client), headers={"content-type": ctype})
        assert r.status_code == 200, r.text
        assert seen["body"]["messages"] == [SYSTEM, {"role": "user", "content": SEED_TEXT}], ctype


def test_wrong_shape_is_refused(gw):
    r, seen = send(gw, "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"content": "no role"}]})
    assert r.status_code == 400
    assert seen is None
    err = error_of(r)
    assert err["code"] == "invalid_request"
    assert "messages[0].role: missing required field" in err["message"], "the client's own index"


def test_over_cap_body_gets_413(gw):
    big = chat("x" * 70_000)  # the example's max_body_bytes is 65536
    r, seen = send(gw, "/v1/chat/completions", big)
    assert r.status_code == 413
    assert seen is None
    err = error_of(r)
    assert err["code"] == "request_too_large"
    assert "65536" in err["message"]
    # Chunked (no content-length): refused once the buffered body passes the cap.
    data = json.dumps(big).encode()
    r = requests.post(gw.url("/v1/chat/completions"), data=iter([data[i:i + 8192] for i in range(0, len(data), 8192)]),
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"


def test_failure_mode_deny_refuses_non_json(gw):
    r, seen = send(gw, "/v1/chat/completions", b"not json", headers={"content-type": "application/json"}, port=10001)
    assert r.status_code == 400
    assert seen is None
    assert error_of(r)["code"] == "invalid_json"
    r, seen = send(gw, "/v1/chat/completions", chat(SEED_TEXT), port=10001)
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"][0] == SYSTEM


def test_metrics_and_access_log(gw):
    r, _ = send(gw, "/v1/chat/completions", chat("count me", model="gpt-4o-mini"))
    assert r.status_code == 200
    assert counter(gw, sluice_rule="csv", sluice_action="enriched", sluice_reason="ok") >= 1
    assert "sluice_enrichment_requests{" in gw.envoy.prometheus()

    def logged():
        lines = [x for x in gw.envoy.access_log() if x.get("gen_ai.request.model") == "gpt-4o-mini"]
        return lines or None

    lines = wait_for(logged, 15, "access log line with the requested model")
    assert lines[-1]["http.status"] == 200


# --- HTTP/2, request trailers (issue 13 §1) -------------------------------------------------

def h2_send(gw, path: str, body: dict, trailers: dict | None, headers: dict | None = None):
    """POST over h2c with the body in several DATA frames (ending with trailers when given);
    returns the response and the upstream's log entry for exactly this request."""
    marker = uuid.uuid4().hex
    data = json.dumps(body).encode()
    chunks = [data[i:i + 40] for i in range(0, len(data), 40)]
    h = {"content-type": "application/json", "x-test-id": marker, **(headers or {})}
    r = h2_request(gw.envoy.listener_port, "POST", path, h, chunks, trailers=trailers)
    seen = [e for e in gw.mocks[18001].log() if e["headers"].get("x-test-id") == marker]
    assert len(seen) <= 1
    return r, (seen[0] if seen else None)


def test_request_ending_with_trailers_is_enriched(gw):
    """A body that ends with a trailers frame gets the profile exactly like one ending with
    END_STREAM (it used to be forwarded unenriched)."""
    for trailers in ({"x-client-trailer": "1"}, None):
        r, seen = h2_send(gw, "/v1/chat/completions", chat(SEED_TEXT, model="gpt-4o-mini"), trailers)
        assert r.status == 200, (trailers, r.text)
        assert seen is not None
        assert seen["body"]["messages"] == [SYSTEM, {"role": "user", "content": SEED_TEXT}], trailers
    # Caps hold too: a capped field past the cap, body ending with trailers.
    r, seen = h2_send(gw, "/fields/v1/chat/completions", chat("hi", max_completion_tokens=9999), {"x-t": "1"})
    assert r.status == 200, r.text
    assert seen["body"]["max_completion_tokens"] == 1024
    # A refusal too: a capped field of the wrong type never reaches the provider.
    r, seen = h2_send(gw, "/fields/v1/chat/completions", chat("hi", max_tokens="5000"), {"x-t": "1"})
    assert r.status == 400, r.text
    assert seen is None


# --- every format gets the prompt and the fields in its own place (issue 19 §1) ------------

def test_responses_api_gets_instructions(gw):
    body = {"model": "gpt-4o", "instructions": "Be brief.", "input": SEED_TEXT}
    r, seen = send(gw, "/v1/responses", body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response"
    sent = seen["body"]
    assert sent["instructions"] == f"{CSV_PROMPT}\n\nBe brief."
    assert sent["input"] == SEED_TEXT
    assert "messages" not in sent
    # The provider counted the gateway's instructions (mock: ceil(bytes / 4)).
    assert r.json()["usage"]["input_tokens"] == -(-len(f"{CSV_PROMPT}\n\nBe brief.{SEED_TEXT}".encode()) // 4)


def test_messages_api_gets_system(gw):
    body = {"model": "claude-sonnet-4", "max_tokens": 64, "messages": [{"role": "user", "content": SEED_TEXT}]}
    r, seen = send(gw, "/v1/messages", body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text  # the mock validates the Messages shape like the real API
    assert r.json()["type"] == "message"
    assert seen["body"]["system"] == CSV_PROMPT
    assert seen["body"]["messages"] == body["messages"]
    # A client system prompt in blocks: the gateway's goes first, as its own block.
    body["system"] = [{"type": "text", "text": "Client rules."}]
    r, seen = send(gw, "/v1/messages", body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert seen["body"]["system"] == [{"type": "text", "text": CSV_PROMPT}, {"type": "text", "text": "Client rules."}]


def test_fields_in_the_formats_own_names(gw):
    # Responses: the output cap and the max_tokens default go to max_output_tokens.
    r, seen = send(gw, "/fields/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 5000})
    assert r.status_code == 200, r.text
    sent = seen["body"]
    assert sent["max_output_tokens"] == 1024
    assert "max_tokens" not in sent and "max_completion_tokens" not in sent
    assert (sent["temperature"], sent["top_p"]) == (0.2, 0.9)
    r, seen = send(gw, "/fields/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True})
    assert r.status_code == 200, r.text  # stream_options is never sent to the Responses API
    assert seen["body"]["max_output_tokens"] == 256
    assert "stream_options" not in seen["body"]


def test_one_output_cap_bounds_both_chat_fields(gateway, workdir):
    """A profile capping only max_tokens (like envoy/envoy.yaml once did) bounds
    max_completion_tokens too: the client cannot dodge the cap with the other field."""
    text = (ROOT / CONFIG).read_text()
    old = '"caps": {"max_tokens": 1024, "max_completion_tokens": 1024}'
    assert old in text
    cfg = workdir / "one-cap.yaml"
    cfg.write_text(text.replace(old, '"caps": {"max_tokens": 1024}'))
    g = gateway(cfg, mocks={18001: {"name": "openai", "model": "gpt-4o"}})
    for field in ("max_completion_tokens", "max_tokens"):
        r, seen = send(g, "/fields/v1/chat/completions", chat("hi", **{field: 4096}))
        assert r.status_code == 200, r.text
        assert seen["body"][field] == 1024, (field, seen["body"])
    r, seen = send(g, "/fields/v1/chat/completions", chat("hi", max_tokens=5000, max_completion_tokens=3000))
    assert (seen["body"]["max_tokens"], seen["body"]["max_completion_tokens"]) == (1024, 1024)


# --- client headers are not template input unless opted in (issue 13 §4) -------------------

def test_header_variables_need_opt_in(tmp_path):
    """`{{header.*}}` puts client input into the gateway's prompt: a profile must opt in with
    allow_header_variables, else Envoy refuses the config naming the field."""
    text = (ROOT / CONFIG).read_text()
    opt_in = '"allow_header_variables": true,'
    assert text.count(opt_in) == 1
    ports = {p: free_port() for p in config_ports(text)}
    rendered = tmp_path / "no-opt-in.yaml"
    rendered.write_text(render_config(text.replace(opt_in, "", 1), ports))
    log = tmp_path / "envoy.log"
    proc = subprocess.Popen([str(ENVOY), "-c", str(rendered), "--disable-hot-restart", "--log-level", "warn",
                             "--log-path", str(log)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("Envoy accepted a {{header.*}} template without allow_header_variables")
    out = log.read_text(errors="replace")
    assert code != 0, out[-3000:]
    want = ("prompt-enrichment: invalid config: profiles.team.prepend[0].content: template variable "
            "{{header.x-team}} takes its value from a client request header")
    assert want in out, out[-3000:]


# --- configuration errors stop Envoy --------------------------------------------------------

def test_bad_config_refuses_to_start_naming_the_field(tmp_path):
    """on_configure rejects the config (templates are parsed at load) and Envoy exits."""
    text = (ROOT / CONFIG).read_text()
    good = f'"content": "{CSV_PROMPT}"'
    assert text.count(good) == 2
    cases = [
        ('"content": "Parse {{team"', "profiles.csv.prepend[0].content: unclosed {{"),
        ('"content": "Parse {{teams}}"', "profiles.csv.prepend[0].content: unknown template variable {{teams}}"),
        ('"content": "Parse {{header.X Y}}"', "profiles.csv.prepend[0].content: template variable {{header.X Y}}"),
    ]
    for bad, field in cases:
        ports = {p: free_port() for p in config_ports(text)}
        rendered = tmp_path / "bad.yaml"
        rendered.write_text(render_config(text.replace(good, bad, 1), ports))
        proc = subprocess.run([str(ENVOY), "-c", str(rendered), "--disable-hot-restart", "--log-level", "warn"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert f"prompt-enrichment: invalid config: {field}" in out, out[-3000:]
        assert "failed to load" in out
