#!/usr/bin/env python3
"""A TEST FIXTURE, not a product: a minimal Envoy rate-limit service
(`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) over Redis, so the
token-ratelimit filter's shared mode can be tested with several Envoy processes. Operators
run Envoy's ratelimit service or Kuadrant's Limitador instead.

Semantics (those of envoyproxy/ratelimit for what the filter uses):
- each descriptor is one fixed, clock-aligned window: Redis key = domain + entries + unit +
  window start; `INCRBY hits` then `EXPIRE` for the window's length;
- hits = the descriptor's `hits_addend` when set, else the request's `hits_addend`, else 1
  (0 counts as 1, as Envoy's RLS does);
- the limit comes from the descriptor's `limit` override (requests_per_unit, unit); a
  descriptor without one is OK and not counted;
- a descriptor is OVER_LIMIT when its count after the increment exceeds the limit; the
  overall code is OVER_LIMIT when any descriptor is; the hits stay counted either way;
- Redis unreachable -> gRPC UNAVAILABLE (the filter then applies its failure mode).

Protobuf is hand-decoded (no codegen): grpcio's generic handler passes raw bytes.

usage: rls.py --port N --redis-port N   (prints `LISTENING 127.0.0.1:<port>` when ready)
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures

import grpc
import redis

UNIT_SECONDS = {1: 1, 2: 60, 3: 3600, 4: 86400}
OK, OVER_LIMIT = 1, 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes):
    """(field number, value) pairs; length-delimited values are bytes, varints ints."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield field, value


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, int):
        return _enc_varint(num << 3) + _enc_varint(value)
    return _enc_varint(num << 3 | 2) + _enc_varint(len(value)) + value


def parse_request(buf: bytes) -> tuple[str, list[dict], int]:
    domain, descriptors, hits = "", [], 0
    for f, v in fields(buf):
        if f == 1:
            domain = v.decode()
        elif f == 2:
            d = {"entries": [], "limit": None, "unit": None, "hits": None}
            for df, dv in fields(v):
                if df == 1:
                    e = dict(fields(dv))
                    d["entries"].append((e.get(1, b"").decode(), e.get(2, b"").decode()))
                elif df == 2:
                    lim = dict(fields(dv))
                    d["limit"], d["unit"] = lim.get(1, 0), lim.get(2, 0)
                elif df == 3:
                    d["hits"] = dict(fields(dv)).get(1, 0)
            descriptors.append(d)
        elif f == 3:
            hits = v
    return domain, descriptors, hits


class Service:
    def __init__(self, redis_port: int):
        self.redis = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2, socket_connect_timeout=1)

    def should_rate_limit(self, request: bytes, context) -> bytes:
        domain, descriptors, request_hits = parse_request(request)
        now = time.time()
        statuses, overall = [], OK
        try:
            for d in descriptors:
                unit_s = UNIT_SECONDS.get(d["unit"] or 0)
                if not d["limit"] or not unit_s:
                    statuses.append(_field(1, OK))
                    continue
                hits = d["hits"] if d["hits"] is not None else request_hits
                hits = hits or 1
                start = int(now // unit_s * unit_s)
                key = "|".join([domain] + [f"{k}={v}" for k, v in d["entries"]] + [str(d["unit"]), str(start)])
                pipe = self.redis.pipeline()
                pipe.incrby(key, hits)
                pipe.expire(key, unit_s)
                count = pipe.execute()[0]
                code = OVER_LIMIT if count > d["limit"] else OK
                overall = OVER_LIMIT if code == OVER_LIMIT else overall
                reset = max(1, int(start + unit_s - now + 0.999))
                status = (_field(1, code) + _field(2, _field(1, d["limit"]) + _field(2, d["unit"]))
                          + _field(3, max(0, d["limit"] - count)) + _field(4, _field(1, reset)))
                statuses.append(status)
        except redis.exceptions.RedisError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {e}")
        return _field(1, overall) + b"".join(_field(2, s) for s in statuses)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    args = ap.parse_args()
    svc = Service(args.redis_port)
    handler = grpc.method_handlers_generic_handler(
        "envoy.service.ratelimit.v3.RateLimitService",
        {"ShouldRateLimit": grpc.unary_unary_rpc_method_handler(svc.should_rate_limit)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
