"""semantic_cache and rag as stages of the composed gateway (filters/gateway), after
prompt_guard: a cache hit is a local reply that passes back through the stages before it (the
guard masks the replay like any answer), a hit never reaches rag or the provider, and a miss
gets rag's passage. Real Envoy, the gateway .wasm, Chroma, the mock provider."""
from __future__ import annotations

import json
import subprocess

import pytest

from harness import ROOT, WASM_DIR, Gateway, wait_for

pytestmark = pytest.mark.skipif(not (WASM_DIR / "sluice_gateway.wasm").exists(),
                                reason="cargo build --release --target wasm32-wasip1 -p sluice-gateway")

ANSWER = "France makes between 1,000 and 1,600 cheeses; ask Paris for more."
STAGES = {"stages": [
    {"prompt_guard": {"default_policy": "default", "policies": {"default": {
        "response_rules": [{"name": "city", "regex": "Paris", "action": "mask"}]}}}},
    {"semantic_cache": {"embeddings": {"cluster": "embeddings", "model": "text-embedding-3-small"},
                        "store": {"cluster": "chroma"}, "scope": "global", "max_distance": 0.25}},
    {"rag": {"embeddings": {"cluster": "embeddings", "model": "text-embedding-3-small"},
             "store": {"cluster": "chroma"}, "max_distance": 0.6}},
    {"usage_metrics": {"known_models": ["gpt-4o-mini"]}},
]}


def config(workdir) -> str:
    cluster = lambda name, port: f"""
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]"""
    text = f"""admin:
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
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/stdout
              log_format:
                json_format:
                  cache: "%FILTER_STATE(wasm.sluice.cache:PLAIN)%"
                  rag: "%FILTER_STATE(wasm.sluice.rag:PLAIN)%"
                  guard: "%FILTER_STATE(wasm.sluice.guard:PLAIN)%"
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - name: chat
                match: {{ path: "/v1/chat/completions" }}
                metadata: {{ filter_metadata: {{ sluice: {{ provider: openai, rag: {{ collection: french-cheeses }} }} }} }}
                route: {{ cluster: openai, timeout: 60s }}
          http_filters:
          - name: sluice.gateway
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: sluice-gateway
                root_id: sluice-gateway
                allow_on_headers_stop_iteration: true
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: sluice
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: target/wasm32-wasip1/release/sluice_gateway.wasm }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{json.dumps(STAGES)}'
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:{cluster("openai", 18001)}{cluster("embeddings", 18002)}{cluster("chroma", 18003)}
"""
    path = workdir / "composed.yaml"
    path.write_text(text)
    return str(path)


def test_cache_and_rag_stages_in_the_composed_gateway(workdir, chroma):
    db = chroma()
    gw = Gateway(workdir, config(workdir), mocks={18001: {"name": "openai", "model": "gpt-4o-mini", "response_text": ANSWER},
                                                  18002: {"name": "embeddings"}}, ports={18003: db.port})
    try:
        subprocess.run([str(ROOT / "scripts" / "rag-load"), "--chroma", db.base, "--collection", "french-cheeses",
                        "--embeddings", f"{gw.mocks[18002].base}/v1/embeddings", "--model", "text-embedding-3-small",
                        str(ROOT / "examples" / "rag" / "corpus")], check=True, capture_output=True, timeout=120)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "How many varieties of cheese are there in France?"}]}
        miss = gw.post(json_body=body)
        assert miss.status_code == 200 and miss.headers["x-sluice-cache"] == "miss", miss.text
        text = miss.json()["choices"][0]["message"]["content"]
        assert "Paris" not in text and "1,600" in text, text
        sent = [e for e in gw.mocks[18001].log() if e["path"].endswith("/chat/completions")]
        assert len(sent) == 1 and sent[0]["body"]["messages"][0]["role"] == "system"
        assert "between 1,000 and 1,600 varieties" in sent[0]["body"]["messages"][0]["content"], "rag ran on the miss"
        wait_for(lambda: db.count("sluice-cache") == 1, 15, "the semantic entry")
        hit = gw.post(json_body=body)
        assert hit.status_code == 200 and hit.headers["x-sluice-cache"] == "hit-exact", hit.text
        replay = hit.json()["choices"][0]["message"]["content"]
        assert "Paris" not in replay and "1,600" in replay, f"the guard masks the replay too: {replay}"
        stream = gw.post(json_body={**body, "messages": [{"role": "user", "content": "How many cheeses does France make, in varieties?"}],
                                    "stream": True})
        assert stream.headers["x-sluice-cache"].startswith("hit-semantic"), stream.headers
        assert "Paris" not in stream.text and "1,600" in stream.text, stream.text
        assert len([e for e in gw.mocks[18001].log() if e["path"].endswith("/chat/completions")]) == 1, "hits: no provider call"
        log = gw.envoy.wait_access_log(lambda e: len(e) >= 3)
        assert log[0]["rag"] == "added:1" and log[1]["rag"] in (None, "-"), "a hit never reaches rag"
        assert [e["cache"] for e in log[:2]] == ["miss", "hit_exact"]
    finally:
        gw.stop()
