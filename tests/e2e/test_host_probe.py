"""The fake host must answer like Envoy: the host probe (tests/host-probe) runs every Host
method of sluice_core in real Envoy 1.40 and logs the answers; they must equal
tests/host-probe/expected.json, which the probe's native test holds FakeHost to as well."""
from __future__ import annotations

import json
import re

from harness import ROOT, wait_for

CONFIG = "tests/host-probe/envoy.yaml"


def probe_lines(gw) -> dict[str, dict]:
    out = {}
    for line in gw.envoy.log_path.read_text(errors="replace").splitlines():
        m = re.search(r"sluice-host-probe (\w+) (\{.*\})$", line)
        if m:
            out[m.group(1)] = json.loads(m.group(2))
    return out


def test_envoy_answers_like_the_fake_host(gateway):
    gw = gateway(CONFIG, mocks={18001: {"name": "p"}})
    r = gw.get("/v1/models", headers={"x-probe-tag": "e2e"})
    assert r.status_code == 200, r.text
    lines = wait_for(lambda: (lambda l: l if len(l) == 3 else None)(probe_lines(gw)), 10, "three probe lines")
    expected = json.loads((ROOT / "tests/host-probe/expected.json").read_text())
    for phase in ("request", "response_headers", "response_body"):
        assert lines[phase] == expected[phase], f"{phase}: Envoy {lines[phase]} != fake {expected[phase]}"
    log = gw.envoy.log_path.read_text(errors="replace")
    assert "panicked" not in log and "RuntimeError" not in log
