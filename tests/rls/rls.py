#!/usr/bin/env python3
"""A TEST FIXTURE, not a product: a minimal Envoy rate-limit service
(`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) over Redis, so the
token-ratelimit filter's shared mode can be tested with several Envoy processes. Operators
run Envoy's ratelimit service (envoyproxy/ratelimit) or Kuadrant's Limitador instead.

Schema: the messages are the ones generated from Envoy's own .proto files (PyPI
`xds-protos`, pinned in tests/requirements.txt) and the servicer is registered with the
generated `add_RateLimitServiceServicer_to_server`, so every request is parsed by the real
schema. xds-protos 1.85.0 predates Envoy 1.38's `RateLimitDescriptor.is_negative_hits`
(field 4, bool: the wire has no request-level flag); the fixture adds exactly that field to a
copy of the generated descriptors (`RateLimitRequestV138`), as in Envoy's API since 1.38.
A request carrying any other field the schema does not know (a wrong field number, or a known
field with the wrong wire type, e.g. `hits_addend` as a plain varint instead of a
`UInt64Value` message) is logged and rejected with INVALID_ARGUMENT and counts nothing, so an
encoding mistake in a client fails its tests instead of being silently ignored.

Semantics (those of envoyproxy/ratelimit with its Redis backend: src/utils/utilities.go
GetHitsAddends, src/limiter/cache_key.go, src/redis/fixed_cache_impl.go DoLimit,
src/limiter/base_limiter.go GetResponseDescriptorStatus, src/service/ratelimit.go):
- each descriptor with a `limit` override (requests_per_unit, unit) is one fixed window aligned
  to the clock: Redis key `<domain>_<key>_<value>_..._<window start>` (window start = now in
  whole seconds rounded down to a multiple of the unit; the unit itself is not in the key,
  as upstream); `INCRBY hits` then `EXPIRE <unit seconds>`; a descriptor without an override
  matches no limit (the fixture has no limits file): OK, nothing counted; units SECOND, MINUTE,
  HOUR, DAY, WEEK, MONTH (30 days), YEAR (365 days); another unit is INVALID_ARGUMENT;
- hits = the descriptor's `hits_addend` (UInt64Value) when it is set, even to 0 (0 = check
  only: nothing added); else the request's `hits_addend` (uint32), where 0 (unset) counts as 1;
- a descriptor is OVER_LIMIT when its count after the increment exceeds requests_per_unit
  (a limit of 0 refuses everything); the hits stay counted either way (upstream default,
  STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=false, no local over-limit cache); the overall code
  is OVER_LIMIT when any descriptor is;
- negative hits (`is_negative_hits: true` on a descriptor, hits computed as above): the counter
  is decremented, floored at 0; an absent key stays absent (nothing to refund); the status is
  always OK, limit_remaining = max(0, limit - count after the refund); it never makes the
  overall code OVER_LIMIT. This follows envoyproxy/ratelimit PR #1140 (its DecrementScript and
  GetResponseDescriptorStatusForNegativeHits); upstream main has no negative hits yet;
- `--no-negative-hits`: a service built on the pre-1.38 schema: field 4 is unknown to it and
  proto3 ignores unknown fields, so the "refund" is counted as ordinary positive hits (and can
  answer OVER_LIMIT). The fixture logs the ignored field but does not reject it; any other
  unknown field is still rejected;
- every status of a counted descriptor carries current_limit (requests_per_unit, unit),
  limit_remaining (limit - count after the increment, 0 when over) and duration_until_reset
  (unit - now % unit, whole seconds);
- an empty domain or no descriptors: gRPC UNKNOWN (upstream's serviceError);
- Redis unreachable -> gRPC UNAVAILABLE, at once: no client-side retries or backoff (a retried
  write could land after the caller gave up, or twice), and a request whose gRPC deadline has
  already passed is refused with DEADLINE_EXCEEDED before touching Redis. The redis client
  reconnects on the next call, so counting resumes when Redis is back.

usage: rls.py --port N --redis-port N [--no-negative-hits]
       (127.0.0.1 only; prints `LISTENING 127.0.0.1:<port>` when ready; --port 0 picks one)
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures

import grpc
import redis
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from redis.backoff import NoBackoff
from redis.retry import Retry

Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
# utils.UnitToDivider
UNIT_SECONDS = {Unit.SECOND: 1, Unit.MINUTE: 60, Unit.HOUR: 3600, Unit.DAY: 86400,
                Unit.WEEK: 7 * 86400, Unit.MONTH: 30 * 86400, Unit.YEAR: 365 * 86400}

RATELIMIT_PROTO = "envoy/extensions/common/ratelimit/v3/ratelimit.proto"
NEGATIVE_HITS_FIELD = 4  # envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.is_negative_hits

# envoyproxy/ratelimit PR #1140, limiter.DecrementScript: refund floored at 0, no phantom key.
DECREMENT_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == false then return 0 end
local new_val = math.floor(math.max(0, tonumber(current) - tonumber(ARGV[1])))
redis.call('SET', KEYS[1], tostring(new_val))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return new_val
"""


def _request_class_with_negative_hits():
    """`RateLimitRequest` whose descriptors know `bool is_negative_hits = 4` (Envoy >= 1.38):
    the generated file descriptors copied into a private pool, that one field added."""
    pool = descriptor_pool.DescriptorPool()
    done: set[str] = set()

    def add(fd):
        if fd.name in done:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        if fd.name == RATELIMIT_PROTO:
            msg = next(m for m in proto.message_type if m.name == "RateLimitDescriptor")
            have = {f.name: f.number for f in msg.field}
            if "is_negative_hits" not in have:
                msg.field.add(name="is_negative_hits", number=NEGATIVE_HITS_FIELD, json_name="isNegativeHits",
                              type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                              label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
            elif have["is_negative_hits"] != NEGATIVE_HITS_FIELD:
                raise RuntimeError(f"is_negative_hits is field {have['is_negative_hits']} in this xds-protos")
        pool.Add(proto)
        done.add(fd.name)

    add(rls_pb2.DESCRIPTOR)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("envoy.service.ratelimit.v3.RateLimitRequest"))


RateLimitRequestV138 = _request_class_with_negative_hits()
RateLimitDescriptorV138 = message_factory.GetMessageClass(
    RateLimitRequestV138.DESCRIPTOR.fields_by_name["descriptors"].message_type)


def unknown(msg, path: str = "") -> list[tuple[str, int, int]]:
    """Every field the schema did not recognise, anywhere in `msg`: (path, number, wire type)."""
    path = path or msg.DESCRIPTOR.name
    out = [(path, f.field_number, f.wire_type) for f in unknown_fields.UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        for i, v in enumerate(value if fd.is_repeated else [value]):
            out += unknown(v, f"{path}.{fd.name}[{i}]" if fd.is_repeated else f"{path}.{fd.name}")
    return out


def log(msg: str) -> None:
    print(f"rls: {msg}", file=sys.stderr, flush=True)


class Service(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, redis_port: int, negative_hits: bool = True):
        self.negative_hits = negative_hits
        # No retries and short timeouts: fail fast with UNAVAILABLE rather than let a write land
        # seconds later, after the caller has given up (redis-py 8 retries 10 times by default).
        self.redis = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=1, socket_connect_timeout=0.5,
                                 retry=Retry(NoBackoff(), 0))
        self.decrement = self.redis.register_script(DECREMENT_SCRIPT)

    def _parse(self, request, context):
        """The request under the schema this service speaks, or abort INVALID_ARGUMENT."""
        if self.negative_hits:
            request = RateLimitRequestV138.FromString(request.SerializeToString())
        bad = unknown(request)
        if not self.negative_hits:
            ignored = [u for u in bad if ".descriptors[" in u[0] and u[0].count(".") == 1
                       and u[1] == NEGATIVE_HITS_FIELD and u[2] == 0]
            for path, num, _ in ignored:
                log(f"ignoring unknown field {num} at {path} (is_negative_hits: not in this service's schema); "
                    "its hits are counted as positive hits")
            bad = [u for u in bad if u not in ignored]
        if bad:
            what = ", ".join(f"{p}: field {n} wire type {w}" for p, n, w in bad)
            log(f"rejected request with unknown fields ({what})")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown fields in RateLimitRequest: {what}")
        return request

    def ShouldRateLimit(self, request, context):  # noqa: N802 - generated servicer's name
        request = self._parse(request, context)
        if not request.domain:
            context.abort(grpc.StatusCode.UNKNOWN, "rate limit domain must not be empty")
        if not request.descriptors:
            context.abort(grpc.StatusCode.UNKNOWN, "rate limit descriptor list must not be empty")
        plan = []  # (descriptor index, descriptor, hits, negative) for descriptors with a limit
        for i, d in enumerate(request.descriptors):
            if not d.HasField("limit"):
                continue  # no override and no limits file: matches no limit
            if d.limit.unit not in UNIT_SECONDS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"descriptors[{i}]: limit unit {d.limit.unit}")
            # utils.GetHitsAddends: descriptor-level when set (0 allowed), else max(1, request-level)
            hits = d.hits_addend.value if d.HasField("hits_addend") else max(1, request.hits_addend)
            negative = self.negative_hits and d.is_negative_hits
            plan.append((i, d, hits, negative))
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s <= 0:
            log("deadline passed before counting: nothing counted")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before counting")
        now = int(time.time())
        statuses = [rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK) for _ in request.descriptors]
        overall = Code.OK
        try:
            pipe = self.redis.pipeline(transaction=False)
            for _, d, hits, negative in plan:
                div = UNIT_SECONDS[d.limit.unit]
                key = cache_key(request.domain, d, now, div)
                if negative:
                    self.decrement(keys=[key], args=[hits, div], client=pipe)
                else:
                    pipe.incrby(key, hits)
                    pipe.expire(key, div)
            results = pipe.execute()
        except redis.exceptions.RedisError as e:
            log(f"redis: {e}")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {e}")
        pos = 0
        for i, d, hits, negative in plan:
            count = int(results[pos])
            pos += 1 if negative else 2
            limit, unit, div = d.limit.requests_per_unit, d.limit.unit, UNIT_SECONDS[d.limit.unit]
            st = statuses[i]
            st.current_limit.requests_per_unit, st.current_limit.unit = limit, unit
            st.duration_until_reset.seconds = div - now % div  # utils.CalculateReset
            if not negative and count > limit:
                st.code, st.limit_remaining = Code.OVER_LIMIT, 0
                overall = Code.OVER_LIMIT
            else:
                st.code, st.limit_remaining = Code.OK, max(0, limit - count)
        return rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)


def cache_key(domain: str, d, now: int, div: int) -> str:
    """limiter.CacheKeyGenerator.GenerateCacheKey (no prefix): domain_k1_v1_k2_v2_<window start>."""
    return domain + "_" + "".join(f"{e.key}_{e.value}_" for e in d.entries) + str(now // div * div)


def serve(port: int, redis_port: int, negative_hits: bool = True) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Service(redis_port, negative_hits), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise SystemExit(f"rls: cannot listen on 127.0.0.1:{port}")
    server.start()
    return server, bound


def main() -> int:
    ap = argparse.ArgumentParser(description="test-only Envoy rate-limit service over Redis")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--no-negative-hits", action="store_true",
                    help="behave like a service without is_negative_hits (pre-Envoy-1.38 schema)")
    args = ap.parse_args()
    server, port = serve(args.port, args.redis_port, negative_hits=not args.no_negative_hits)
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
