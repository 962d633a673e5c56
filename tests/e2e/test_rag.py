"""rag end to end (examples/rag/envoy.yaml, issue 17 and the workshop seed's RAG part): real
Envoy, the built rag filter, a real Chroma filled by scripts/rag-load from the example's corpus,
and the mock provider (its /v1/embeddings for the vectors, its request log to show what the
model was sent)."""
from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from h2client import h2_request
from harness import ROOT, WASM_DIR, Gateway, config_variant, free_port

CONFIG = ROOT / "examples/rag/envoy.yaml"
CORPUS = ROOT / "examples" / "rag" / "corpus"
QUESTION = "How many varieties of cheese are there in France?"
FIGURE = "between 1,000 and 1,600 varieties"

pytestmark = pytest.mark.skipif(not (WASM_DIR / "sluice_rag.wasm").exists(),
                                reason="cargo build --release --target wasm32-wasip1 -p sluice-rag")


def load(chroma, embeddings_base: str, collection: str = "french-cheeses") -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "rag-load"), "--chroma", chroma.base, "--collection", collection,
         "--embeddings", f"{embeddings_base}/v1/embeddings", "--model", "text-embedding-3-small", str(CORPUS)],
        capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def start(workdir: Path, chroma_port: int, replace: dict[str, str] | None = None) -> Gateway:
    config = config_variant(workdir, CONFIG, replace)
    return Gateway(workdir, config, mocks={18001: {"name": "openai", "model": "gpt-4o-mini"}, 18002: {"name": "embeddings"}},
                   ports={18003: chroma_port}, env={"OPENAI_API_KEY": "sk-test"})


def seen(gw: Gateway, marker: str) -> dict:
    """The body the provider received for the request tagged `marker`."""
    hits = [e for e in gw.mocks[18001].log() if e["headers"].get("x-test-id") == marker]
    assert len(hits) == 1, hits
    return hits[0]["body"]


def ask(gw: Gateway, text: str, path: str = "/v1/chat/completions", transport: str = "h1") -> tuple[int, dict, dict]:
    marker = uuid.uuid4().hex
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    headers = {"content-type": "application/json", "x-test-id": marker}
    if transport == "h1":
        r = gw.post(path, json_body=body, headers=headers)
        status = r.status_code
    else:
        data = json.dumps(body).encode()
        trailers = {"x-client-trailer": "done"} if transport == "h2-trailers" else None
        r = h2_request(gw.envoy.listener_port, "POST", path, headers, [data[:20], data[20:]], trailers=trailers)
        status = r.status
    return status, body, seen(gw, marker)


@pytest.mark.parametrize("transport", ["h1", "h2", "h2-trailers"])
def test_the_right_passage_reaches_the_provider(workdir, chroma, gateway, transport):
    db = chroma()
    gw = gateway(CONFIG, mocks={18001: {"name": "openai", "model": "gpt-4o-mini"}, 18002: {"name": "embeddings"}},
                 ports={18003: db.port}, env={"OPENAI_API_KEY": "sk-test"})
    out = load(db, gw.mocks[18002].base)
    assert "chunks from 2 files" in out, out
    # The same question without RAG: the provider gets exactly what the client sent.
    status, body, plain = ask(gw, QUESTION, "/norag/v1/chat/completions", transport)
    assert status == 200 and plain == body
    # With RAG: a system message with the passage, before the client's message.
    status, body, got = ask(gw, QUESTION, transport=transport)
    assert status == 200
    msgs = got["messages"]
    assert [m["role"] for m in msgs] == ["system", "user"], msgs
    assert FIGURE in msgs[0]["content"], msgs[0]["content"]
    assert "[french-cheeses.md]" in msgs[0]["content"]
    assert "Tour de France" not in msgs[0]["content"], "only passages within the cut-off"
    assert msgs[1] == body["messages"][0]
    # A question the corpus knows nothing about: nothing within the cut-off, nothing added.
    status, body, got = ask(gw, "What is the capital of Peru?", transport=transport)
    assert status == 200 and got == body
    log = gw.envoy.wait_access_log(lambda e: len(e) >= 3)
    assert [e["rag"] for e in log[:3]] == ["-", "added:1", "none"] or [e["rag"] for e in log[:3]] == [None, "added:1", "none"], log
    prom = gw.envoy.prometheus()
    assert re.search(r"^sluice_rag_passages(\{\})? 1$", prom, re.M), [line for line in prom.splitlines() if "sluice_rag" in line]
    assert re.search(r'^sluice_rag_requests\{sluice_action="added"\} 1$', prom, re.M), \
        [line for line in prom.splitlines() if "sluice_rag" in line]


def test_an_empty_collection_changes_nothing(workdir, chroma):
    db = chroma()
    db.collection("empty-shelf")
    gw = start(workdir, db.port, {"collection: french-cheeses": "collection: empty-shelf"})
    try:
        status, body, got = ask(gw, QUESTION)
        assert status == 200 and got == body
        log = gw.envoy.wait_access_log(lambda e: len(e) >= 1)
        assert log[0]["rag"] == "none"
    finally:
        gw.stop()


def test_store_or_embeddings_down_forwards_the_request_unchanged(workdir, chroma):
    gw = start(workdir, free_port())  # nothing listens on the chroma cluster's port
    try:
        status, body, got = ask(gw, QUESTION)
        assert status == 200 and got == body
        gw.mocks[18002].configure(rate_503=100)
        status, body, got = ask(gw, QUESTION)
        assert status == 200 and got == body
        log = gw.envoy.wait_access_log(lambda e: len(e) >= 2)
        assert [e["rag"] for e in log[:2]] == ["error:store", "error:embeddings"]
    finally:
        gw.stop()


def test_deny_mode_refuses_when_retrieval_is_down(workdir, chroma):
    gw = start(workdir, free_port(), {'"failure_mode": "allow"': '"failure_mode": "deny"',
                                      "root_id: rag\n": "root_id: rag\n                allow_on_headers_stop_iteration: true\n"})
    try:
        r = gw.post(json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "retrieval_unavailable", r.text
        assert not [e for e in gw.mocks[18001].log() if e["path"].endswith("/chat/completions")]
    finally:
        gw.stop()
