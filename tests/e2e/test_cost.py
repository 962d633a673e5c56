"""Cost in money and budgets in money (issue 18 §3), examples/monthly-budget: costs match the
price table for a known usage mix in JSON and streams (access log, Prometheus), and a monthly
per-API-key budget is refused when spent while another key is unaffected."""
from __future__ import annotations

import re

import pytest

from harness import chat, sse_events, wait_for

CONFIG = "examples/monthly-budget/envoy.yaml"
KEY_A = {"authorization": "Bearer sk-team-a-demo"}
KEY_B = {"authorization": "Bearer sk-team-b-demo"}
# Per million tokens: (input, cached input, output), as in the example's price table.
PRICES = {"gpt-4o-mini": (0.15, 0.075, 0.60), "gpt-4o": (2.50, 1.25, 10.00)}


def expected_micros(model: str, prompt: int, cached: int, completion: int) -> int:
    inp, cin, out = PRICES[model]
    return round((prompt - cached) * inp + cached * cin + completion * out)


def cost_metric(gw) -> dict[str, int]:
    out = {}
    for line in gw.envoy.prometheus().splitlines():
        m = re.match(r'sluice_usage_cost_micros\{(.*)\} (\d+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels["gen_ai_request_model"]] = out.get(labels["gen_ai_request_model"], 0) + int(m.group(2))
    return out


@pytest.mark.composable
def test_costs_match_the_price_table_in_json_and_streams(gateway):
    gw = gateway(CONFIG, mocks={18001: {"name": "openai"}})
    mix = [
        # (model, stream, cached tokens, words)
        ("gpt-4o-mini", False, 0, 40),
        ("gpt-4o-mini", True, 0, 25),
        ("gpt-4o", False, 8, 10),
        ("gpt-4o", True, 4, 12),
    ]
    want_by_model: dict[str, int] = {}
    want_lines = []
    for model, stream, cached, words in mix:
        extra = {"stream_options": {"include_usage": True}} if stream else {}
        headers = {**KEY_B, "x-mock-words": str(words), "x-mock-cached-tokens": str(cached)}
        r = gw.post(json_body=chat("Price this request for me, please, in detail.", model=model, stream=stream,
                                   **extra), headers=headers)
        assert r.status_code == 200, r.text
        if stream:
            usage = [e for e in sse_events(r) if '"usage":{' in e][-1]
            import json
            u = json.loads(usage)["usage"]
        else:
            u = r.json()["usage"]
        micros = expected_micros(model, u["prompt_tokens"], cached, u["completion_tokens"])
        want_by_model[model] = want_by_model.get(model, 0) + micros
        want_lines.append(str(micros))
        assert float(r.headers["x-ratelimit-remaining-cost"]) < 0.01
    lines = gw.envoy.wait_access_log(lambda e: len([x for x in e if x.get("cost_micros")]) >= len(mix))
    assert [x["cost_micros"] for x in lines if x.get("cost_micros")] == want_lines
    wait_for(lambda: cost_metric(gw) == want_by_model, 10, f"cost metric {want_by_model}")


@pytest.mark.composable
def test_a_monthly_budget_is_refused_when_spent_and_another_key_is_unaffected(gateway):
    gw = gateway(CONFIG, mocks={18001: {"name": "openai"}})
    statuses = []
    for _ in range(10):
        r = gw.post(json_body=chat("Write a long answer", model="gpt-4o"), headers={**KEY_A, "x-mock-words": "300"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
    assert statuses[-1] == 429, statuses
    err = r.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert 'rule "monthly-spend" allows 0.010000 USD per month window' in err["message"], err
    assert r.headers["x-ratelimit-limit-cost"] == "0.010000"
    assert int(r.headers["retry-after"]) > 0
    before = len(gw.mocks[18001].log())
    r = gw.post(json_body=chat("one more", model="gpt-4o"), headers=KEY_A)
    assert r.status_code == 429
    assert len(gw.mocks[18001].log()) == before, "a refused request never reaches the provider"
    r = gw.post(json_body=chat("team b is fine", model="gpt-4o"), headers=KEY_B)
    assert r.status_code == 200, r.text
    # An unpriced model cannot run up an unbudgeted bill.
    r = gw.post(json_body=chat("hi", model="some-unpriced-model"), headers=KEY_B)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_priced"
