"""A TLS-terminating TCP proxy in front of a plaintext mock provider, for e2e tests of
clusters that speak TLS to a public provider (SNI, certificate validation against a CA).

    ca = ProviderCA(workdir)                                  # CA + leaf for "api.openai.com"
    proxy = TlsProxy(workdir, upstream_port=mock.port, ca=ca, name="openai")
    gateway(cfg, ports={18001: proxy.port})               # the cluster's TLS endpoint
    proxy.connections()                                   # [{"sni": "api.openai.com", ...}, ...]

The CA and the leaf certificate are made with the `cryptography` package (in .venv); the proxy
is its own process (this file run as a script), bound to 127.0.0.1 and stopped by PID. It
logs every TLS handshake (the SNI the client sent, the negotiated ALPN) as one JSON line and
forwards the decrypted bytes to the upstream unchanged.

Script usage: tls_mock.py --cert C --key K --upstream-port P --log FILE  (prints LISTENING port)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path


class ProviderCA:
    """A throwaway CA and one server certificate (SAN: DNS names given) signed by it."""

    def __init__(self, workdir: Path, names: tuple[str, ...] = ("api.openai.com",)):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice e2e test CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_path = workdir / "test-ca.pem"
        self.cert_path = workdir / "server.pem"
        self.key_path = workdir / "server.key"
        self.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))


class TlsProxy:
    """The proxy process (this file as a script); `port` is where it accepts TLS."""

    def __init__(self, workdir: Path, upstream_port: int, ca: ProviderCA, name: str = "tls"):
        self.log_path = workdir / f"tls-{name}.jsonl"
        self.stderr_path = workdir / f"tls-{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--cert", str(ca.cert_path), "--key", str(ca.key_path),
                 "--upstream-port", str(upstream_port), "--log", str(self.log_path)],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            )
        line = self.proc.stdout.readline().strip()
        m = re.match(r"LISTENING (\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"TLS proxy did not start: {line!r}; see {self.stderr_path}")
        self.port = int(m.group(1))

    def connections(self) -> list[dict]:
        try:
            return [json.loads(l) for l in self.log_path.read_text().splitlines() if l.strip()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    socks = [a, b]
    try:
        while True:
            readable, _, _ = select.select(socks, [], [], 300)
            if not readable:
                return
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except (OSError, ssl.SSLError):
        return
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def _serve(args) -> None:
    lock = threading.Lock()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    seen: dict[int, str | None] = {}

    def sni(sock, name, _ctx):
        seen[id(sock)] = name

    ctx.sni_callback = sni
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(64)
    print(f"LISTENING {srv.getsockname()[1]}", flush=True)

    def handle(raw: socket.socket) -> None:
        try:
            tls = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            with lock, open(args.log, "a") as f:
                f.write(json.dumps({"handshake": "failed", "error": str(e)}) + "\n")
            raw.close()
            return
        with lock, open(args.log, "a") as f:
            f.write(json.dumps({"handshake": "ok", "sni": seen.pop(id(tls), None),
                                "alpn": tls.selected_alpn_protocol(), "version": tls.version()}) + "\n")
        up = socket.create_connection(("127.0.0.1", args.upstream_port))
        _pipe(tls, up)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--port", type=int, default=0)
    _serve(p.parse_args())
