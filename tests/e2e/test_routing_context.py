"""Context-window overflow falls back to a larger-context model, and only that error does
(issue 16 §5): examples/context-overflow (two clusters, priority_group) and the same marker
with a backup model on one endpoint (examples/backup-models with the retry on the marker).
The small model's mock has --context-window 20: a prompt over 20 tokens gets the provider's
own 400 (OpenAI shape on chat, Anthropic shape on /v1/messages)."""
from __future__ import annotations

import json

from h2client import h2_request
from harness import chat, sse_events
from test_routing_helpers import access_log_entries, models_seen, served_by, variant

EXAMPLE = "examples/context-overflow/envoy.yaml"
LONG = "Summarize this: " + "the quick brown fox jumps over the lazy dog " * 10  # ~110 tokens
ANTHROPIC = {"anthropic-version": "2023-06-01"}


def messages_body(text: str) -> dict:
    return {"model": "client-model", "max_tokens": 32, "messages": [{"role": "user", "content": text}]}


def gw_small_large(gateway, **large):
    return gateway(EXAMPLE, mocks={18001: {"name": "vllm-small", "context_window": 20},
                                   18002: {"name": "vllm-large", **large}})


def test_a_too_long_prompt_is_retried_on_the_large_model(gateway):
    gw = gw_small_large(gateway)
    small, large = gw.mocks[18001], gw.mocks[18002]

    # Fits: the small model serves, nothing else is asked.
    r = gw.post("/v1/chat/completions", json_body=chat("hi", model="client-model"))
    assert r.status_code == 200 and served_by(r) == "vllm-small", r.text
    assert large.log() == []

    # OpenAI-style overflow (JSON and streaming), Anthropic-style overflow: the large model serves.
    cases = [
        ("/v1/chat/completions", chat(LONG, model="client-model"), {}, False),
        ("/v1/chat/completions", chat(LONG, model="client-model", stream=True), {}, True),
        ("/v1/messages", messages_body(LONG), ANTHROPIC, False),
    ]
    for path, body, headers, stream in cases:
        small.clear_log()
        large.clear_log()
        r = gw.post(path, json_body=body, headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert served_by(r) == "vllm-large", path
        assert "x-sluice-retry" not in r.headers
        if stream:
            assert sse_events(r)[-1] == "[DONE]"
        (s,) = small.log()
        (l,) = large.log()
        assert s["status"] == 400 and s["model"] == "qwen2.5-7b-instruct-8k", s
        assert l["model"] == "qwen2.5-7b-instruct-128k" and l["attempt"] == 2
        assert l["body"]["messages"] == body["messages"], "the large model got the whole prompt"
    entry = access_log_entries(gw.envoy, 4)[-1]
    assert (entry["cluster"], entry["attempts"]) == ("large-context", 2)
    prom = gw.envoy.prometheus()
    assert ('sluice_failover_context_overflow{gen_ai_provider_name="vllm-small",'
            'gen_ai_request_model="qwen2.5-7b-instruct-8k"} 3') in prom, prom[-3000:]

    # Over HTTP/2 too.
    small.clear_log()
    large.clear_log()
    r = h2_request(gw.envoy.listener_port, "POST", "/v1/chat/completions", {"content-type": "application/json"},
                   json.dumps(chat(LONG)).encode())
    assert r.status == 200 and r.headers.get("x-mock-provider") == "vllm-large", r.text
    assert "x-sluice-retry" not in r.headers


def test_other_400s_are_not_retried_and_a_last_overflow_reaches_the_client_untouched(gateway):
    gw = gw_small_large(gateway, context_window=20)
    small, large = gw.mocks[18001], gw.mocks[18002]
    # A 400 that is not about the context window: the provider's answer, no retry.
    r = gw.post("/v1/chat/completions", json_body=chat("hi"), headers={"x-mock-fail": "bogus"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_mock_fail"
    assert large.log() == [], "an ordinary 400 was retried"
    # Both models too small: the client gets the last provider's own 400 and body, with no
    # internal marker.
    r = gw.post("/v1/chat/completions", json_body=chat(LONG))
    assert r.status_code == 400
    assert served_by(r) == "vllm-large"
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "maximum context length is 20 tokens" in err["message"]
    assert "x-sluice-retry" not in r.headers
    r = gw.post("/v1/messages", json_body=messages_body(LONG), headers=ANTHROPIC)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("prompt is too long")
    assert "x-sluice-retry" not in r.headers


def test_without_the_marker_envoy_does_not_retry_a_context_400(gateway, workdir):
    """The retry comes from sluice's marker: without retry_context_overflow the 400 goes to the
    client as it came."""
    cfg = variant(workdir, EXAMPLE, [("value: '{\"retry_context_overflow\":true}'", "value: '{}'")] )
    gw = gateway(cfg, mocks={18001: {"name": "vllm-small", "context_window": 20}, 18002: {"name": "vllm-large"}})
    r = gw.post("/v1/chat/completions", json_body=chat(LONG))
    assert r.status_code == 400 and served_by(r) == "vllm-small"
    assert gw.mocks[18002].log() == []


BACKUP_CONTEXT = [
    ('value: \'{"backup_models":["gpt-4.0-turbo","gpt-3.5-turbo"],',
     'value: \'{"retry_context_overflow":true,"backup_models":["gpt-4.1"],'),
    ('retry_on: "5xx,reset,connect-failure,retriable-status-codes"',
     'retry_on: "5xx,reset,connect-failure,retriable-status-codes,retriable-headers"\n'
     '                    retriable_headers: [ { name: x-sluice-retry, string_match: { exact: context-length } } ]'),
    ("num_retries: 2", "num_retries: 1"),
]


def test_a_too_long_prompt_is_retried_on_a_backup_model_of_the_same_endpoint(gateway, workdir):
    """One provider endpoint; attempt 2 carries the backup (larger-context) model."""
    cfg = variant(workdir, "examples/backup-models/envoy.yaml", BACKUP_CONTEXT)
    gw = gateway(cfg, mocks={18001: {"name": "openai"}}, env={"OPENAI_API_KEY": "sk-test"})
    mock = gw.mocks[18001]
    # The mock refuses the first attempt as too long (x-mock-fail: context_length reaches every
    # attempt, so give the backup model a window instead).
    mock.configure(context_window=20)
    r = gw.post("/v1/chat/completions", json_body=chat(LONG, model="gpt-4o"))
    assert r.status_code == 400, r.text  # both attempts too long for this one mock window
    assert models_seen(mock) == ["gpt-4o", "gpt-4.1"], "the retry carried the backup model"
    assert "x-sluice-retry" not in r.headers
    mock.clear_log()
    mock.configure(context_window=None)
    r = gw.post("/v1/chat/completions", json_body=chat(LONG, model="gpt-4o"))
    assert r.status_code == 200 and models_seen(mock) == ["gpt-4o"]
