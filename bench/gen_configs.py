#!/usr/bin/env python3
"""Writes bench/envoy-<config>.yaml from bench/envoy-bare.yaml plus each filter's block, so every
configuration shares the bare listener, route, cluster, access log and stats tags, and the
suite is exactly the single-filter blocks chained. Edit the filter settings here, then run
`.venv/bin/python bench/gen_configs.py` (needs PyJWT + cryptography from the venv).

The auth JWKS written here is the public half of a key generated and dropped on the spot: it
keeps the configs valid for `envoy --mode validate`; bench/bench.py replaces it at run time
with the JWKS of the key pair it makes with scripts/mint-jwt (no private key is committed)."""
from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WASM = "target/wasm32-wasip1/release"
NOOP_DIR = "target/bench-noop/wasm32-wasip1/release"


def placeholder_jwks() -> dict:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # never stored
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "bench", "alg": "RS256", "use": "sig"})
    return {"keys": [jwk]}


def j(v) -> str:
    return json.dumps(v, separators=(",", ":"))


AUTH = {"providers": [{"name": "bench", "issuer": "https://bench.sluice.invalid", "audiences": ["sluice"],
                       "jwks": None}],  # filled in by main()
        "claims_to_filter_state": ["org"],
        "policies": {"sluice-org": {"claim": "org", "equals": "sluice"}},
        "default_policy": "sluice-org"}
RATELIMIT = {"user_header": "x-user", "default_rule_set": "bench",
             "rule_sets": {"bench": [{"name": "tokens-per-user", "key": ["user"], "count": "total_tokens",
                                      "windows": [{"window": "minute", "limit": 1000000000000},
                                                  {"window": "day", "limit": 1000000000000}]}]}}
GUARD = {"default_policy": "bench", "policies": {"bench": {
    "request_rules": [
        {"builtin": "credit_card", "action": "mask"},
        {"builtin": "us_ssn", "action": "mask"},
        {"builtin": "email", "action": "mask"},
        {"builtin": "phone", "action": "mask"},
        {"builtin": "iban", "action": "mask"},
        {"builtin": "openai_api_key", "action": "reject"},
        {"builtin": "aws_access_key", "action": "reject"},
        {"builtin": "private_key", "action": "reject"},
        {"name": "prompt-injection", "regex": "ignore (all )?(previous|prior) instructions",
         "case_insensitive": True, "action": "reject"},
        {"name": "jailbreak", "phrases": ["jailbreak", "DAN mode", "developer mode enabled"],
         "case_insensitive": True, "action": "reject"}],
    "response_rules": [
        {"builtin": "email", "action": "mask"},
        {"builtin": "credit_card", "action": "mask"}]}}}
ENRICH = {"default_profile": "bench", "profiles": {"bench": {
    "prepend": [{"role": "system", "content": "You answer for {{header.x-user}}. Be accurate and brief."}],
    "defaults": {"temperature": 0.2},
    "caps": {"max_tokens": 4096}}}}
METRICS = {"inject_include_usage": True}
FAILOVER_DOWN = {"role": "downstream"}
FAILOVER_UP = {"providers": {"openai": {"credential_env": "OPENAI_API_KEY"}}}


def wasm_filter(fname: str, crate: str, cfg: dict, policy: str, body: bool = True,
                wasm_dir: str = WASM, name: str | None = None) -> str:
    hold = "\n                allow_on_headers_stop_iteration: true" if body else ""
    return f"""          - name: sluice.{fname}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name or crate}{hold}
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{j(cfg)}' }}
                failure_policy: {policy}
                vm_config:
                  vm_id: sluice-{crate.replace('_', '-')}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm_dir}/sluice_{crate}.wasm }} }}
"""


ROUTE_BARE = """                route: { cluster: provider, timeout: 60s }
"""
ROUTE_FAILOVER = """                route:
                  cluster: provider
                  timeout: 60s
                  retry_policy:
                    retry_on: "5xx,reset,connect-failure,retriable-status-codes"
                    retriable_status_codes: [429, 503]
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: { "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate }
                    host_selection_retry_max_attempts: 5
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
"""
CLUSTER_FAILOVER = f"""  clusters:
  - name: provider
    type: STATIC
    connect_timeout: 1s
    metadata: {{ filter_metadata: {{ sluice: {{ provider: openai }} }} }}
    load_assignment:
      cluster_name: provider
      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 18001 }} }} }}
          metadata: {{ filter_metadata: {{ sluice: {{ model: gpt-4o }} }} }}
      - priority: 1
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 18001 }} }} }}
          metadata: {{ filter_metadata: {{ sluice: {{ model: gpt-4o-mini }} }} }}
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
              configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{j(FAILOVER_UP)}' }}
              failure_policy: FAIL_RELOAD
              vm_config:
                vm_id: sluice-model-failover
                runtime: envoy.wasm.runtime.v8
                environment_variables: {{ host_env_keys: [OPENAI_API_KEY] }}
                code: {{ local: {{ filename: {WASM}/sluice_model_failover.wasm }} }}
        - name: envoy.filters.http.upstream_codec
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec }}
"""

DESC = {
    "auth": "auth alone: RS256 JWT verified against an inline JWKS (a placeholder here:\n"
            "# the bench swaps in the JWKS of the key pair scripts/mint-jwt makes for the run), one RBAC policy\n"
            "# on a claim. Every request carries the same token, so after the first one the verified-token\n"
            "# cache is hit.",
    "token-ratelimit": "token-ratelimit alone: local mode, total tokens per user (x-user header),\n"
                       "# minute and day windows with limits never reached (10^12).",
    "prompt-guard": "prompt-guard alone: 10 request rules (8 built-in detectors, 1 regex, 1 phrase list;\n"
                    "# mask or reject) and 2 response mask rules (email, card numbers); the bench prompt matches none.",
    "prompt-enrichment": "prompt-enrichment alone: prepends a templated system message, sets a default\n"
                         "# temperature, caps max_tokens.",
    "usage-metrics": "usage-metrics alone: token usage metrics from JSON and SSE responses (injects\n"
                     "# stream_options.include_usage and hides that chunk again).",
    "model-failover": "model-failover alone: downstream role + upstream role on a two-priority cluster\n"
                      "# (both endpoints are the same mock), retry policy as in examples/model-failover. Happy path: the\n"
                      "# first attempt succeeds; the upstream role rewrites the model and the credential per attempt.",
    "suite": "the full suite: auth, token-ratelimit, prompt-guard, prompt-enrichment, usage-metrics,\n"
             "# model-failover (downstream + upstream), each configured exactly as in its envoy-<filter>.yaml.",
    "noop-headers": "the floor for header filters: bench/noop-filter returning Continue from\n"
                    "# every callback (what Envoy + V8 charge for any proxy-wasm filter doing nothing).",
    "noop-body": "the floor for body filters: bench/noop-filter holding the request until its\n"
                 "# body is buffered, copying it into the VM, and copying every response chunk into the VM.",
}
ORDER = ["auth", "token-ratelimit", "prompt-guard", "prompt-enrichment", "usage-metrics", "model-failover"]


def main() -> None:
    AUTH["providers"][0]["jwks"] = placeholder_jwks()
    blocks = {
        "auth": wasm_filter("auth", "auth", AUTH, "FAIL_RELOAD"),
        "token-ratelimit": wasm_filter("token_ratelimit", "token_ratelimit", RATELIMIT, "FAIL_RELOAD"),
        "prompt-guard": wasm_filter("prompt_guard", "prompt_guard", GUARD, "FAIL_RELOAD"),
        "prompt-enrichment": wasm_filter("prompt_enrichment", "prompt_enrichment", ENRICH, "FAIL_OPEN"),
        "usage-metrics": wasm_filter("usage_metrics", "usage_metrics", METRICS, "FAIL_OPEN"),
        "model-failover": wasm_filter("model_failover.downstream", "model_failover", FAILOVER_DOWN, "FAIL_RELOAD",
                                      body=False, name="model_failover_downstream"),
        "noop-headers": wasm_filter("bench_noop", "bench_noop", {"read_bodies": False}, "FAIL_OPEN",
                                    body=False, wasm_dir=NOOP_DIR),
        "noop-body": wasm_filter("bench_noop", "bench_noop", {"read_bodies": True}, "FAIL_OPEN", wasm_dir=NOOP_DIR),
    }
    bare = (BENCH / "envoy-bare.yaml").read_text()
    cluster_bare = bare[bare.index("  clusters:\n"):]

    def make(name: str, filters: list[str]) -> None:
        text = bare[bare.index("admin:"):]
        head = (f"# Benchmark configuration `{name}` (scripts/bench.sh): {DESC[name]}\n"
                "# Same listener, route, access log and stats tags as bench/envoy-bare.yaml; only the sluice\n"
                "# filters differ. Ports follow the repo conventions; the bench renders them to free ports.\n"
                "# Generated by bench/gen_configs.py: edit that, not this file.\n")
        text = head + text.replace("          http_filters:\n",
                                   "          http_filters:\n" + "".join(blocks[f] for f in filters))
        if "model-failover" in filters:
            text = text.replace(ROUTE_BARE, ROUTE_FAILOVER)
            text = text.replace('              domains: ["*"]\n',
                                '              domains: ["*"]\n              include_request_attempt_count: true\n')
            text = text.replace(cluster_bare, CLUSTER_FAILOVER)
        (BENCH / f"envoy-{name}.yaml").write_text(text)

    for f in ORDER:
        make(f, [f])
    make("suite", ORDER)
    make("noop-headers", ["noop-headers"])
    make("noop-body", ["noop-body"])


if __name__ == "__main__":
    main()
