"""End-to-end harness: real Envoy 1.40 with the built .wasm filters, mock providers, real HTTP.

Port conventions in every envoy.yaml under envoy/ and examples/ (the files stay valid for
`envoy --mode validate` and runnable by hand from the repo root):
  10000        the gateway listener
  9901         Envoy admin
  18000-18999  upstreams: mock providers, JWKS servers, rate-limit services...
The harness renders a config by giving every such port a free one on 127.0.0.1 (an
upstream port with no mock behind it stays closed: connection refused, i.e. an invalid
host) and by making `target/...` wasm paths absolute.

One line starts a gateway in a test (the `gateway` fixture of conftest.py stops it after):
    gw = gateway("examples/traffic-shift/envoy.yaml", mocks={18001: {"model": "a"}})
JWKS endpoints for auth come from `JwksServer` (the `jwks_servers` fixture stops them).
"""
from __future__ import annotations

import http.server
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
ENVOY = Path(os.environ.get("SLUICE_ENVOY", VENV_BIN / "envoy"))
# SLUICE_TARGET_DIR points the configs' `target/...` wasm paths at another cargo target dir
# (a developer building in a private target dir); the default is the repo's own.
TARGET_DIR = Path(os.environ.get("SLUICE_TARGET_DIR", ROOT / "target"))
WASM_DIR = TARGET_DIR / "wasm32-wasip1" / "release"
MOCK_BIN = Path(os.environ.get("SLUICE_MOCK_BIN", ROOT / "target" / "release" / "sluice-mock-provider"))
WORK = ROOT / ".work" / "e2e"

LISTENER_PORT = 10000
ADMIN_PORT = 9901
UPSTREAM_PORTS = range(18000, 19000)


# Listening ports come from a block of their own per pytest-xdist worker, below the kernel's
# ephemeral range. Port 0 ("any free port") is not safe here: it hands out ports of the
# ephemeral range, which the client sockets of the other worker keep taking as their local
# ports, so a port found free could be taken before Envoy bound it ("Address already in use").
PORT_BLOCKS = range(20000, 32000)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    top = min(PORT_BLOCKS.stop, _ephemeral_floor())
    if not worker:  # scripts and a plain pytest run: one more block, after the workers' ones
        index, count = count, count + 1
    size = (top - PORT_BLOCKS.start) // max(count, 1)
    start = PORT_BLOCKS.start + index * size
    return range(start, start + size)


_BLOCK = _port_block()
_next_port = _BLOCK.start + os.getpid() % max(len(_BLOCK), 1)


def free_port() -> int:
    """A port of this process's block that nothing listens on now (each call a new one)."""
    global _next_port
    for _ in range(len(_BLOCK)):
        port = _next_port
        _next_port = _BLOCK.start + (port + 1 - _BLOCK.start) % len(_BLOCK)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_BLOCK}")


def _load_mint():
    """scripts/mint-jwt as a module (keygen, mint): the one way tests make keys and tokens."""
    loader = importlib.machinery.SourceFileLoader("mint_jwt", str(ROOT / "scripts" / "mint-jwt"))
    spec = importlib.util.spec_from_loader("mint_jwt", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


MINT = _load_mint()


class _ReusableHTTPServer(http.server.ThreadingHTTPServer):
    # A stopped server's port can be bound again at once (stop/start simulates an outage).
    allow_reuse_address = True
    daemon_threads = True


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 (a thread) that answers every GET with `jwks`; `jwks` can
    change while it runs; stop/start on the same port simulate an identity-provider outage;
    `delay` (seconds) holds each answer, so a test can act while a fetch is still out; `hits`
    counts the fetches. `JwksServer.with_key(dir)` also makes the signing key (scripts/mint-jwt)
    and mints tokens with it (`token`)."""

    def __init__(self, jwks: dict, port: int | None = None, start: bool = True):
        self.jwks = jwks
        self.port = port or free_port()
        self.hits = 0
        self.delay = 0.0
        self.key: Path | None = None
        self.kid: str | None = None
        self.httpd: http.server.ThreadingHTTPServer | None = None
        if start:
            self.start()

    @classmethod
    def with_key(cls, directory: Path, kid: str = "sluice-demo", alg: str = "RS256") -> JwksServer:
        server = cls(MINT.keygen(directory, kid, alg))
        server.key, server.kid = directory / "private.pem", kid
        return server

    def token(self, sub: str, team: str | None = None, claims: dict | None = None, llms: dict | None = None,
              **kw) -> str:
        """A token signed with this server's key (`with_key`); `kw` as scripts/mint-jwt's mint()."""
        assert self.key is not None, "JwksServer.token needs a server made by JwksServer.with_key"
        return MINT.mint(self.key, sub, team, claims, llms, kid=kw.pop("kid", self.kid), **kw)

    def start(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                if outer.delay:
                    time.sleep(outer.delay)
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = _ReusableHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class GiveUp(Exception):
    """Raised by a wait_for predicate when waiting longer cannot help (the process died)."""


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except GiveUp:
            raise
        except Exception as e:  # noqa: BLE001 - polling
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def _stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


class Mock:
    """One mock OpenAI-compatible provider process (tests/mock-provider)."""

    def __init__(self, workdir: Path, name: str, **settings: Any):
        self.name = name
        self.log_path = workdir / f"mock-{name}.jsonl"
        self.stderr_path = workdir / f"mock-{name}.stderr"
        args = [str(MOCK_BIN), "--port", "0", "--name", name, "--log", str(self.log_path)]
        for k, v in settings.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            elif v is False or v is None:
                continue
            else:
                args += [flag, str(v)]
        # The child keeps its own copy of the log's descriptor; ours is closed at once.
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        line = self._read_line(10.0)
        m = re.match(r"LISTENING 127\.0\.0\.1:(\d+)", line or "")
        if not m:
            self.stop()
            raise RuntimeError(f"mock {name} did not start: {line!r}; see {self.stderr_path}")
        self.port = int(m.group(1))
        self.base = f"http://127.0.0.1:{self.port}"

    def _read_line(self, timeout: float) -> str | None:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return out[0].strip() if out else None

    def log(self) -> list[dict]:
        """Every request this provider received, oldest first."""
        return requests.get(f"{self.base}/__mock/log", timeout=5).json()

    def clear_log(self) -> None:
        requests.delete(f"{self.base}/__mock/log", timeout=5)

    def configure(self, **settings: Any) -> None:
        """Change failure injection etc. at run time (snake_case flag names)."""
        r = requests.post(f"{self.base}/__mock/config", json=settings, timeout=5)
        r.raise_for_status()

    def models_seen(self) -> list[str | None]:
        return [e.get("model") for e in self.log() if e["path"].endswith("/chat/completions")]

    def stop(self) -> None:
        _stop(self.proc)


class Envoy:
    """A real Envoy process running a rendered config."""

    def __init__(self, workdir: Path, config_path: Path, port_map: dict[int, int], concurrency: int = 2,
                 env: dict[str, str] | None = None, log_level: str = "warn"):
        self.workdir = workdir
        self.port_map = port_map
        self.listener_port = port_map.get(LISTENER_PORT)
        self.admin_port = port_map[ADMIN_PORT]
        self.base = f"http://127.0.0.1:{self.listener_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.rendered = workdir / f"envoy-{config_path.parent.name}.yaml"
        self.log_path = workdir / "envoy.log"
        self.access_log_path = workdir / "access.log"
        self.rendered.write_text(render_config(config_path.read_text(), port_map, str(self.access_log_path)))
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(self.rendered), "--concurrency", str(concurrency), "--disable-hot-restart",
             "--log-level", log_level, "--log-path", str(self.log_path), "--file-flush-interval-msec", "100"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )
        try:
            wait_for(self._ready, 60.0, f"Envoy ready ({self.rendered})")
        except Exception:
            self.stop()
            raise RuntimeError(f"Envoy did not become ready; log tail:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise GiveUp(f"Envoy exited with {self.proc.returncode}")
        r = requests.get(f"{self.admin}/ready", timeout=1)
        if r.status_code != 200:
            return False
        if self.listener_port is None:
            return True
        with socket.create_connection(("127.0.0.1", self.listener_port), timeout=1):
            return True

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def url(self, path: str) -> str:
        return self.base + path

    def stats(self, filter_re: str | None = None) -> dict[str, int]:
        params = {"filter": filter_re} if filter_re else {}
        text = requests.get(f"{self.admin}/stats", params=params, timeout=5).text
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def prometheus(self) -> str:
        return requests.get(f"{self.admin}/stats/prometheus", timeout=5).text

    def access_log(self) -> list[dict]:
        try:
            lines = self.access_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_access_log(self, pred, timeout: float = 10.0, what: str = "access log lines") -> list[dict]:
        """Entries of the access log once `pred(entries)` holds (Envoy flushes the file every 100 ms)."""
        return wait_for(lambda: (lambda e: e if pred(e) else None)(self.access_log()), timeout, what)

    def stop(self) -> None:
        _stop(self.proc)


CHROMA = Path(os.environ.get("SLUICE_CHROMA", VENV_BIN / "chroma"))


class Chroma:
    """A real Chroma vector database (PyPI `chromadb`: `chroma run`) on 127.0.0.1 with its data
    in a temp dir under the test's workdir; stopped by PID group, also when a test fails."""

    API = "/api/v2/tenants/default_tenant/databases/default_database"

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.path = workdir / f"chroma-{self.port}"
        self.log_path = workdir / f"chroma-{self.port}.log"
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, ANONYMIZED_TELEMETRY="False", NO_COLOR="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(CHROMA), "run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        try:
            wait_for(self._heartbeat, 60.0, f"Chroma heartbeat on {self.base}")
        except Exception:
            self.stop()
            raise RuntimeError(f"Chroma did not start; see {self.log_path}")

    def _heartbeat(self) -> bool:
        if self.proc.poll() is not None:
            raise GiveUp(f"chroma exited with {self.proc.returncode}")
        return requests.get(f"{self.base}/api/v2/heartbeat", timeout=1).status_code == 200

    def collection(self, name: str) -> str:
        """Get or create collection `name` (cosine space); returns its id."""
        r = requests.post(f"{self.base}{self.API}/collections", timeout=10,
                          json={"name": name, "get_or_create": True, "configuration": {"hnsw": {"space": "cosine"}}})
        r.raise_for_status()
        return r.json()["id"]

    def count(self, name: str) -> int:
        """Items in collection `name` (0 when it does not exist)."""
        r = requests.get(f"{self.base}{self.API}/collections/{name}", timeout=10)
        if r.status_code == 404:
            return 0
        r.raise_for_status()
        c = requests.get(f"{self.base}{self.API}/collections/{r.json()['id']}/count", timeout=10)
        c.raise_for_status()
        return int(c.json())

    def get(self, name: str) -> dict:
        """Every item of collection `name` (ids, documents, metadatas)."""
        cid = self.collection(name)
        r = requests.post(f"{self.base}{self.API}/collections/{cid}/get", timeout=10,
                          json={"include": ["documents", "metadatas"]})
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        _stop(self.proc)


def render_config(text: str, port_map: dict[int, int], access_log: str | None = None) -> str:
    def port(m: re.Match) -> str:
        p = int(m.group(2))
        return f"{m.group(1)}{port_map.get(p, p)}"

    text = re.sub(r"(port_value:\s*)(\d+)", port, text)
    # Ports inside URLs / strings, e.g. a JWKS uri "http://127.0.0.1:18101/jwks".
    text = re.sub(r"(127\.0\.0\.1:)(\d+)", port, text)
    text = text.replace("filename: target/", f"filename: {TARGET_DIR}/")
    if access_log:
        text = text.replace("path: /dev/stdout", f"path: {access_log}")
    return text


def config_variant(workdir: Path, config: Path, replace: dict[str, str] | None) -> Path:
    """`config` with each key of `replace` (which must occur) replaced by its value, written to
    `workdir`; `config` itself when there is nothing to replace."""
    if not replace:
        return config
    text = config.read_text()
    for a, b in replace.items():
        assert a in text, a
        text = text.replace(a, b)
    variant = workdir / "envoy-variant.yaml"
    variant.write_text(text)
    return variant


def config_ports(text: str) -> set[int]:
    ports = {int(p) for p in re.findall(r"port_value:\s*(\d+)", text)}
    ports |= {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}
    return ports


class Gateway:
    """Envoy plus the mock providers its config points at."""

    def __init__(self, workdir: Path, config: str | Path, mocks: dict[int, dict] | None = None,
                 concurrency: int = 2, env: dict[str, str] | None = None, ports: dict[int, int] | None = None,
                 composed: bool = False):
        """`ports` maps config ports to servers the test runs itself (JWKS, rate-limit service...);
        `composed` runs the config's sluice filters as the composed gateway (tests/e2e/compose.py)."""
        self.workdir = workdir
        self.mocks: dict[int, Mock] = {}
        self.envoy: Envoy | None = None
        config_path = (ROOT / config) if not Path(config).is_absolute() else Path(config)
        text = config_path.read_text()
        if composed:
            from compose import compose_yaml

            text = compose_yaml(text)
            composed_dir = workdir / f"composed-{config_path.parent.name}"
            composed_dir.mkdir(parents=True, exist_ok=True)
            config_path = composed_dir / config_path.name
            config_path.write_text(text)
        try:
            port_map: dict[int, int] = {}
            for p in sorted(config_ports(text)):
                settings = (mocks or {}).get(p)
                if ports and p in ports:
                    port_map[p] = ports[p]
                elif settings is not None:
                    settings = dict(settings)
                    name = settings.pop("name", f"p{p}")
                    mock = Mock(workdir, name, **settings)
                    self.mocks[p] = mock
                    port_map[p] = mock.port
                else:
                    port_map[p] = free_port()
            missing = set((mocks or {})) - set(port_map)
            if missing:
                raise ValueError(f"mocks for ports {sorted(missing)} not used by {config}")
            self.envoy = Envoy(workdir, config_path, port_map, concurrency=concurrency, env=env)
        except Exception:
            self.stop()
            raise
        self.base = self.envoy.base

    def url(self, path: str) -> str:
        return self.base + path

    def post(self, path: str = "/v1/chat/completions", json_body: Any = None, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.post(self.url(path), json=json_body, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.get(self.url(path), **kw)

    def stop(self) -> None:
        if self.envoy:
            self.envoy.stop()
        for m in self.mocks.values():
            m.stop()


def chat(text: str = "Hello", model: str | None = None, stream: bool = False, **extra) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def sse_events(resp: requests.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    out = []
    for block in resp.text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") if line.startswith("data:") else None for line in block.split("\n")]
        data = [d for d in data if d is not None]
        if data:
            out.append("\n".join(data))
    return out


def clean_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
