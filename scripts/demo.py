#!/usr/bin/env python3
"""The sluice demo tour: real Envoy with the sluice filters in front of mock providers.

Started by scripts/demo.sh (which installs and builds first). Each tour step prints the
curl command a user would type and what came back.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import requests  # noqa: E402

from harness import ROOT as REPO, WORK, Chroma, Gateway, config_ports, free_port, sse_events  # noqa: E402

CONFIG = "envoy/envoy.yaml"
# The providers envoy/envoy.yaml points at (see its clusters).
PROVIDERS = {
    18001: {"name": "openai", "model": "gpt-4o-mini"},
    18002: {"name": "local", "model": "qwen-0.5b"},
    18004: {"name": "embeddings"},       # /v1/embeddings for semantic-cache and rag
}
CHROMA_PORT = 18003                      # the vector store (envoy/envoy.yaml's chroma cluster)
CORPUS = ROOT / "examples" / "rag" / "corpus"
PROVIDER_DELAY_MS = 400                  # the cache step's provider latency (x-mock-delay-ms)

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def show(title: str, curl: str, resp: requests.Response, note: str = "") -> None:
    print(f"\n{BOLD}▶ {title}{RESET}")
    print(f"{DIM}$ {curl}{RESET}")
    ctype = resp.headers.get("content-type", "")
    print(f"HTTP {resp.status_code}  " + "  ".join(
        f"{k}: {v}" for k, v in resp.headers.items()
        if k.startswith(("x-ratelimit", "retry-after", "x-envoy-ratelimited", "x-mock-provider", "www-authenticate",
                         "x-sluice-cache"))))
    text = resp.text
    if "event-stream" in ctype:
        text = "\n".join(f"data: {e[:150]}…" if len(e) > 150 else f"data: {e}" for e in sse_events(resp)[:3]) + "\n…"
    if "json" in ctype:
        try:
            text = json.dumps(resp.json(), indent=None)[:400]
        except ValueError:
            pass
    print(text[:600].rstrip())
    if note:
        print(f"{DIM}  ↳ {note}{RESET}")


def body(text: str, model: str | None = None, **extra) -> dict:
    b = {"messages": [{"role": "user", "content": text}], **extra}
    if model:
        b["model"] = model
    return b


def curl_for(base: str, path: str, b: dict | None, headers: dict | None = None) -> str:
    h = "".join(f" -H '{k}: {v}'" for k, v in (headers or {}).items())
    if b is None:
        return f"curl -s {base}{path}{h}"
    return f"curl -s {base}{path}{h} -H 'content-type: application/json' -d '{json.dumps(b)}'"


def mint(keys: Path, sub: str, team: str, llm: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "mint-jwt"), "token", "--key", str(keys / "private.pem"),
                          "--kid", "sluice-demo", "--iss", "sluice-demo", "--sub", sub, "--team", team,
                          "--claim", "org=acme", "--llm", llm], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def serve_dir(directory: Path, port: int) -> ThreadingHTTPServer:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_args):  # keep the tour readable
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(directory)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stream_text(resp: requests.Response) -> str:
    text = []
    for e in sse_events(resp):
        if e == "[DONE]":
            continue
        chunk = json.loads(e)
        for c in chunk.get("choices") or []:
            text.append((c.get("delta") or {}).get("content") or "")
    return "".join(text)


def cache_and_rag(gw: Gateway, a: dict, short: dict) -> None:
    """semantic-cache: a miss, the same prompt again (exact tier), a paraphrase (semantic tier);
    then rag: a question the french-cheeses corpus answers, and what the provider received."""
    base, path, openai = gw.base, "/v1/chat/completions", gw.mocks[18001]
    slow = {**a, "x-mock-delay-ms": str(PROVIDER_DELAY_MS)}
    msg_c = body("What is the capital of France?")
    t0 = time.monotonic()
    r = gw.post(path, json_body=msg_c, headers=slow)
    miss_ms = (time.monotonic() - t0) * 1000
    show("semantic-cache: a new prompt is a miss", curl_for(base, path, msg_c, {**short, "x-mock-delay-ms": str(PROVIDER_DELAY_MS)}), r,
         f"forwarded to the provider ({PROVIDER_DELAY_MS} ms slow here): {miss_ms:.0f} ms; the answer is stored after it")
    calls = len(openai.log())
    time.sleep(0.5)   # the store is asynchronous (never delays the client)
    t0 = time.monotonic()
    r = gw.post(path, json_body=msg_c, headers=slow)
    hit_ms = (time.monotonic() - t0) * 1000
    show("semantic-cache: the same prompt again", curl_for(base, path, msg_c, short), r,
         f"answered from the cache in {hit_ms:.0f} ms: time saved {miss_ms - hit_ms:.0f} ms; "
         f"provider calls since: {len(openai.log()) - calls}")
    msg_p = body("Tell me the capital city of France")
    t0 = time.monotonic()
    r = gw.post(path, json_body=msg_p, headers=slow)
    para_ms = (time.monotonic() - t0) * 1000
    show("semantic-cache: a paraphrase", curl_for(base, path, msg_p, short), r,
         f"same meaning, nearest stored prompt within max_distance: {para_ms:.0f} ms, time saved {miss_ms - para_ms:.0f} ms")

    msg_r = body("How many varieties of cheese are there in France?")
    r = gw.post(path, json_body=msg_r, headers=a)
    show("rag: a question the knowledge base answers (collection french-cheeses)", curl_for(base, path, msg_r, short), r)
    sent = openai.log()[-1]["body"]["messages"]
    added = [m["content"] for m in sent if m["role"] == "system" and "passages" in m["content"]]
    passage = added[0].split("\n\n", 1)[-1] if added else "(none)"
    print(f"{DIM}  ↳ rag: the provider received a system message with the retrieved passage: "
          f"{passage[:300]!r}{RESET}")


def tour(gw: Gateway, alice: str, bob: str) -> None:
    base = gw.base
    path = "/v1/chat/completions"
    openai, local = gw.mocks[18001], gw.mocks[18002]
    a = {"authorization": f"Bearer {alice}"}
    b = {"authorization": f"Bearer {bob}"}
    short = {"authorization": "Bearer $ALICE_TOKEN"}

    msg = body("Write me a 20 word pitch for a service mesh")
    r = gw.post(path, json_body=msg)
    show("auth: no token", curl_for(base, path, msg), r, "401 Jwt is missing, nothing reached a provider")

    r = gw.post(path, json_body=msg, headers=a)
    seen = openai.log()[-1]
    show("auth: Alice's JWT (team dev, may use openai/gpt-4o-mini)", curl_for(base, path, msg, short), r,
         f"no model in the request: the route default gpt-4o-mini was checked and sent; the provider saw "
         f"authorization={seen['headers'].get('authorization', '')[:16]}… (the gateway's key, never Alice's JWT)")
    first = seen["body"]["messages"][0]
    print(f"{DIM}  ↳ prompt-enrichment: the provider's first message is the gateway's "
          f"{first['role']} prompt: {first['content']!r}{RESET}")
    print(f"{DIM}  ↳ token-ratelimit: x-ratelimit-remaining-tokens={r.headers.get('x-ratelimit-remaining-tokens')} "
          f"of {r.headers.get('x-ratelimit-limit-tokens')} this window{RESET}")

    msg_b = body("Hello", model="open-mistral-nemo")
    r = gw.post(path, json_body=msg_b, headers=b)
    show("auth: Bob asks for a model his token does not allow on this route", curl_for(base, path, msg_b, {"authorization": "Bearer $BOB_TOKEN"}), r,
         "403 model_not_allowed")

    r = gw.get("/v1/models", headers=a)
    show("auth: /v1/models lists only what Alice may use", curl_for(base, "/v1/models", None, short), r)

    msg_s = body("Count to three", stream=True)
    r = gw.post(path, json_body=msg_s, headers=a)
    show("streaming through every filter (SSE)", curl_for(base, path, msg_s, short) + " -N", r,
         f"assembled text: {stream_text(r)!r}; the client did not ask for usage, so it got no usage chunk, "
         f"but usage-metrics counted the tokens")

    cache_and_rag(gw, a, short)

    msg_g = body("What is a credit card number of a real person?")
    r = gw.post(path, json_body=msg_g, headers=a)
    show("prompt-guard: a prompt that mentions credit cards", curl_for(base, path, msg_g, short), r,
         "403 with the configured message; the provider never saw it")

    msg_m = body("Give me an example Mastercard test number")
    r = gw.post(path, json_body=msg_m, headers={**a, "x-mock-text": "Try 5555 5555 5555 4444 in the sandbox."})
    show("prompt-guard: card numbers in the answer are masked", curl_for(base, path, msg_m, short), r)

    msg_f = body("Write me a 20 word pitch for a rate limiter")   # a new prompt: not in the cache
    openai.configure(rate_429=100, retry_after="30")
    r = gw.post(path, json_body=msg_f, headers=a)
    show("model-failover: openai answers 429 now", curl_for(base, path, msg_f, short), r,
         f"Envoy retried on the local provider within the same request (model {r.json().get('model') if r.ok else '-'}); "
         f"outlier detection ejected openai for 10 s")
    openai.configure(rate_429=0)

    rb = None
    for _ in range(6):
        rb = gw.post("/budget/v1/chat/completions", json_body=msg, headers=a)
        if rb.status_code == 429:
            break
    show("token-ratelimit: a route with a 120-token budget per minute, a few requests later",
         curl_for(base, "/budget/v1/chat/completions", msg, short), rb, "429 naming the window; retry-after says when it resets")

    time.sleep(1.5)  # stats flush
    prom = gw.envoy.prometheus()
    lines = [ln for ln in prom.splitlines() if ln.startswith("gen_ai_client_token_usage{")]
    print(f"\n{BOLD}▶ usage-metrics: Prometheus (curl -s http://127.0.0.1:{gw.envoy.admin_port}/stats/prometheus){RESET}")
    print("\n".join(lines[:8]) or "(no token metrics yet)")
    entries = gw.envoy.access_log()
    if entries:
        last = [e for e in entries if e.get("http.status") == 200][-1:] or entries[-1:]
        keep = {k: v for k, v in last[0].items() if k in (
            "http.status", "endpoint", "user", "team", "gen_ai.request.model", "gen_ai.response.model",
            "gen_ai.provider.name", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "ratelimit", "guard")}
        print(f"{BOLD}▶ access log (JSON, one line per request){RESET}\n{json.dumps(keep)}")
    del local


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tour-only", action="store_true", help="exit after the tour")
    ap.add_argument("--port", type=int, default=10000, help="gateway port (0 = any free port)")
    ap.add_argument("--admin-port", type=int, default=9901)
    args = ap.parse_args()

    workdir = WORK.parent / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    admin = args.admin_port if args.port else free_port()
    gw = None
    jwks = None
    chroma = None
    try:
        keys = workdir / "keys"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "mint-jwt"), "keygen", str(keys)], check=True,
                       capture_output=True)
        alice = mint(keys, "alice", "dev", "openai=gpt-4o-mini")
        bob = mint(keys, "bob", "ops", "mistralai=open-mistral-nemo")
        jwks_port = free_port() if not args.port else 18100
        jwks = serve_dir(keys, jwks_port)
        # The vector store for semantic-cache and rag: Chroma on 127.0.0.1, data under the
        # demo's work dir, stopped by PID (group) at the end.
        chroma_dir = workdir / "chroma"          # fresh each run: the tour starts with an empty cache
        shutil.rmtree(chroma_dir, ignore_errors=True)
        chroma_dir.mkdir(parents=True)
        chroma = Chroma(chroma_dir, CHROMA_PORT if args.port else None)
        used = config_ports((REPO / CONFIG).read_text())
        mocks = {p: m for p, m in PROVIDERS.items() if p in used}
        # Traces go to an OTLP/gRPC collector on 127.0.0.1:4317 when one runs (e.g. the compose
        # demo's Jaeger); with --port 0 the collector port is a free one too (spans dropped).
        fixed = {4317: 4317} if args.port else {}
        gw = Gateway(workdir, CONFIG, mocks=mocks,
                     ports={10000: port, 9901: admin, 18100: jwks_port, CHROMA_PORT: chroma.port, **fixed},
                     env={"OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "sk-demo-not-a-real-key")})
        print(f"{BOLD}sluice gateway listening on {gw.base}{RESET} (Envoy admin on http://127.0.0.1:{admin}, "
              f"logs in {workdir})")
        print("providers: " + ", ".join(f"{m.name} on 127.0.0.1:{m.port}" for m in gw.mocks.values())
              + f"; Chroma on {chroma.base}")
        subprocess.run([str(ROOT / "scripts" / "rag-load"), "--chroma", chroma.base, "--collection", "french-cheeses",
                        "--embeddings", f"{gw.mocks[18004].base}/v1/embeddings", "--model", "text-embedding-3-small",
                        "--reset", str(CORPUS)], check=True, capture_output=True, text=True, timeout=120)
        print(f"rag: loaded {CORPUS.relative_to(ROOT)} into Chroma collection french-cheeses")
        tour(gw, alice, bob)
        print(f"\n{BOLD}Try it yourself:{RESET}\n  export ALICE_TOKEN={alice}\n"
              f"  curl -s {gw.base}/v1/chat/completions -H \"authorization: Bearer $ALICE_TOKEN\" "
              f"-H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'")
        if args.tour_only:
            return 0
        print(f"\n{BOLD}Gateway is up on {gw.base}; press Ctrl-C to stop.{RESET}")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if gw:
            gw.stop()
        if jwks:
            jwks.shutdown()
        if chroma:
            chroma.stop()


if __name__ == "__main__":
    sys.exit(main())
