"""Turn an Envoy config that chains separate sluice filters into the same config running the
composed gateway (filters/gateway): each run of consecutive sluice filters in a connection
manager becomes one `sluice.gateway` filter whose stages are those filters' configurations in
order, and each upstream sluice filter becomes the gateway running its one stage. Every
gateway instance shares one `vm_id` and one environment (the VM is shared).

Seed-scenario tests run against both forms (conftest.py: `@pytest.mark.composable`), which is
how the composed build is held to the same answers, filter state and metrics as the separate
filters.
"""
from __future__ import annotations

import json
import re

import yaml

WASM = re.compile(r"target/wasm32-wasip1/release/sluice_(\w+)\.wasm$")
STAGE_OF = {
    "auth": "auth",
    "token_ratelimit": "token_ratelimit",
    "prompt_guard": "prompt_guard",
    "prompt_enrichment": "prompt_enrichment",
    "usage_metrics": "usage_metrics",
    "model_failover": "model_failover",
    "semantic_cache": "semantic_cache",
    "rag": "rag",
}
GATEWAY = "target/wasm32-wasip1/release/sluice_gateway.wasm"
VM_ID = "sluice-composed"


def _sluice_stage(f: dict) -> tuple[str, dict] | None:
    """(stage name, its config) when `f` is a separate sluice wasm filter."""
    tc = f.get("typed_config") or {}
    if not str(tc.get("@type", "")).endswith("filters.http.wasm.v3.Wasm"):
        return None
    cfg = tc.get("config") or {}
    code = ((cfg.get("vm_config") or {}).get("code") or {}).get("local") or {}
    m = WASM.search(str(code.get("filename", "")))
    if not m or m.group(1) not in STAGE_OF:
        return None
    value = ((cfg.get("configuration") or {}).get("value")) or "{}"
    return STAGE_OF[m.group(1)], json.loads(value) if value.strip() else {}


def _env_of(filters: list[dict]) -> dict:
    env: dict = {"host_env_keys": [], "key_values": {}}
    for f in filters:
        vm = ((f.get("typed_config") or {}).get("config") or {}).get("vm_config") or {}
        e = vm.get("environment_variables") or {}
        for k in e.get("host_env_keys") or []:
            if k not in env["host_env_keys"]:
                env["host_env_keys"].append(k)
        env["key_values"].update(e.get("key_values") or {})
    return env


def _walk(node, visit):
    if isinstance(node, dict):
        for k, v in list(node.items()):
            if k == "http_filters" and isinstance(v, list):
                visit(v)
            _walk(v, visit)
    elif isinstance(node, list):
        for v in node:
            _walk(v, visit)


def _gateway_filter(name: str, stages: list[tuple[str, dict]], template: dict, env: dict) -> dict:
    cfg = template.get("typed_config", {}).get("config", {})
    hold = any(s[1].pop("hold_headers", True) is False for s in stages)
    doc: dict = {"stages": [{n: c} for n, c in stages]}
    if hold:
        doc["hold_headers"] = False
    vm: dict = {"vm_id": VM_ID, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": GATEWAY}}}
    if env["host_env_keys"] or env["key_values"]:
        vm["environment_variables"] = {k: v for k, v in env.items() if v}
    new_cfg = {
        "name": name,
        "root_id": name,
        "allow_on_headers_stop_iteration": True,
        "vm_config": vm,
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(doc)},
    }
    if "failure_policy" in cfg:
        new_cfg["failure_policy"] = cfg["failure_policy"]
    return {"name": name, "typed_config": {"@type": template["typed_config"]["@type"], "config": new_cfg}}


def _filter_names(doc) -> dict[str, str]:
    """HTTP filter name -> stage name, for every separate sluice filter in the config."""
    out: dict[str, str] = {}

    def visit(chain):
        for f in chain:
            st = _sluice_stage(f)
            if st is not None and "name" in f:
                out[f["name"]] = st[0]

    _walk(doc, visit)
    return out


def _route_disables(node, names: dict[str, str]) -> None:
    """`typed_per_filter_config: {<sluice filter>: {disabled: true}}` on a route becomes route
    metadata `sluice.disabled_stages` (the composed filter has one name for all stages)."""
    if isinstance(node, dict):
        tpfc = node.get("typed_per_filter_config")
        if isinstance(tpfc, dict) and "match" in node:
            off = [names[k] for k, v in list(tpfc.items()) if k in names and isinstance(v, dict) and v.get("disabled")]
            for k in [k for k in tpfc if k in names]:
                del tpfc[k]
            if not tpfc:
                del node["typed_per_filter_config"]
            if off:
                md = node.setdefault("metadata", {}).setdefault("filter_metadata", {}).setdefault("sluice", {})
                md["disabled_stages"] = off
        for v in node.values():
            _route_disables(v, names)
    elif isinstance(node, list):
        for v in node:
            _route_disables(v, names)


def compose_yaml(text: str) -> str:
    """The composed form of an Envoy config (see the module docs)."""
    doc = yaml.safe_load(text)
    _route_disables(doc, _filter_names(doc))
    chains: list[list[dict]] = []
    _walk(doc, chains.append)
    env = _env_of([f for chain in chains for f in chain])
    counter = iter(range(1000))

    def rewrite(chain: list[dict]) -> None:
        out: list[dict] = []
        run: list[tuple[dict, tuple[str, dict]]] = []

        def flush():
            if run:
                name = f"sluice-gateway-{next(counter)}"
                out.append(_gateway_filter(name, [s for _, s in run], run[0][0], env))
                run.clear()

        for f in chain:
            st = _sluice_stage(f)
            if st is None:
                flush()
                out.append(f)
            else:
                run.append((f, st))
        flush()
        chain[:] = out

    _walk(doc, rewrite)
    return yaml.safe_dump(doc, sort_keys=False)
