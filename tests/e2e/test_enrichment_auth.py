"""prompt-enrichment with the auth filter in front (examples/prompt-enrichment-auth/envoy.yaml).

The auth filter verifies an HS256 JWT and writes the caller's identity into filter state;
prompt-enrichment renders `{{team}}`, `{{claim.org}}` and `{{user}}` from it; prompt-guard,
after enrichment, scans the final prompt. Assertions read the body the mock provider
received. Skipped only when the auth or prompt-guard wasm is not built.
"""
from __future__ import annotations

import time
import uuid

import jwt
import pytest
import requests

from harness import WASM_DIR, chat

CONFIG = "examples/prompt-enrichment-auth/envoy.yaml"
SECRET = "demo-only-secret-change-me-0123456789abcdef"  # the example's demo secret
ISSUER = "https://idp.example.com"
CSV_PROMPT = "Parse the unstructured text into CSV format and respond only with the CSV data."
SEED_TEXT = "Seattle, Los Angeles, and Chicago are cities in the United States."

pytestmark = pytest.mark.skipif(
    not all((WASM_DIR / f"{w}.wasm").exists() for w in ("sluice_auth", "sluice_prompt_guard")),
    reason="sluice_auth.wasm or sluice_prompt_guard.wasm is not built "
           "(cargo build --release --target wasm32-wasip1 -p sluice-auth -p sluice-prompt-guard)",
)


def token(**claims) -> str:
    body = {"iss": ISSUER, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def send(gw, body: dict, bearer: str | None, **extra_headers: str) -> tuple[requests.Response, dict | None]:
    marker = uuid.uuid4().hex
    headers = {"x-test-id": marker, **{k.replace("_", "-"): v for k, v in extra_headers.items()}}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    r = gw.post(json_body=body, headers=headers)
    seen = [e for e in gw.mocks[18001].log() if e["headers"].get("x-test-id") == marker]
    return r, (seen[0] if seen else None)


def test_team_claim_from_auth_renders_the_system_prompt(gateway):
    gw = gateway(CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o"}})

    # Alice of team dev: the gateway's prompts first, rendered from her verified token.
    alice = token(sub="alice", team="dev", org="acme")
    r, seen = send(gw, chat(SEED_TEXT, model="gpt-4o-mini", max_tokens=128), alice)
    assert r.status_code == 200, r.text
    body = seen["body"]
    assert body["messages"] == [
        {"role": "system", "content": CSV_PROMPT},
        {"role": "system", "content": "You answer for team dev of acme."},
        {"role": "user", "content": SEED_TEXT},
    ]
    assert body["user"] == "alice", "defaults.user rendered from sluice.user"
    assert (body["model"], body["max_tokens"]) == ("gpt-4o-mini", 128)
    assert "authorization" not in seen["headers"], "auth strips the credential before the provider"

    # Bob of team ops, streaming, with his own `user` field (a default never overrides it).
    bob = token(sub="bob", team="ops", org="acme")
    r, seen = send(gw, chat(SEED_TEXT, stream=True, user="app-user-7"), bob)
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"][1] == {"role": "system", "content": "You answer for team ops of acme."}
    assert seen["body"]["user"] == "app-user-7"
    assert seen["body"]["stream"] is True

    # A client cannot claim a team through a header: only the verified token counts.
    r, seen = send(gw, chat(SEED_TEXT), token(sub="carol", team="dev", org="acme"), x_team="ops", x_sluice_team="ops")
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"][1]["content"] == "You answer for team dev of acme."

    # A valid token without a team claim: the template variable is missing -> refused (400).
    r, seen = send(gw, chat(SEED_TEXT), token(sub="dave", org="acme"))
    assert r.status_code == 400, r.text
    assert seen is None
    err = r.json()["error"]
    assert err["code"] == "missing_template_variable"
    assert "{{team}}" in err["message"]

    # No token: auth refuses before enrichment runs.
    r, seen = send(gw, chat(SEED_TEXT), None)
    assert r.status_code == 401
    assert seen is None


def test_the_guard_scans_what_enrichment_added(gateway):
    """Order auth -> prompt-enrichment -> prompt-guard (issue 13 §4): a value rendered into the
    gateway's prompt (here a claim) is scanned like the client's own text, so nothing added
    after the guard reaches the model unchecked."""
    gw = gateway(CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o"}})
    r, seen = send(gw, chat(SEED_TEXT), token(sub="eve", team="dev", org="Credit Card Fraud Inc"))
    assert r.status_code == 403, r.text
    assert seen is None, "refused before the provider"
    assert "Rejected due to inappropriate content" in r.text
    r, seen = send(gw, chat(SEED_TEXT), token(sub="alice", team="dev", org="acme"))
    assert r.status_code == 200, r.text
    assert seen["body"]["messages"][1]["content"] == "You answer for team dev of acme."
