#!/usr/bin/env python3
"""The sluice demo tour: real Envoy with the sluice filters in front of mock providers.

Started by scripts/demo.sh (which installs and builds first). Each tour step prints the
curl command a user would type and what came back.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import requests  # noqa: E402

from harness import ROOT as REPO, WORK, Gateway, config_ports, free_port  # noqa: E402

CONFIG = "envoy/envoy.yaml"
# The providers envoy/envoy.yaml points at (see its clusters).
PROVIDERS = {
    18001: {"name": "openai", "model": "gpt-4o-mini"},
    18002: {"name": "local", "model": "qwen-0.5b"},
}

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def show(title: str, curl: str, resp: requests.Response, note: str = "") -> None:
    print(f"\n{BOLD}▶ {title}{RESET}")
    print(f"{DIM}$ {curl}{RESET}")
    ctype = resp.headers.get("content-type", "")
    print(f"HTTP {resp.status_code}  " + "  ".join(
        f"{k}: {v}" for k, v in resp.headers.items()
        if k.startswith(("x-ratelimit", "retry-after", "x-envoy-ratelimited", "x-mock-provider", "www-authenticate"))))
    text = resp.text
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


def tour(gw: Gateway) -> None:
    base = gw.base
    path = "/v1/chat/completions"

    b = body("Write me a 20 word pitch for a service mesh")
    r = gw.post(path, json_body=b)
    show("A chat completion through Envoy to a provider (no model in the request)", curl_for(base, path, b), r,
         "the gateway picked the provider and model")

    b = body("Count to three", stream=True, stream_options={"include_usage": True})
    r = gw.post(path, json_body=b)
    show("The same, streamed (SSE)", curl_for(base, path, b) + " -N", r)

    r = gw.get("/v1/models")
    show("Models", curl_for(base, "/v1/models", None), r)


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
    try:
        used = config_ports((REPO / CONFIG).read_text())
        mocks = {p: m for p, m in PROVIDERS.items() if p in used}
        gw = Gateway(workdir, CONFIG, mocks=mocks, ports={10000: port, 9901: admin})
        print(f"{BOLD}sluice gateway listening on {gw.base}{RESET} (Envoy admin on http://127.0.0.1:{admin}, "
              f"logs in {workdir})")
        print("providers: " + ", ".join(f"{m.name} on 127.0.0.1:{m.port}" for m in gw.mocks.values()))
        tour(gw)
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


if __name__ == "__main__":
    sys.exit(main())
