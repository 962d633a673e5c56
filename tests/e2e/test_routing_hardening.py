"""model-failover hardening, end to end against real Envoy:
- every client credential header is removed before an attempt reaches a provider that takes
  the gateway's key, per provider profile (issue 13 §5);
- a client's x-envoy-attempt-count never chooses a backup model (issue 13 §6);
- the per-attempt backup-model rewrite on /v1/responses and /v1/messages (issue 19 §1);
- a large multi-chunk body through the upstream role arrives byte-exact after the rewrite
  (Envoy 1.40's fix for filters that resume and then buffer, issue 16 §6);
- every metric the upstream role emits carries the provider and model labels in Prometheus
  (Envoy 1.39+ emits upstream filters' stats in the root scope, without the cluster; §6).
Assertions read what the mock providers received (their request log)."""
from __future__ import annotations

import json
import re
import uuid

from h2client import h2_request
from harness import ROOT, chat
from test_routing_helpers import access_log_entries, models_seen, variant

ENV = {"GW_KEY": "sk-gateway-key", "OPENAI_API_KEY": "sk-test-failover"}

CLIENT_CREDENTIALS = {
    "authorization": "Bearer client-jwt-for-the-gateway",
    "proxy-authorization": "Basic Y2xpZW50OnByb3h5",
    "cookie": "gateway_session=client",
    "x-api-key": "client-anthropic-key",
    "api-key": "client-azure-key",
    "x-goog-api-key": "client-google-key",
    "x-amz-security-token": "client-aws-token",
}

# One route and one cluster per provider profile; all share one upstream-role config.
PROFILES = {
    "openai": {"credential_env": "GW_KEY"},
    "azure": {"credential_env": "GW_KEY", "credential_header": "api-key", "credential_prefix": ""},
    "anthropic": {"credential_env": "GW_KEY", "credential_header": "x-api-key"},
    "local": {"auth": "passthrough"},
}
PORTS = {"openai": 18001, "azure": 18002, "anthropic": 18003, "local": 18004}


def credentials_config() -> str:
    upstream_cfg = json.dumps({"providers": PROFILES})
    routes = "".join(f"""
              - match: {{ prefix: "/{name}/" }}
                route: {{ cluster: {name}, prefix_rewrite: /v1/, timeout: 30s }}""" for name in PROFILES)
    clusters = "".join(f"""
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
          metadata: {{ filter_metadata: {{ sluice: {{ provider: {name}, model: {name}-model }} }} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http_protocol_options: {{}} }}
        http_filters:
        - name: sluice.model_failover
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
            config:
              name: model_failover
              allow_on_headers_stop_iteration: true
              configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{upstream_cfg}' }}
              failure_policy: FAIL_RELOAD
              vm_config:
                vm_id: sluice-model-failover
                runtime: envoy.wasm.runtime.v8
                environment_variables: {{ host_env_keys: [GW_KEY] }}
                code: {{ local: {{ filename: target/wasm32-wasip1/release/sluice_model_failover.wasm }} }}
        - name: envoy.filters.http.upstream_codec
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec }}"""
                       for name, port in PORTS.items())
    return f"""
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 9901 }} }}
static_resources:
  listeners:
  - name: gateway
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 10000 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              include_request_attempt_count: true
              routes:{routes}
          http_filters:
          - name: sluice.model_failover.downstream
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: model_failover_downstream
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{{"role":"downstream"}}' }}
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: sluice-model-failover
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: target/wasm32-wasip1/release/sluice_model_failover.wasm }} }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:{clusters}
"""


def test_client_credentials_never_reach_a_provider_per_profile(gateway, workdir):
    cfg = workdir / "credentials.yaml"
    cfg.write_text(credentials_config())
    gw = gateway(cfg, mocks={port: {"name": name} for name, port in PORTS.items()}, env=ENV)
    received = {}
    for name, port in PORTS.items():
        r = gw.post(f"/{name}/chat/completions", json_body=chat("hi", model="client-model"),
                    headers={**CLIENT_CREDENTIALS, "x-harmless": "kept"})
        assert r.status_code == 200, (name, r.text)
        (entry,) = gw.mocks[port].log()
        received[name] = entry["headers"]
        assert entry["model"] == f"{name}-model"
        assert entry["headers"].get("x-harmless") == "kept", "only credentials are removed"
    print("headers the providers received:", json.dumps(received, indent=1))

    def client_left(headers: dict) -> list[str]:
        return [k for k, v in CLIENT_CREDENTIALS.items() if headers.get(k) == v]

    # openai-style bearer: the gateway's key, nothing of the client's.
    assert received["openai"].get("authorization") == "Bearer sk-gateway-key"
    assert client_left(received["openai"]) == []
    # azure-style api-key.
    assert received["azure"].get("api-key") == "sk-gateway-key"
    assert "authorization" not in received["azure"]
    assert client_left(received["azure"]) == []
    # anthropic-style x-api-key.
    assert received["anthropic"].get("x-api-key") == "sk-gateway-key"
    assert "authorization" not in received["anthropic"]
    assert client_left(received["anthropic"]) == []
    # passthrough: the client's own credential for that provider (authorization), nothing else.
    assert client_left(received["local"]) == ["authorization"]
    for h in CLIENT_CREDENTIALS:
        if h != "authorization":
            assert h not in received["local"], h


def test_a_client_attempt_count_never_picks_a_backup_model(gateway, workdir):
    """Without include_request_attempt_count the x-envoy-attempt-count header is the client's;
    the downstream role removes it, so the first attempt carries the requested model."""
    cfg = variant(workdir, "examples/backup-models/envoy.yaml",
                  [("              include_request_attempt_count: true\n", "")])
    gw = gateway(cfg, mocks={18001: {"name": "openai"}}, env=ENV)
    mock = gw.mocks[18001]
    r = gw.post("/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers={"x-envoy-attempt-count": "2"})
    assert r.status_code == 200, r.text
    (entry,) = mock.log()
    assert entry["model"] == "gpt-4o", "the client chose a backup model"
    assert "x-envoy-attempt-count" not in entry["headers"]


def test_the_attempt_count_envoy_sets_is_used_and_the_downstream_role_is_required(gateway, workdir):
    # With include_request_attempt_count Envoy's own count wins over the client's.
    gw = gateway("examples/backup-models/envoy.yaml", mocks={18001: {"name": "openai"}}, env=ENV)
    r = gw.post("/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers={"x-envoy-attempt-count": "3"})
    assert r.status_code == 200, r.text
    assert models_seen(gw.mocks[18001]) == ["gpt-4o"]
    assert gw.mocks[18001].log()[0]["attempt"] == 1
    gw.stop()

    # backup_models without the downstream role: the attempt is refused, naming the field.
    text = (ROOT / "examples/backup-models/envoy.yaml").read_text()
    start = text.index("          - name: sluice.model_failover.downstream")
    end = text.index("          - name: envoy.filters.http.router")
    cfg = workdir / "no-downstream.yaml"
    cfg.write_text(text[:start] + text[end:])
    gw = gateway(cfg, mocks={18001: {"name": "openai"}}, env=ENV)
    r = gw.post("/v1/chat/completions", json_body=chat("hi", model="gpt-4o"), headers={"x-envoy-attempt-count": "2"})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "gateway_misconfigured" and "backup_models" in err["message"]
    assert gw.mocks[18001].log() == [], "nothing reached the provider"


def test_backup_models_on_responses_and_messages(gateway, workdir):
    cfg = variant(workdir, "examples/backup-models/envoy.yaml",
                  [('- match: { prefix: "/v1/chat/completions" }', '- match: { prefix: "/v1/" }')])
    gw = gateway(cfg, mocks={18001: {"name": "openai", "retry_after": "9"}}, env=ENV)
    mock = gw.mocks[18001]
    cases = [
        ("/v1/responses", {"model": "gpt-4o", "input": "Compose a poem."}, {}),
        ("/v1/messages", {"model": "gpt-4o", "max_tokens": 32, "messages": [{"role": "user", "content": "Compose a poem."}]},
         {"anthropic-version": "2023-06-01"}),
    ]
    for path, body, headers in cases:
        mock.clear_log()
        # Every attempt is answered 429: the mock sees the requested model, then each backup.
        r = gw.post(path, json_body=body, headers={**headers, "x-mock-fail": "429"})
        assert r.status_code == 429, (path, r.text)
        assert r.headers.get("retry-after") == "9"
        log = mock.log()
        assert [e["model"] for e in log] == ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo"], path
        assert {e["endpoint"] for e in log} == {path.rsplit("/", 1)[-1]}
        for e in log:
            rest = {k: v for k, v in e["body"].items() if k != "model"}
            assert rest == {k: v for k, v in body.items() if k != "model"}, "only the model changes"
        # A healthy answer on the first attempt: the requested model, answered in the format.
        mock.clear_log()
        r = gw.post(path, json_body=body, headers=headers)
        assert r.status_code == 200, (path, r.text)
        assert [e["model"] for e in mock.log()] == ["gpt-4o"]
    entry = access_log_entries(gw.envoy, 1)[-1]
    assert entry["gen_ai.provider.name"] == "openai"


def _large_body() -> tuple[dict, bytes]:
    """A several-hundred-KB chat request with non-ASCII text and escapes, and the exact bytes
    the provider must receive once its model is rewritten (compact JSON, key order kept)."""
    paragraph = "Seattle, Chicago \"quoted\"\tand\nnew lines; é, 日本, ü — " * 40
    client = {
        "model": "client-model",
        "messages": [{"role": "user", "content": f"{i}: {paragraph}"} for i in range(250)],
        "temperature": 0.5,
        "metadata": {"run": uuid.uuid4().hex},
    }
    want = dict(client, model="gpt-4o")
    return client, json.dumps(want, separators=(",", ":"), ensure_ascii=False).encode()


def test_large_multi_chunk_body_through_the_upstream_role_is_byte_exact(gateway):
    gw = gateway("examples/model-failover/envoy.yaml", mocks={18001: {"name": "openai"}}, env=ENV)
    mock = gw.mocks[18001]
    client, want = _large_body()
    data = json.dumps(client, ensure_ascii=False).encode()
    assert 400_000 < len(data) < 1_000_000, len(data)

    def check(how: str):
        (e,) = mock.log()
        assert e["model"] == "gpt-4o", how
        assert e["body_size"] == len(want), (how, e["body_size"], len(want))
        assert e["body"] == json.loads(want), how
        mock.clear_log()

    # HTTP/1.1 with content-length (Envoy reads it in many chunks).
    r = gw.post("/model", data=data, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    check("content-length")
    # HTTP/1.1 chunked, 16 KiB pieces.
    r = gw.post("/model", data=iter([data[i:i + 16384] for i in range(0, len(data), 16384)]),
                headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    check("chunked")
    # HTTP/2, many DATA frames, ending with trailers.
    r = h2_request(gw.envoy.listener_port, "POST", "/model", {"content-type": "application/json"},
                   [data[i:i + 10000] for i in range(0, len(data), 10000)], trailers={"x-end": "1"})
    assert r.status == 200, r.text
    check("h2 + trailers")


# Every metric the upstream role emits (sluice_failover_cooldown_recorded and
# sluice_failover_context_overflow carry the same labels; their own tests check them:
# test_routing_cooldown.py, test_routing_context.py).
UPSTREAM_METRICS = {
    "sluice_failover_attempts", "sluice_failover_rate_limited", "sluice_failover_retry_after_ms",
    "sluice_failover_body_passthrough", "sluice_failover_body_too_large", "sluice_failover_credential_missing",
    "sluice_failover_misconfigured",
}


def metrics_config() -> str:
    """Two clusters with only the upstream role (no downstream filter at all): `openai`
    (a key that is not in the environment, 2000-byte body cap) and
    `backup` (backup_models, refused without the downstream role)."""
    text = credentials_config()
    start = text.index("          http_filters:\n          - name: sluice.model_failover.downstream")
    end = text.index("          - name: envoy.filters.http.router")
    text = text[:start] + "          http_filters:\n" + text[end:]
    tags = (ROOT / "envoy" / "stats-tags.yaml").read_text().split("stats_flush_interval: 1s\n", 1)[1]
    text = text.replace("static_resources:", "stats_flush_interval: 1s\n" + tags + "static_resources:", 1)
    cfgs = {"openai": {"max_body_bytes": 2000, "providers": {"openai": {"credential_env": "NOT_SET_ANYWHERE"}}},
            "azure": {"backup_models": ["gpt-4.1"]}}
    default = json.dumps({"providers": PROFILES})
    parts = text.split(f"value: '{default}'")
    assert len(parts) == 1 + len(PROFILES)
    out = parts[0]
    for name, rest in zip(PORTS, parts[1:]):
        out += f"value: '{json.dumps(cfgs.get(name, {}))}'" + rest
    return out


def test_every_upstream_metric_carries_provider_and_model_labels(gateway, workdir):
    cfg = workdir / "metrics.yaml"
    cfg.write_text(metrics_config())
    gw = gateway(cfg, mocks={port: {"name": name} for name, port in PORTS.items()}, env=ENV)
    statuses = [
        gw.post("/openai/chat/completions", json_body=chat("hi", model="m")).status_code,               # 200
        gw.post("/openai/chat/completions", json_body=chat("hi"), headers={"x-mock-fail": "429"}).status_code,  # 429
        gw.post("/openai/chat/completions", data=b"not json", headers={"content-type": "text/plain"}).status_code,
        gw.post("/openai/chat/completions", json_body=chat("x" * 5000)).status_code,                    # 413
        gw.post("/azure/chat/completions", json_body=chat("hi")).status_code,   # 500: backup_models, no downstream role
    ]
    print("statuses", statuses)
    prom = gw.envoy.prometheus()
    lines = [l for l in prom.splitlines() if l.startswith("sluice_failover_")]
    print("\n".join(lines))
    seen = set()
    for line in lines:
        m = re.match(r"(sluice_failover_[a-z_]+?)(_bucket|_sum|_count)?\{(.*)\} ", line)
        assert m, f"no labels: {line}"
        base, labels = m.group(1), m.group(3)
        if base not in UPSTREAM_METRICS:
            continue
        seen.add(base)
        assert re.search(r'gen_ai_provider_name="[^"]+"', labels), line
        assert re.search(r'gen_ai_request_model="[^"]+"', labels), line
        assert "envoy_cluster_name" not in labels, line
    assert seen == UPSTREAM_METRICS, f"not emitted: {sorted(UPSTREAM_METRICS - seen)}"
    assert statuses == [200, 429, 400, 413, 500], statuses
    assert 'sluice_failover_rate_limited{gen_ai_provider_name="openai",gen_ai_request_model="openai-model"} 1' in prom
    assert not [l for l in prom.splitlines() if "sluice_failover" in l and l.startswith("envoy_")], \
        "an upstream filter metric kept a cluster-scoped name"
