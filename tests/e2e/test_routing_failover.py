"""model-failover filter, within one request: seed 001 (three priorities on one always-429
host), seed 004 (backup models), body handling (413, non-JSON), config errors that make
Envoy refuse to start, and the provider's 429 as Envoy sees it natively (issue 16 §1) or,
opted in, rewritten to 503 for Envoy versions without error_matcher."""
from __future__ import annotations

import json

import requests

from harness import ROOT, chat, sse_events, wait_for
from test_routing_helpers import access_log_entries, envoy_refuses, models_seen, variant

ENV = {"OPENAI_API_KEY": "sk-test-failover"}


def well_framed(entry: dict) -> bool:
    """The provider got a body framed right: a rewritten body goes chunked (the client's
    content-length was dropped), an unchanged one may keep its content-length."""
    h = entry["headers"]
    if "content-length" in h:
        return int(h["content-length"]) == entry["body_size"]
    return h.get("transfer-encoding") == "chunked"


def test_seed_001_three_priorities_on_one_rate_limited_host(gateway):
    """One client request: the mock sees gpt-4o, gpt-4.0-turbo, gpt-3.5-turbo in that order,
    with the provider key instead of the client's; the router sees each provider 429 as is
    and, with no retry left, Envoy itself hands the client the last one (and its retry-after)."""
    gw = gateway("examples/model-failover/envoy.yaml",
                 mocks={18001: {"name": "model-failover", "rate_429": 100, "retry_after": "30"}}, env=ENV)
    mock = gw.mocks[18001]
    r = gw.post("/model", json_body=chat("Compose a poem about recursion.", model="gpt-4o"),
                headers={"authorization": "Bearer client-token"})
    assert r.status_code == 429, r.text
    assert r.headers.get("retry-after") == "30"
    assert "x-sluice-original-status" not in r.headers
    assert r.json()["error"]["type"] == "rate_limit_error"

    log = [e for e in mock.log() if e["path"].endswith("/chat/completions")]
    assert [e["model"] for e in log] == ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo"]
    assert [e["attempt"] for e in log] == [1, 2, 3]
    for e in log:
        assert e["path"] == "/v1/chat/completions"
        assert e["headers"].get("authorization") == "Bearer sk-test-failover"
        assert e["body"]["messages"][0]["content"] == "Compose a poem about recursion."
        assert well_framed(e)

    entry = access_log_entries(gw.envoy, 1)[-1]
    assert entry["http.status"] == 429
    assert entry["attempts"] == 3
    assert entry["upstream_model"] == "gpt-3.5-turbo"
    assert entry["gen_ai.provider.name"] == "openai"
    assert entry["retry_after_s"] == "30"

    prom = gw.envoy.prometheus()
    for model in ("gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo"):
        labels = f'gen_ai_provider_name="openai",gen_ai_request_model="{model}"'
        assert f"sluice_failover_rate_limited{{{labels}}} 1" in prom, prom[-2000:]
        assert f"sluice_failover_attempts{{{labels}}} 1" in prom
    assert "sluice_failover_retry_after_ms_bucket" in prom
    stats = gw.envoy.stats()
    assert stats.get("cluster.openai-priorities.upstream_rq_retry") == 2
    # The router saw 429s, not 503s: two retried, the last one answered.
    assert stats.get("cluster.openai-priorities.retry.upstream_rq_429") == 2
    assert stats.get("cluster.openai-priorities.upstream_rq_429") == 1
    assert not stats.get("cluster.openai-priorities.upstream_rq_503")

    # A healthy provider serves the first priority's model; a streaming answer passes through.
    mock.configure(rate_429=0)
    mock.clear_log()
    r = gw.post("/model", json_body=chat("hi", stream=True), headers={"authorization": "Bearer client-token"})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["model"] == "gpt-4o"
    assert models_seen(mock) == ["gpt-4o"]


def test_seed_004_backup_models(gateway):
    """Requested model first, then each backup in order; a backup that works serves."""
    gw = gateway("examples/backup-models/envoy.yaml",
                 mocks={18001: {"name": "openai", "rate_429": 100, "retry_after": "7", "retry_after_ms": 1500}},
                 env=ENV)
    mock = gw.mocks[18001]
    r = gw.post("/v1/chat/completions", json_body=chat("Compose a poem.", model="gpt-4o"))
    assert r.status_code == 429
    assert r.headers.get("retry-after") == "7"
    assert models_seen(mock) == ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo"]
    # retry-after-ms is preferred over retry-after for the recorded wait.
    entry = access_log_entries(gw.envoy, 1)[-1]
    assert (entry["upstream_model"], entry["retry_after_s"]) == ("gpt-3.5-turbo", "1.5")

    # rate 50 %: the mock's 1st answer is fine, its 2nd a 429, its 3rd fine again.
    mock.configure(rate_429=50)
    mock.clear_log()
    r1 = gw.post("/v1/chat/completions", json_body=chat("one", model="gpt-4o"))
    r2 = gw.post("/v1/chat/completions", json_body=chat("two", model="gpt-4o"))
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert r1.json()["model"] == "gpt-4o"
    assert r2.json()["model"] == "gpt-4.0-turbo"
    assert models_seen(mock) == ["gpt-4o", "gpt-4o", "gpt-4.0-turbo"]


def test_body_cap_non_json_and_streaming(gateway, workdir):
    """413 OpenAI-style over the cap (declared and chunked); a non-JSON body is forwarded
    unchanged and counted; a rewritten body reaches the provider well framed."""
    cfg = variant(workdir, "examples/model-failover/envoy.yaml",
                  [('value: \'{"providers"', 'value: \'{"max_body_bytes":2000,"providers"')])
    gw = gateway(cfg, mocks={18001: {"name": "openai"}}, env=ENV)
    mock = gw.mocks[18001]

    big = chat("x" * 5000, model="gpt-4o")
    r = gw.post("/model", json_body=big)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "2000" in err["message"]

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]
    r = requests.post(gw.url("/model"), data=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert mock.log() == []

    r = gw.post("/model", data=b"hello, not json", headers={"content-type": "text/plain"})
    log = mock.log()
    assert len(log) == 1 and log[0]["body_text"] == "hello, not json"
    assert r.status_code == 400  # the provider's answer, passed through
    assert ('sluice_failover_body_passthrough{gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o",'
            'sluice_reason="not_json"} 1') in gw.envoy.prometheus()

    mock.clear_log()
    r = gw.post("/model", json_body=chat("hi", model="a-much-longer-client-model-name"))
    assert r.status_code == 200 and r.json()["model"] == "gpt-4o"
    (e,) = mock.log()
    assert well_framed(e) and e["body_size"] == len(json.dumps(e["body"], separators=(",", ":")))

    # A chunked request body (no content-length) is rewritten too.
    mock.clear_log()
    small = json.dumps(chat("chunked", model="m")).encode()
    r = requests.post(gw.url("/model"), data=iter([small[:10], small[10:]]),
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "gpt-4o"
    (e,) = mock.log()
    assert e["model"] == "gpt-4o" and e["body"]["messages"][0]["content"] == "chunked"


def _upstream_config_variant(bad_json: str) -> str:
    text = (ROOT / "examples/model-failover/envoy.yaml").read_text()
    old = 'value: \'{"providers":{"openai":{"credential_env":"OPENAI_API_KEY"}}}\''
    assert old in text
    return text.replace(old, f"value: '{bad_json}'")


def test_config_errors_make_envoy_refuse(workdir):
    cases = [
        ('{"providers":{"openai":{"credential_env":"OPENAI_API_KEY"}},"backup_model":["x"]}',
         "model-failover: invalid config: backup_model: unknown field `backup_model`"),
        ('{"providers":{"openai":{"credential_env":"OPENAI-API-KEY"}}}',
         "model-failover: invalid config: providers.openai.credential_env: invalid environment variable name"),
        ('{"backup_models":[]}',
         "model-failover: invalid config: backup_models: must list at least one model"),
    ]
    for bad, want in cases:
        code, log = envoy_refuses(workdir, _upstream_config_variant(bad))
        assert code != 0, log[-2000:]
        assert want in log, f"{want!r} not in Envoy log:\n{log[-3000:]}"


def test_the_opt_in_503_rewrite_still_gives_the_client_the_providers_429(gateway, workdir):
    """rate_limit_status_to: 503 (for Envoy without error_matcher, or outlier detection that
    only watches gateway errors): the router sees 503 (consecutive_gateway_failure ejects), and
    the downstream role gives the client the provider's 429 back."""
    cfg = variant(workdir, "examples/failover-local-to-local/envoy.yaml", [
        ("value: '{}'", "value: '{\"rate_limit_status_to\":503}'"),
        ("      consecutive_5xx: 1\n      enforcing_consecutive_5xx: 100\n",
         "      consecutive_gateway_failure: 1\n      enforcing_consecutive_gateway_failure: 100\n"),
        # Envoy before 1.36: no error_matcher (and with one, a 503 counts only if it matches).
        ('        outlier_detection:\n          error_matcher:\n            http_response_headers_match:\n'
         '              headers: [ { name: ":status", string_match: { safe_regex: { regex: "429|5[0-9][0-9]" } } } ]\n', ''),
    ])
    gw = gateway(cfg, mocks={18001: {"name": "qwen-1.8b", "rate_429": 100, "retry_after": "11"},
                             18002: {"name": "qwen-0.5b", "rate_429": 100, "retry_after": "12"}})
    r = gw.post("/failover", json_body=chat("hi"))
    assert r.status_code == 429, r.text
    # The last attempt's provider's own retry-after.
    assert r.headers.get("retry-after") == {"qwen-1.8b": "11", "qwen-0.5b": "12"}[r.headers["x-mock-provider"]]
    assert "x-sluice-original-status" not in r.headers
    stats = gw.envoy.stats()
    assert stats.get("cluster.qwen-failover.upstream_rq_503") == 1, "the router saw the mapped 503"
    assert not stats.get("cluster.qwen-failover.upstream_rq_429")
    wait_for(lambda: gw.envoy.stats().get(
        "cluster.qwen-failover.outlier_detection.ejections_enforced_consecutive_gateway_failure", 0) >= 1,
        10, "the mapped 503 ejected the host")
