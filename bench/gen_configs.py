#!/usr/bin/env python3
"""Writes bench/envoy-<config>.yaml from bench/envoy-bare.yaml plus each filter's block, so every
configuration shares the bare listener, route, cluster, access log and stats tags, and the
suite is exactly the single-filter blocks chained. The same stage settings make `suite-one-vm`
(the six filters from sluice_gateway.wasm, one stage each, one VM) and `composed` (one filter
running every stage). Also writes the peer gateways' configurations (bench/peers/litellm*.yaml,
bench/peers/portkey*.json), the closest each peer offers to the same settings.
Edit the settings here, then run `.venv/bin/python bench/gen_configs.py` (needs PyJWT +
cryptography from the venv).

The auth JWKS written here is the public half of a key generated and dropped on the spot (once:
later runs keep the one already in bench/envoy-auth.yaml, so only what was edited changes): it
keeps the configs valid for `envoy --mode validate`; bench/bench.py replaces it at run time
with the JWKS of the key pair it makes with scripts/mint-jwt (no private key is committed)."""
from __future__ import annotations

import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WASM = "target/wasm32-wasip1/release"
NOOP_DIR = "target/bench-noop/wasm32-wasip1/release"


def placeholder_jwks() -> dict:
    """The placeholder JWKS of the committed configs (so regenerating them changes only what was
    edited), or a fresh one when there is none yet."""
    try:
        m = re.search(r'"jwks":(\{"keys":\[\{[^{}]*\}\]\})', (BENCH / "envoy-auth.yaml").read_text())
        if m:
            return json.loads(m.group(1))
    except (OSError, ValueError):
        pass
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
    "prepend": [{"role": "system", "content": "You answer for {{user}}. Be accurate and brief."}],
    "defaults": {"temperature": 0.2},
    "caps": {"max_tokens": 4096}}}}
METRICS = {"inject_include_usage": True}
FAILOVER_DOWN = {"role": "downstream"}
FAILOVER_UP = {"providers": {"openai": {"credential_env": "OPENAI_API_KEY"}}}
# semantic-cache and rag (issue 17): the embeddings endpoint is the mock provider's deterministic
# /v1/embeddings (cluster `embeddings`, 18002: served by the run's one mock, like the provider), the
# store a Chroma the bench starts (cluster `chroma`, 18003: rendered to its port). The cache's
# scope is global (no auth in the chain: the default `user` scope would skip every request);
# max_distance 0.25 suits the mock's hashed-word embeddings, as in examples/semantic-cache.
EMBEDDINGS = {"cluster": "embeddings", "model": "text-embedding-3-small", "credential_env": "OPENAI_API_KEY",
              "timeout": "1s"}
SEMCACHE = {"embeddings": EMBEDDINGS,
            "store": {"type": "chroma", "cluster": "chroma", "collection": "bench-cache", "timeout": "500ms"},
            "scope": "global", "ttl": "1h", "max_distance": 0.25, "failure_mode": "allow"}
RAG = {"embeddings": EMBEDDINGS, "store": {"type": "chroma", "cluster": "chroma", "timeout": "500ms"},
       "top_k": 3, "max_distance": 0.6, "max_added_tokens": 512, "failure_mode": "allow"}
# the rag route's metadata: the collection bench/bench.py loads from examples/rag/corpus
RAG_ROUTE = {"collection": "bench-rag", "top_k": 3, "max_distance": 0.6, "max_added_tokens": 512}


def wasm_filter(fname: str, crate: str, cfg: dict, policy: str, body: bool = True,
                wasm_dir: str = WASM, name: str | None = None, env_keys: bool = False) -> str:
    hold = "\n                allow_on_headers_stop_iteration: true" if body else ""
    # the embeddings endpoint's key (credential_env), as model-failover's provider key
    env = "\n                  environment_variables: { host_env_keys: [OPENAI_API_KEY] }" if env_keys else ""
    return f"""          - name: sluice.{fname}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name or crate}{hold}
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{j(cfg)}' }}
                failure_policy: {policy}
                vm_config:
                  vm_id: sluice-{crate.replace('_', '-')}
                  runtime: envoy.wasm.runtime.v8{env}
                  code: {{ local: {{ filename: {wasm_dir}/sluice_{crate}.wasm }} }}
"""


GATEWAY_WASM = f"{WASM}/sluice_gateway.wasm"
STAGE_OF = {"auth": "auth", "token-ratelimit": "token_ratelimit", "prompt-guard": "prompt_guard",
            "prompt-enrichment": "prompt_enrichment", "usage-metrics": "usage_metrics",
            "model-failover": "model_failover"}
# The composed filter's stage order: the one filters/gateway/README.md recommends (enrichment
# before the guard, the rate limit after both). `suite` and `suite-one-vm` keep ORDER below.
COMPOSED_ORDER = ["auth", "prompt-enrichment", "prompt-guard", "token-ratelimit", "usage-metrics", "model-failover"]


def gateway_filter(fname: str, root_id: str, stages: list[tuple[str, dict]], policy: str, body: bool = True) -> str:
    """One Envoy filter from sluice_gateway.wasm running `stages`. Every plugin of the gateway
    module has the same vm_config (vm_id `sluice`, the provider key's host_env_keys), so Envoy gives
    them one VM per worker; root_id tells the plugins apart."""
    hold = "\n                allow_on_headers_stop_iteration: true" if body else ""
    cfg = {"stages": [{STAGE_OF[s]: c} for s, c in stages]}
    return f"""          - name: sluice.{fname}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {root_id}
                root_id: {root_id}{hold}
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{j(cfg)}' }}
                failure_policy: {policy}
                vm_config:
                  vm_id: sluice
                  runtime: envoy.wasm.runtime.v8
                  environment_variables: {{ host_env_keys: [OPENAI_API_KEY] }}
                  code: {{ local: {{ filename: {GATEWAY_WASM} }} }}
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
UPSTREAM_SEPARATE = f"""        - name: sluice.model_failover
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
"""
# The upstream role from the gateway module, in the same VM as the downstream plugins (the same
# vm_config), as envoy/envoy.yaml runs it.
UPSTREAM_GATEWAY = f"""        - name: sluice.upstream
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
            config:
              name: sluice-upstream
              root_id: sluice-upstream
              allow_on_headers_stop_iteration: true
              configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{j({"stages": [{"model_failover": FAILOVER_UP}]})}' }}
              failure_policy: FAIL_RELOAD
              vm_config:
                vm_id: sluice
                runtime: envoy.wasm.runtime.v8
                environment_variables: {{ host_env_keys: [OPENAI_API_KEY] }}
                code: {{ local: {{ filename: {GATEWAY_WASM} }} }}
"""


# The route of the semantic-cache and rag configurations: named (the route name is part of the
# cache scope), and for rag the route metadata that turns retrieval on.
ROUTE_MATCH_BARE = """              - match: { prefix: "/" }
"""


def route_named(name: str, sluice: dict | None = None) -> str:
    meta = f"\n                metadata: {{ filter_metadata: {{ sluice: {j(sluice)} }} }}" if sluice else ""
    return f"""              - name: {name}
                match: {{ prefix: "/" }}{meta}
"""


# The embeddings endpoint and the vector store, appended to bare's clusters.
CLUSTERS_LOOKUP = """  # Any OpenAI-compatible /v1/embeddings: here the mock provider's (the bench's one mock serves it).
  - name: embeddings
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: embeddings
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 18002 } } } } ] } ]
  # Chroma (`chroma run --host 127.0.0.1`, started and stopped by the bench).
  - name: chroma
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: chroma
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 18003 } } } } ] } ]
"""


def cluster_failover(upstream: str) -> str:
    return f"""  clusters:
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
{upstream}        - name: envoy.filters.http.upstream_codec
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
    "prompt-enrichment": "prompt-enrichment alone: prepends a templated system message ({{user}}: the\n"
                         "# identity auth writes, empty here without auth), sets a default temperature, caps max_tokens.",
    "usage-metrics": "usage-metrics alone: token usage metrics from JSON and SSE responses (injects\n"
                     "# stream_options.include_usage and hides that chunk again).",
    "model-failover": "model-failover alone: downstream role + upstream role on a two-priority cluster\n"
                      "# (both endpoints are the same mock), retry policy as in examples/model-failover. Happy path: the\n"
                      "# first attempt succeeds; the upstream role rewrites the model and the credential per attempt.",
    "suite": "the full suite: auth, token-ratelimit, prompt-guard, prompt-enrichment, usage-metrics,\n"
             "# model-failover (downstream + upstream), each configured exactly as in its envoy-<filter>.yaml.",
    "suite-one-vm": "the full suite as six separate filters in one VM: the same six filters, stages and\n"
                    "# order as `suite`, each an Envoy filter of its own (its own callbacks, filter state between them), all\n"
                    "# from sluice_gateway.wasm with one stage each, distinct root_id, one vm_id (one VM per worker).",
    "composed": "the composed suite: one filter from sluice_gateway.wasm running every stage (auth,\n"
                "# prompt-enrichment, prompt-guard, token-ratelimit, usage-metrics, model-failover downstream) in one pass,\n"
                "# plus the model-failover upstream role from the same module and VM; stage settings as in `suite`.",
    "semantic-cache": "semantic-cache alone (rows semantic-cache-miss, -hit,\n"
                      "# -hit-semantic): exact tier in shared data, semantic tier through the mock's /v1/embeddings and\n"
                      "# a Chroma the bench starts, global scope (no auth in the chain), 1 h TTL, max_distance 0.25.",
    "rag": "rag alone: on the named route (metadata sluice.rag: collection\n"
           "# bench-rag, which the bench loads from examples/rag/corpus), embed the last user message through the\n"
           "# mock's /v1/embeddings, retrieve the 3 nearest passages within distance 0.6 from Chroma, add them as\n"
           "# a system message.",
    "noop-headers": "the floor for header filters: bench/noop-filter returning Continue from\n"
                    "# every callback (what Envoy + V8 charge for any proxy-wasm filter doing nothing).",
    "noop-body": "the floor for body filters: bench/noop-filter holding the request until its\n"
                 "# body is buffered, copying it into the VM, and copying every response chunk into the VM.",
}
ORDER = ["auth", "token-ratelimit", "prompt-guard", "prompt-enrichment", "usage-metrics", "model-failover"]


# ---------------------------------------------------------------------------------------------
# Peer gateways (bench/peers/): the same mock provider (127.0.0.1:18001, rendered to the run's
# mock port by bench/bench.py), plain proxying and the closest each offers to the settings above.
PEERS = BENCH / "peers"
MOCK_V1 = "http://127.0.0.1:18001/v1"
LITELLM_KEY = "sk-litellm-bench"  # the features row's master key (what its clients send)
PROVIDER_KEY = "sk-bench"  # what the peer sends the provider, as model-failover sends OPENAI_API_KEY
LIMIT = RATELIMIT["rule_sets"]["bench"][0]["windows"][0]["limit"]

LITELLM_HEAD = """# LiteLLM proxy, benchmark row `{name}` (bench/bench.py starts it: `litellm --config <this, ports
# rendered> --host 127.0.0.1 --port N --num_workers 2 --timeout_worker_healthcheck 300`, env
# LITELLM_LOCAL_MODEL_COST_MAP=True, LITELLM_TELEMETRY_DISABLED=true, LITELLM_LOG=ERROR, no
# DATABASE_URL, no Redis). {what}
# Generated by bench/gen_configs.py: edit that, not this file.
"""


def litellm_configs() -> dict[str, tuple[str, dict]]:
    def deployment(model: str, extra: dict | None = None, **info) -> dict:
        d = {"model_name": "gpt-4o",
             "litellm_params": {"model": f"openai/{model}", "api_base": MOCK_V1, "api_key": PROVIDER_KEY, **(extra or {})}}
        if info:
            d["model_info"] = info
        return d

    plain = {
        "model_list": [deployment("gpt-4o")],
        "litellm_settings": {"telemetry": False},
        # No master key: plain proxying with no client auth, like bare Envoy. LiteLLM refuses to
        # start without one unless told this is deliberate.
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    prebuilt = {"credit_card": "credit_card", "us_ssn": "us_ssn", "email": "email", "phone": "us_phone",
                "iban": "iban", "aws_access_key": "aws_access_key"}
    custom = {"openai_api_key": r"sk-[A-Za-z0-9_-]{20,}", "private_key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----"}

    def patterns(rules: list[dict]) -> tuple[list[dict], list[dict]]:
        pats, words = [], []
        for r in rules:
            action = {"mask": "MASK", "reject": "BLOCK"}[r["action"]]
            if "builtin" in r and r["builtin"] in prebuilt:
                pats.append({"pattern_type": "prebuilt", "pattern_name": prebuilt[r["builtin"]], "action": action})
            elif "builtin" in r:
                pats.append({"pattern_type": "regex", "name": r["builtin"], "pattern": custom[r["builtin"]],
                             "action": action})
            elif "regex" in r:
                pats.append({"pattern_type": "regex", "name": r["name"],
                             "pattern": ("(?i)" if r.get("case_insensitive") else "") + r["regex"], "action": action})
            else:  # phrases: LiteLLM's blocked words match case-insensitively
                words += [{"keyword": w, "action": action} for w in r["phrases"]]
        return pats, words

    policy = GUARD["policies"]["bench"]
    req_pats, req_words = patterns(policy["request_rules"])
    resp_pats, _ = patterns(policy["response_rules"])
    limits = {"tpm": LIMIT, "rpm": LIMIT}
    features = {
        # model-failover: two deployments of the model group in priority order (`order`), retries
        # moving to the next; token-ratelimit: tpm/rpm per deployment, counted in memory by the
        # usage-based router (per key or per user would need LiteLLM's database); enrichment: a
        # default temperature on the deployment.
        "model_list": [deployment("gpt-4o", {**limits, "order": 1, "temperature": ENRICH["profiles"]["bench"]["defaults"]["temperature"]}, id="primary"),
                       deployment("gpt-4o-mini", {**limits, "order": 2, "temperature": ENRICH["profiles"]["bench"]["defaults"]["temperature"]}, id="secondary")],
        "router_settings": {"routing_strategy": "usage-based-routing-v2", "num_retries": 2,
                            "retry_after": 0, "allowed_fails": 1},
        # usage-metrics: the Prometheus callback (token and request counters per model and key)
        "litellm_settings": {"telemetry": False, "callbacks": ["prometheus"]},
        # prompt-guard: LiteLLM's own content filter, in process (no external service); one guardrail
        # on requests, one on responses, as the bench's guard policy
        "guardrails": [
            {"guardrail_name": "guard-request",
             "litellm_params": {"guardrail": "litellm_content_filter", "mode": "pre_call", "default_on": True,
                                "patterns": req_pats, "blocked_words": req_words}},
            {"guardrail_name": "guard-response",
             "litellm_params": {"guardrail": "litellm_content_filter", "mode": "post_call", "default_on": True,
                                "patterns": resp_pats}},
        ],
        # auth: the master key (JWT auth is a LiteLLM Enterprise feature; virtual keys need its database)
        "general_settings": {"master_key": LITELLM_KEY},
    }
    return {
        "litellm": ("plain proxying: one deployment of gpt-4o at the mock\n# provider, no master key (no client auth), no guardrails, no callbacks.", plain),
        "litellm-features": ("the closest LiteLLM offers to the sluice suite without a database:\n"
                             "# master-key auth, its in-process content filter with the bench guard policy's rules, tpm/rpm limits\n"
                             "# (never reached) on two deployments in priority order with retries, a default temperature, and\n"
                             "# the Prometheus callback.", features),
    }


def portkey_configs() -> dict[str, dict]:
    """The x-portkey-config header each Portkey row sends (the OSS gateway keeps no configs of its
    own: a saved config id needs Portkey's hosted control plane)."""
    target = {"provider": "openai", "api_key": PROVIDER_KEY, "custom_host": MOCK_V1}
    plain = dict(target)

    def no_match(rule: str) -> dict:  # a guardrail check that passes when `rule` does not match
        return {"id": "default.regexMatch", "parameters": {"rule": rule, "not": True}}

    def mask(rule: str) -> dict:
        return {"id": "default.regexReplace", "parameters": {"rule": f"/{rule}/g", "redactText": "[REDACTED]"}}

    def ci(s: str) -> str:  # Portkey's regexMatch takes no flags: spell case-insensitivity out
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in s)

    detect = {"credit_card": r"\b(?:\d[ -]?){13,19}\b", "us_ssn": r"\b\d{3}-\d{2}-\d{4}\b",
              "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
              "phone": r"\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}",
              "iban": r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b",
              "openai_api_key": r"sk-[A-Za-z0-9_-]{20,}", "aws_access_key": r"AKIA[0-9A-Z]{16}",
              "private_key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----"}
    policy = GUARD["policies"]["bench"]
    reject, masks, words = [], [], []
    for r in policy["request_rules"]:
        if "builtin" in r:
            (masks if r["action"] == "mask" else reject).append(
                mask(detect[r["builtin"]]) if r["action"] == "mask" else no_match(detect[r["builtin"]]))
        elif "regex" in r:
            reject.append(no_match(ci(r["regex"]) if r.get("case_insensitive") else r["regex"]))
        else:
            words += r["phrases"]
    reject.append({"id": "default.contains", "parameters": {"operator": "none", "words": words}})
    temp = ENRICH["profiles"]["bench"]["defaults"]["temperature"]
    features = {
        # model-failover: a fallback strategy over two targets (both the mock), on 429/503
        "strategy": {"mode": "fallback", "on_status_codes": [429, 503]},
        "targets": [{**target, "override_params": {"temperature": temp}},
                    {**target, "override_params": {"model": "gpt-4o-mini", "temperature": temp}}],
        # prompt-guard: the OSS gateway's built-in (local) checks; reject rules deny the request (HTTP 446)
        "before_request_hooks": [
            {"type": "guardrail", "id": "guard-reject", "deny": True, "checks": reject},
            {"type": "mutator", "id": "guard-mask", "checks": masks},
        ],
        "after_request_hooks": [
            {"type": "mutator", "id": "guard-mask-response",
             "checks": [mask(detect[r["builtin"]]) for r in policy["response_rules"]]},
        ],
    }
    return {"portkey": plain, "portkey-features": features}


def write_peer_configs() -> None:
    import yaml

    for name, (what, cfg) in litellm_configs().items():
        (PEERS / f"{name}.yaml").write_text(LITELLM_HEAD.format(name=name, what=what)
                                            + yaml.safe_dump(cfg, sort_keys=False, width=120))
    for name, cfg in portkey_configs().items():
        (PEERS / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    AUTH["providers"][0]["jwks"] = placeholder_jwks()
    settings = {"auth": AUTH, "token-ratelimit": RATELIMIT, "prompt-guard": GUARD, "prompt-enrichment": ENRICH,
                "usage-metrics": METRICS, "model-failover": FAILOVER_DOWN}
    policy = {"auth": "FAIL_RELOAD", "token-ratelimit": "FAIL_RELOAD", "prompt-guard": "FAIL_RELOAD",
              "prompt-enrichment": "FAIL_OPEN", "usage-metrics": "FAIL_OPEN", "model-failover": "FAIL_RELOAD"}
    blocks = {
        "auth": wasm_filter("auth", "auth", AUTH, "FAIL_RELOAD"),
        "token-ratelimit": wasm_filter("token_ratelimit", "token_ratelimit", RATELIMIT, "FAIL_RELOAD"),
        "prompt-guard": wasm_filter("prompt_guard", "prompt_guard", GUARD, "FAIL_RELOAD"),
        "prompt-enrichment": wasm_filter("prompt_enrichment", "prompt_enrichment", ENRICH, "FAIL_OPEN"),
        "usage-metrics": wasm_filter("usage_metrics", "usage_metrics", METRICS, "FAIL_OPEN"),
        "model-failover": wasm_filter("model_failover.downstream", "model_failover", FAILOVER_DOWN, "FAIL_RELOAD",
                                      body=False, name="model_failover_downstream"),
        "semantic-cache": wasm_filter("semantic_cache", "semantic_cache", SEMCACHE, "FAIL_OPEN", env_keys=True),
        "rag": wasm_filter("rag", "rag", RAG, "FAIL_OPEN", env_keys=True),
        "noop-headers": wasm_filter("bench_noop", "bench_noop", {"read_bodies": False}, "FAIL_OPEN",
                                    body=False, wasm_dir=NOOP_DIR),
        "noop-body": wasm_filter("bench_noop", "bench_noop", {"read_bodies": True}, "FAIL_OPEN", wasm_dir=NOOP_DIR),
        # the gateway module, one stage per filter (suite-one-vm)
        **{f"one-vm:{f}": gateway_filter(STAGE_OF[f] + (".downstream" if f == "model-failover" else ""),
                                         f"sluice-{f}", [(f, settings[f])], policy[f], body=f != "model-failover")
           for f in ORDER},
        # the gateway module, every stage in one filter (composed)
        "composed": gateway_filter("gateway", "sluice-gateway", [(f, settings[f]) for f in COMPOSED_ORDER],
                                   "FAIL_RELOAD"),
    }
    bare = (BENCH / "envoy-bare.yaml").read_text()
    cluster_bare = bare[bare.index("  clusters:\n"):]

    def make(name: str, filters: list[str], failover: bool = False, upstream: str = UPSTREAM_SEPARATE,
             route: str | None = None) -> None:
        text = bare[bare.index("admin:"):]
        head = (f"# Benchmark configuration `{name}` (scripts/bench.sh): {DESC[name]}\n"
                "# Same listener, route, access log and stats tags as bench/envoy-bare.yaml; only the sluice\n"
                "# filters differ. Ports follow the repo conventions; the bench renders them to free ports.\n"
                "# Generated by bench/gen_configs.py: edit that, not this file.\n")
        text = head + text.replace("          http_filters:\n",
                                   "          http_filters:\n" + "".join(blocks[f] for f in filters))
        if failover or "model-failover" in filters:
            text = text.replace(ROUTE_BARE, ROUTE_FAILOVER)
            text = text.replace('              domains: ["*"]\n',
                                '              domains: ["*"]\n              include_request_attempt_count: true\n')
            text = text.replace(cluster_bare, cluster_failover(upstream))
        if route is not None:  # semantic-cache, rag: a named route and the embeddings + store clusters
            text = text.replace(ROUTE_MATCH_BARE, route)
            text = text.rstrip("\n") + "\n" + CLUSTERS_LOOKUP
        (BENCH / f"envoy-{name}.yaml").write_text(text)

    for f in ORDER:
        make(f, [f])
    make("suite", ORDER)
    make("suite-one-vm", [f"one-vm:{f}" for f in ORDER], failover=True, upstream=UPSTREAM_GATEWAY)
    make("composed", ["composed"], failover=True, upstream=UPSTREAM_GATEWAY)
    make("semantic-cache", ["semantic-cache"], route=route_named("chat"))
    make("rag", ["rag"], route=route_named("chat", {"rag": RAG_ROUTE}))
    make("noop-headers", ["noop-headers"])
    make("noop-body", ["noop-body"])
    write_peer_configs()


if __name__ == "__main__":
    main()
