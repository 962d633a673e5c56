"""semantic-cache end to end (examples/semantic-cache/envoy.yaml, issue 17): real Envoy, the
built filters (auth -> semantic_cache -> usage_metrics), a real Chroma and the mock provider,
whose /v1/embeddings makes paraphrases near and unrelated texts far.

Callers are authenticated with JWTs from scripts/mint-jwt (keys made per test, JWKS served on
127.0.0.1); the cache scope is the user, so one user's entries are never served to another.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import openai
import pytest
import requests

from h2client import h2_request
from harness import ROOT, WASM_DIR, Gateway, JwksServer, config_variant, free_port, wait_for

CONFIG = ROOT / "examples/semantic-cache/envoy.yaml"
ANSWER = "Paris is the capital of France."
QUESTION = "What is the capital of France?"
PARAPHRASE = "Tell me the capital city of France"
UNRELATED = "How do volcanoes erupt under the ocean?"

pytestmark = pytest.mark.skipif(
    not all((WASM_DIR / f"{w}.wasm").exists() for w in ("sluice_auth", "sluice_semantic_cache", "sluice_usage_metrics")),
    reason="cargo build --release --target wasm32-wasip1 -p sluice-auth -p sluice-semantic-cache -p sluice-usage-metrics",
)

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(prom: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in prom.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            got = dict(LABEL.findall(m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


class CacheGateway:
    """The example's gateway: JWKS server, Chroma (or a closed port), provider and embeddings mocks."""

    def __init__(self, workdir: Path, chroma, *, replace: dict[str, str] | None = None, embeddings: bool = True,
                 store: bool = True):
        self.jwks = JwksServer.with_key(workdir / "keys", "sluice-demo")
        config = config_variant(workdir, CONFIG, replace)
        self.chroma = chroma() if store else None
        mocks = {18001: {"name": "openai", "model": "gpt-4o-mini", "response_text": ANSWER}}
        if embeddings:
            mocks[18002] = {"name": "embeddings"}
        ports = {18100: self.jwks.port, 18003: self.chroma.port if self.chroma else free_port()}
        try:
            self.gw = Gateway(workdir, config, mocks=mocks, ports=ports, env={"OPENAI_API_KEY": "sk-test"})
        except Exception:
            self.jwks.stop()
            raise
        self.provider = self.gw.mocks[18001]
        self.tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = self.jwks.token(user, "dev", iss="sluice-demo")
        return self.tokens[user]

    def ask(self, user: str, text: str, stream: bool = False, headers: dict | None = None, **extra) -> requests.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}
        if stream:
            body["stream"] = True
        hdrs = {"authorization": f"Bearer {self.token(user)}", **(headers or {})}
        return self.gw.post(json_body=body, headers=hdrs)

    def chats(self) -> list[dict]:
        return [e for e in self.provider.log() if e["path"].endswith("/chat/completions")]

    def stored(self) -> int:
        return self.chroma.count("sluice-cache") if self.chroma else 0

    def stop(self) -> None:
        self.gw.stop()
        self.jwks.stop()


@pytest.fixture
def cache(workdir, chroma):
    made: list[CacheGateway] = []

    def start(**kw) -> CacheGateway:
        g = CacheGateway(workdir, chroma, **kw)
        made.append(g)
        return g

    yield start
    for g in made:
        g.stop()


def content(r: requests.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def test_exact_hit_paraphrase_hit_unrelated_miss(cache):
    c = cache()
    first = c.ask("alice", QUESTION)
    assert first.status_code == 200, first.text
    assert first.headers["x-sluice-cache"] == "miss"
    assert content(first) == ANSWER
    # The exact tier is written in the response callback itself: the very next request hits,
    # before the semantic entry (stored by the root context through the shared queue) lands.
    again = c.ask("alice", "  What is the capital   of France? ")
    assert again.status_code == 200, again.text
    assert again.headers["x-sluice-cache"] == "hit-exact"
    assert content(again) == ANSWER
    assert again.json()["usage"]["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    assert len(c.chats()) == 1, "a hit never calls the provider"
    # The semantic entry was upserted from the root context (queue -> on_queue_ready -> callout).
    wait_for(lambda: c.stored() == 1, 15, "the semantic entry in Chroma")
    para = c.ask("alice", PARAPHRASE)
    assert para.status_code == 200, para.text
    m = re.fullmatch(r"hit-semantic; distance=(\d\.\d{3})", para.headers["x-sluice-cache"])
    assert m and 0 < float(m.group(1)) <= 0.25, para.headers["x-sluice-cache"]
    assert content(para) == ANSWER
    assert len(c.chats()) == 1
    far = c.ask("alice", UNRELATED)
    assert far.headers["x-sluice-cache"] == "miss"
    assert len(c.chats()) == 2
    # A route with the cache off passes untouched.
    off = c.gw.post("/uncached/v1/chat/completions", json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": QUESTION}]},
                    headers={"authorization": f"Bearer {c.token('alice')}"})
    assert off.status_code == 200 and "x-sluice-cache" not in off.headers
    assert len(c.chats()) == 3

    log = c.gw.envoy.wait_access_log(lambda e: len(e) >= 5)
    assert [e["cache"] for e in log[:5]] == ["miss", "hit_exact", "hit_semantic:" + m.group(1), "miss", "skip:route"]
    hits = [e for e in log if e["cache"].startswith("hit")]
    assert all(e["gen_ai.usage.input_tokens"] in (None, "-") for e in hits), "usage-metrics records nothing for a hit"
    # Histograms reach the admin endpoint at the stats flush (1 s).
    prom = wait_for(lambda: (lambda p: p if metric(p, "sluice_cache_lookup_us_count") == 4 else None)(c.gw.envoy.prometheus()),
                    10, "cache metrics")
    assert metric(prom, "sluice_cache_misses") == 2
    assert metric(prom, "sluice_cache_hits", sluice_phase="exact") == 1
    assert metric(prom, "sluice_cache_hits", sluice_phase="semantic") == 1
    usage = first.json()["usage"]
    assert metric(prom, "sluice_cache_saved_tokens", gen_ai_token_type="output") == 2 * usage["completion_tokens"]
    assert metric(prom, "sluice_cache_saved_tokens", gen_ai_token_type="input") == 2 * usage["prompt_tokens"]
    assert metric(prom, "sluice_cache_lookup_us_count", sluice_phase="semantic") == 3
    assert metric(prom, "sluice_cache_stores", sluice_phase="semantic") == 2
    # usage-metrics saw only the three provider calls.
    assert metric(prom, "sluice_usage_requests") == 3
    assert metric(prom, "gen_ai_client_token_usage", gen_ai_token_type="output") == 3 * usage["completion_tokens"]


def test_one_user_never_gets_another_users_answer(cache):
    c = cache()
    a = c.ask("alice", QUESTION, headers={"x-mock-text": "Answer for alice."})
    assert content(a) == "Answer for alice."
    wait_for(lambda: c.stored() == 1, 15, "alice's entry in Chroma")
    # Bob, the same text: alice's entry is at distance 0 but in another scope; Carol, a paraphrase.
    for user, text in (("bob", QUESTION), ("carol", PARAPHRASE)):
        b = c.ask(user, text, headers={"x-mock-text": f"Answer for {user}."})
        assert b.status_code == 200, b.text
        assert b.headers["x-sluice-cache"] == "miss", (user, text, b.headers.get("x-sluice-cache"))
        assert content(b) == f"Answer for {user}."
        wait_for(lambda: c.stored() == len(c.chats()), 15, f"{user}'s entry in Chroma")
    assert len(c.chats()) == 3
    # Each one gets their own answer back from the cache, from either tier.
    for user in ("alice", "bob", "carol"):
        for text in (QUESTION, PARAPHRASE, "Which city is the capital of France"):
            r = c.ask(user, text)
            assert r.headers["x-sluice-cache"].startswith("hit"), (user, text, r.headers["x-sluice-cache"])
            assert content(r) == f"Answer for {user}.", (user, text)
    assert len(c.chats()) == 3
    # Entries carry no user name, only scope hashes.
    items = c.chroma.get("sluice-cache")
    assert all(set(m) == {"scope", "exp"} for m in items["metadatas"])
    assert not any(u in json.dumps(m) for m in items["metadatas"] for u in ("alice", "bob", "carol"))


def test_entries_expire_after_the_ttl(cache):
    c = cache(replace={'"ttl": "1h"': '"ttl": "2s"'})
    assert c.ask("alice", QUESTION).headers["x-sluice-cache"] == "miss"
    wait_for(lambda: c.stored() == 1, 15, "the semantic entry in Chroma")
    assert c.ask("alice", QUESTION).headers["x-sluice-cache"] == "hit-exact"
    assert c.ask("alice", PARAPHRASE).headers["x-sluice-cache"].startswith("hit-semantic")
    time.sleep(2.3)
    # A text never asked before (no exact entry): the semantic entry is expired too.
    assert c.ask("alice", "Which city is the capital of France").headers["x-sluice-cache"] == "miss"
    wait_for(lambda: c.stored() == 2, 15, "the fresh entry in Chroma")
    # The first question's exact entry expired: only the fresh semantic entry answers it now.
    assert c.ask("alice", QUESTION).headers["x-sluice-cache"].startswith("hit-semantic")
    assert len(c.chats()) == 2


def test_streaming_hit_is_replayed_as_sse_the_openai_sdk_parses(cache):
    c = cache()
    client = openai.OpenAI(base_url=c.gw.url("/v1"), api_key=c.token("alice"), max_retries=0)
    msgs = [{"role": "user", "content": QUESTION}]
    # Miss: the provider's stream passes through, and is stored from its assembled text.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs, stream=True)
    assert raw.headers["x-sluice-cache"] == "miss"
    assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices) == ANSWER
    wait_for(lambda: c.stored() == 1, 15, "the streamed answer in Chroma")
    # Hit, streamed, with the usage chunk the client asks for.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-sluice-cache"] == "hit-exact"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2, "replayed in pieces"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWER.split())
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    # Paraphrase, streamed, without include_usage: no usage chunk.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PARAPHRASE}], stream=True)
    assert raw.headers["x-sluice-cache"].startswith("hit-semantic")
    chunks = list(raw.parse())
    assert all(ch.usage is None for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER
    # Non-streaming, through the SDK too.
    done = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert done.choices[0].message.content == ANSWER
    assert len(c.chats()) == 1


@pytest.mark.parametrize("transport", ["h2", "h2-trailers"])
def test_hits_and_misses_over_http2(cache, transport):
    c = cache()
    port = c.gw.envoy.listener_port

    def ask(text: str):
        data = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}).encode()
        half = len(data) // 2
        trailers = {"x-client-trailer": "done"} if transport == "h2-trailers" else None
        hdrs = {"content-type": "application/json", "authorization": f"Bearer {c.token('alice')}"}
        return h2_request(port, "POST", "/v1/chat/completions", hdrs, [data[:half], data[half:]], trailers=trailers)

    miss = ask(QUESTION)
    assert (miss.status, miss.headers.get("x-sluice-cache")) == (200, "miss"), miss.text
    hit = ask(QUESTION)
    assert (hit.status, hit.headers.get("x-sluice-cache")) == (200, "hit-exact"), hit.text
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER
    wait_for(lambda: c.stored() == 1, 15, "the semantic entry in Chroma")
    para = ask(PARAPHRASE)
    assert para.status == 200 and para.headers.get("x-sluice-cache", "").startswith("hit-semantic"), para.headers
    assert len(c.chats()) == 1


def test_store_down_forwards_uncached_by_default(cache):
    c = cache(store=False)  # the chroma cluster's port is closed
    r = c.ask("alice", QUESTION)
    assert r.status_code == 200 and content(r) == ANSWER
    assert r.headers["x-sluice-cache"] == "error"
    log = c.gw.envoy.wait_access_log(lambda e: len(e) >= 1)
    assert log[0]["cache"] == "error:store"
    # The exact tier needs no store: the same prompt is still answered from it.
    assert c.ask("alice", QUESTION).headers["x-sluice-cache"] == "hit-exact"
    assert len(c.chats()) == 1
    prom = c.gw.envoy.prometheus()
    assert metric(prom, "sluice_cache_errors", sluice_reason="store") == 1


def test_store_down_answers_503_with_failure_mode_deny(cache):
    c = cache(store=False, replace={'"failure_mode": "allow"': '"failure_mode": "deny"'})
    r = c.ask("alice", QUESTION)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "cache_unavailable"
    assert r.headers["x-sluice-cache"] == "error"
    assert c.chats() == [], "refused before the provider"


def test_store_stopped_mid_run_then_back(cache):
    c = cache()
    assert c.ask("alice", QUESTION).headers["x-sluice-cache"] == "miss"
    wait_for(lambda: c.stored() == 1, 15, "the semantic entry")
    port = c.chroma.port
    c.chroma.stop()
    r = c.ask("alice", PARAPHRASE)
    assert r.status_code == 200 and r.headers["x-sluice-cache"] == "error"
    # Chroma back on the same port with the same data: the semantic tier works again.
    from harness import Chroma
    # That answer went to the exact tier (it needs no store): the same text is a hit now.
    assert c.ask("alice", PARAPHRASE).headers["x-sluice-cache"] == "hit-exact"
    c.chroma = Chroma(c.gw.workdir, port)
    try:
        r = c.ask("alice", "Which city is the capital of France")
        assert r.headers["x-sluice-cache"].startswith("hit-semantic"), r.headers["x-sluice-cache"]
    finally:
        c.chroma.stop()


def test_embeddings_down_or_slow_forwards_uncached(cache):
    c = cache(embeddings=False)  # nothing listens on the embeddings cluster's port
    r = c.ask("alice", QUESTION)
    assert r.status_code == 200 and content(r) == ANSWER
    assert r.headers["x-sluice-cache"] == "error"
    log = c.gw.envoy.wait_access_log(lambda e: len(e) >= 1)
    assert log[0]["cache"] == "error:embeddings"
    assert c.stored() == 0


def test_slow_embeddings_are_bounded_by_the_timeout(cache):
    c = cache(replace={'"timeout": "1s"': '"timeout": "300ms"'})
    c.gw.mocks[18002].configure(first_byte_delay_ms=3000)
    t0 = time.monotonic()
    r = c.ask("alice", QUESTION)
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-sluice-cache"] == "error"
    assert took < 2.0, f"the lookup waited {took:.1f}s; the embeddings timeout is 300ms"
