"""Every YAML under envoy/ and examples/ is checked: Envoy bootstraps with
`envoy --mode validate` (from the repo root, so relative .wasm paths resolve), and every
bootstrap must also be started by some e2e test: its path appears in the code (not a comment)
of a test file or a script. Kubernetes manifests and compose files are checked by their own tests."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

from harness import ENVOY, ROOT

YAML_DIRS = [ROOT / "envoy", ROOT / "examples"]


def all_yaml() -> list[Path]:
    files = []
    for d in YAML_DIRS:
        files += sorted(p for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))
    return files


def kind_of(path: Path) -> str:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if not docs:
        return "empty"
    first = docs[0]
    if isinstance(first, dict) and ("static_resources" in first or "admin" in first or "stats_config" in first):
        return "envoy"
    if all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        return "kubernetes"
    if isinstance(first, dict) and "services" in first:
        return "compose"
    if isinstance(first, dict) and ("scrape_configs" in first or "global" in first):
        return "prometheus"
    if isinstance(first, dict) and "apiVersion" in first and ("datasources" in first or "providers" in first):
        return "grafana-provisioning"
    return "unknown"


ENVOY_FILES = [p for p in all_yaml() if kind_of(p) == "envoy"]


def test_every_yaml_has_a_known_kind():
    unknown = [str(p.relative_to(ROOT)) for p in all_yaml() if kind_of(p) in ("unknown", "empty")]
    assert not unknown, f"YAML files of unknown kind (not validated by anything): {unknown}"


@pytest.mark.parametrize("path", ENVOY_FILES, ids=[str(p.relative_to(ROOT)) for p in ENVOY_FILES])
def test_envoy_validate(path: Path):
    r = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path.relative_to(ROOT))],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{path}: envoy --mode validate failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert " OK" in (r.stdout + r.stderr)


# Bootstraps that exist as copy-paste sources rather than running gateways; their blocks are
# exercised through the configs that include them (asserted below).
SNIPPETS = {"envoy/stats-tags.yaml", "envoy/access-log.yaml"}


def code_without_comments(path: Path) -> str:
    """What a source file can use a path with, without its comments: for Python the string
    constants of its code (comments and docstrings, which are bare string statements, left
    out); for other scripts (shell) the text without `#` lines and trailing ` # ...` parts."""
    text = path.read_text(errors="replace")
    if path.suffix == ".py" or text.startswith("#!") and "python" in text.split("\n", 1)[0]:
        tree = ast.parse(text)
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        return "\n".join(n.value for n in ast.walk(tree)
                         if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs)
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        lines.append(line.split(" # ", 1)[0])
    return "\n".join(lines)


def test_comments_do_not_count_as_a_use(tmp_path: Path):
    py = tmp_path / "t.py"
    py.write_text('"""examples/g/envoy.yaml"""\n# starts examples/a/envoy.yaml\n'
                  'X = "examples/b/envoy.yaml"  # and examples/c/envoy.yaml\n')
    sh = tmp_path / "t.sh"
    sh.write_text('#!/bin/sh\n# examples/d/envoy.yaml\nenvoy -c examples/e/envoy.yaml # examples/f/envoy.yaml\n')
    got = code_without_comments(py) + code_without_comments(sh)
    assert "examples/b/" in got and "examples/e/" in got
    assert not any(f"examples/{c}/" in got for c in "acdfg"), got


def test_every_envoy_yaml_is_exercised_by_a_test():
    sources = [p for p in (ROOT / "tests").rglob("*.py")] + [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    test_text = "\n".join(code_without_comments(p) for p in sources)
    missing = []
    for p in ENVOY_FILES:
        rel = str(p.relative_to(ROOT))
        if rel in SNIPPETS:
            continue
        if rel not in test_text:
            missing.append(rel)
    assert not missing, f"Envoy configs no test starts: {missing}"


def test_examples_carry_the_shared_stats_tags():
    tags_block = (ROOT / "envoy" / "stats-tags.yaml").read_text().split("stats_config:\n", 1)[1]
    lacking = []
    for p in ENVOY_FILES:
        rel = str(p.relative_to(ROOT))
        if rel.startswith("examples/") or rel == "envoy/envoy.yaml":
            if tags_block not in p.read_text():
                lacking.append(rel)
    assert not lacking, f"these configs lack envoy/stats-tags.yaml's stats_tags block: {lacking}"
