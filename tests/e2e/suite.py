"""The full demo gateway (envoy/envoy.yaml, or the same suite as separate filters) for tests:
JWT keys, a JWKS server, two mock providers, and one request helper that speaks HTTP/1.1,
HTTP/2 (h2c) or HTTP/2 ending with a trailers frame."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import requests

from h2client import h2_request
from harness import MINT, Gateway, JwksServer

DEMO = "envoy/envoy.yaml"
SEPARATE = "examples/separate-filters/envoy.yaml"
PROVIDERS = {18001: {"name": "openai", "model": "gpt-4o-mini"}, 18002: {"name": "local", "model": "qwen-0.5b"}}
TRANSPORTS = ["h1", "h2", "h2-trailers"]


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Suite:
    """The demo gateway with its JWKS and two providers; stop() stops everything."""

    def __init__(self, workdir: Path, config: str = DEMO):
        self.keys = workdir / "keys"
        self.jwks = JwksServer.with_key(self.keys, "sluice-demo")
        try:
            self.gw = Gateway(workdir, config, mocks=dict(PROVIDERS), ports={18100: self.jwks.port},
                              env={"OPENAI_API_KEY": "sk-gateway-key"})
        except Exception:
            self.jwks.stop()
            raise
        self.openai, self.local = self.gw.mocks[18001], self.gw.mocks[18002]

    def token(self, sub: str, team: str, llms: dict, kid: str = "sluice-demo", key: Path | None = None) -> str:
        return MINT.mint(key or self.keys / "private.pem", sub, team, {"org": "acme"}, llms, iss="sluice-demo", kid=kid)

    def send(self, transport: str, path: str, body: dict | bytes, headers: dict | None = None) -> Reply:
        """POST `body` over `transport` (h1, h2, h2-trailers); h2 bodies go in two DATA frames."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        if transport == "h1":
            r = requests.post(self.gw.url(path), data=data, headers=hdrs, timeout=30)
            return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
        half = len(data) // 2
        trailers = {"x-client-trailer": "done"} if transport == "h2-trailers" else None
        r = h2_request(self.gw.envoy.listener_port, "POST", path, hdrs, [data[:half], data[half:]], trailers=trailers)
        return Reply(r.status, r.headers, r.body)

    def stop(self) -> None:
        self.gw.stop()
        self.jwks.stop()
