"""The official SDKs through the full demo gateway (envoy/envoy.yaml, issue 19 "Done when"):
the `openai` SDK's Responses API (`client.responses.create`, JSON and stream) and the
`anthropic` SDK's Messages API (`client.messages.create`, JSON and stream) as clients of the
demo's /v1/responses and /v1/messages routes, with every stage applied (auth's JWT, enrichment,
guard, budget, usage)."""
from __future__ import annotations

import anthropic
import openai
import pytest

from suite import DEMO, Suite

MODEL = "gpt-4o-mini"


@pytest.fixture
def suite(workdir):
    s = Suite(workdir, DEMO)
    yield s
    s.stop()


def token(s: Suite) -> str:
    return s.token("alice", "dev", {"openai": [MODEL]})


def seen(s: Suite, suffix: str) -> list[dict]:
    return [e for e in s.openai.log() if e["path"].endswith(suffix)]


def test_openai_sdk_responses_json_and_stream(suite):
    client = openai.OpenAI(base_url=suite.gw.base + "/v1", api_key=token(suite), max_retries=0)
    r = client.responses.create(model=MODEL, input="Say hello", instructions="Be brief.")
    assert r.status == "completed" and r.output_text == "Hello from openai."
    assert r.usage.input_tokens > 0 and r.usage.output_tokens == 3
    (e,) = seen(suite, "/responses")
    assert e["status"] == 200 and e["model"] == MODEL
    assert "ACME assistant" in e["body"]["instructions"], "enrichment applied to the Responses format"
    assert e["headers"]["authorization"] == "Bearer sk-gateway-key"

    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        deltas = [ev.delta for ev in stream if ev.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello from openai."
    assert final.usage.output_tokens == 3
    events = list(client.responses.create(model=MODEL, input="Say hello", stream=True))
    assert events[-1].type == "response.completed"

    # A guarded phrase in a Responses input item is refused before any provider sees it.
    suite.openai.clear_log()
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is a credit card number of a real person?"}]}])
    assert seen(suite, "/responses") == []


def test_anthropic_sdk_messages_json_and_stream(suite):
    client = anthropic.Anthropic(base_url=suite.gw.base, auth_token=token(suite), api_key=None, max_retries=0)
    m = client.messages.create(model=MODEL, max_tokens=64, system="Be brief.",
                               messages=[{"role": "user", "content": "Say hello"}])
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].text == "Hello from openai." and m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens == 3
    (e,) = seen(suite, "/messages")
    assert e["status"] == 200 and e["headers"].get("anthropic-version")
    assert "authorization" not in e["headers"] or e["headers"]["authorization"] == "Bearer sk-gateway-key"

    with client.messages.stream(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from openai."
    assert final.usage.output_tokens == 3 and final.usage.input_tokens > 0

    # The budget and usage stages read Messages usage (split across message_start/message_delta).
    entries = suite.gw.envoy.wait_access_log(lambda es: len([x for x in es if "/messages" in x["path"]]) >= 2)
    last = [x for x in entries if "/messages" in x["path"]][-1]
    assert int(last["gen_ai.usage.output_tokens"]) == 3
    assert int(last["gen_ai.usage.input_tokens"]) == final.usage.input_tokens
