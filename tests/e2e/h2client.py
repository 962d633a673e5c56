"""A small HTTP/2 cleartext (h2c, prior knowledge) client for the end-to-end tests.

`requests` speaks HTTP/1.1 only, and no common Python client can end a request with a
trailers frame, which is the case the gateway must treat exactly like END_STREAM on the last
DATA frame. This client drives the `h2` state machine over one socket:

    resp = h2_request(port, "POST", "/v1/chat/completions", headers, body, trailers={"x-t": "1"})
    resp.status, resp.headers, resp.body, resp.trailers

`body` may be bytes or a list of chunks (each sent as its own DATA frame); with `trailers` the
last DATA frame does not carry END_STREAM and a HEADERS frame with the trailers ends the stream.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def h2_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
               body: bytes | str | list[bytes] | None = None, trailers: dict[str, str] | None = None,
               host: str = "127.0.0.1", timeout: float = 30.0) -> H2Response:
    """One request on a fresh h2c connection; returns the whole response."""
    if isinstance(body, str):
        body = body.encode()
    chunks: list[bytes] = body if isinstance(body, list) else ([body] if body else [])
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", f"{host}:{port}")]
        hdrs += [(k.lower(), v) for k, v in (headers or {}).items()]
        no_body = not chunks and not trailers
        conn.send_headers(sid, hdrs, end_stream=no_body)
        sock.sendall(conn.data_to_send())
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1 and not trailers
            _send_data(conn, sock, sid, chunk, end_stream=last)
        if trailers:
            conn.send_headers(sid, [(k.lower(), v) for k, v in trailers.items()], end_stream=True)
            sock.sendall(conn.data_to_send())
        return _read_response(conn, sock, sid)
    finally:
        sock.close()


def _send_data(conn, sock, sid: int, data: bytes, end_stream: bool) -> None:
    """Send `data`, respecting flow control and the peer's frame size."""
    view = memoryview(data)
    while True:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window <= 0 and len(view) > 0:
            _pump(conn, sock)  # wait for WINDOW_UPDATE
            continue
        piece, view = view[:window], view[window:]
        conn.send_data(sid, bytes(piece), end_stream=end_stream and len(view) == 0)
        sock.sendall(conn.data_to_send())
        if len(view) == 0:
            return


def _pump(conn, sock) -> list:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("connection closed by the server")
    events = conn.receive_data(data)
    out = conn.data_to_send()
    if out:
        sock.sendall(out)
    return events


def _read_response(conn, sock, sid: int) -> H2Response:
    status, headers, body, trailers, reset = 0, {}, bytearray(), {}, False
    done = False
    while not done:
        try:
            events = _pump(conn, sock)
        except ConnectionError:
            break
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                headers = {k: v for k, v in ev.headers}
                status = int(headers.pop(":status", "0"))
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                sock.sendall(conn.data_to_send())
            elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                trailers = {k: v for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                reset, done = True, True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                done = True
    return H2Response(status, headers, bytes(body), trailers, reset)
