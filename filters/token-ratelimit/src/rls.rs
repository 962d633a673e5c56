//! The few protobuf messages of `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! this filter needs, encoded and decoded by hand (no codegen, small wasm). Field numbers as
//! in Envoy's `api/envoy/service/ratelimit/v3/rls.proto` and
//! `api/envoy/extensions/common/ratelimit/v3/ratelimit.proto` (checked against Envoy's
//! generated code, and by the test RLS, which parses with the generated messages):
//!
//! Request: `RateLimitRequest { string domain = 1; repeated RateLimitDescriptor descriptors = 2;
//! uint32 hits_addend = 3 }` with `RateLimitDescriptor { repeated Entry entries = 1 {key = 1;
//! value = 2}; RateLimitOverride limit = 2 {requests_per_unit = 1; unit = 2};
//! google.protobuf.UInt64Value hits_addend = 3 {value = 1}; bool is_negative_hits = 4 }`
//! (`is_negative_hits` since Envoy 1.38; the request has no negative flag of its own).
//! Response: `RateLimitResponse { overall_code = 1; statuses = 2 }` with
//! `DescriptorStatus { code = 1; current_limit = 2; limit_remaining = 3;
//! duration_until_reset = 4 (Duration {seconds = 1}) }`.

/// gRPC service and method names.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// The method.
pub const METHOD: &str = "ShouldRateLimit";

/// One descriptor to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `(key, value)` entries.
    pub entries: Vec<(String, String)>,
    /// Limit override: units per window.
    pub limit: u32,
    /// Limit override unit (1 second, 2 minute, 3 hour, 4 day).
    pub unit: u32,
    /// Hits to add (descriptor-level `hits_addend`).
    pub hits: u64,
    /// The hits are a refund (`is_negative_hits`).
    pub negative: bool,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = u8::try_from(v & 0x7f).unwrap_or(0);
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_tag(out, field, 2);
    put_varint(out, u64::try_from(data.len()).unwrap_or(u64::MAX));
    out.extend_from_slice(data);
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    put_tag(out, field, 0);
    put_varint(out, v);
}

/// Encode a `RateLimitRequest`. The request-level `hits_addend` is `hits` (clamped to 32
/// bits): a service that reads only the request-level field counts what the descriptors say.
/// Callers put descriptors with different hits into different requests (see `stage`).
pub fn encode_request(domain: &str, hits: u64, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        let mut desc = Vec::new();
        for (k, v) in &d.entries {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, k.as_bytes());
            put_bytes(&mut entry, 2, v.as_bytes());
            put_bytes(&mut desc, 1, &entry);
        }
        let mut limit = Vec::new();
        put_uint(&mut limit, 1, u64::from(d.limit));
        put_uint(&mut limit, 2, u64::from(d.unit));
        put_bytes(&mut desc, 2, &limit);
        let mut value = Vec::new();
        if d.hits > 0 {
            put_uint(&mut value, 1, d.hits); // proto3: a zero value is not written
        }
        put_bytes(&mut desc, 3, &value); // the wrapper itself is always present: "0 = check only"
        if d.negative {
            put_uint(&mut desc, 4, 1);
        }
        put_bytes(&mut out, 2, &desc);
    }
    let request_hits = u32::try_from(hits).unwrap_or(u32::MAX);
    if request_hits > 0 {
        put_uint(&mut out, 3, u64::from(request_hits));
    }
    out
}

/// RLS verdict codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// UNKNOWN (0) or anything else.
    Unknown,
    /// OK (1).
    Ok,
    /// OVER_LIMIT (2).
    OverLimit,
}

impl Code {
    fn from_u64(v: u64) -> Self {
        match v {
            1 => Self::Ok,
            2 => Self::OverLimit,
            _ => Self::Unknown,
        }
    }
}

/// One descriptor's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Verdict.
    pub code: Code,
    /// Units left in the window.
    pub remaining: u64,
    /// Seconds until the window resets (0 when not sent).
    pub reset_secs: u64,
}

/// A decoded `RateLimitResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Overall verdict.
    pub overall: Code,
    /// Per-descriptor statuses, in request order.
    pub statuses: Vec<Status>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skipped,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// Next field, or `None` at the end; `Some(Err)` on malformed input.
    fn next(&mut self) -> Option<Result<(u64, Value<'a>), ()>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        Some(self.field())
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), ()> {
        let tag = self.varint().ok_or(())?;
        let field = tag >> 3;
        let value = match tag & 7 {
            0 => Value::Varint(self.varint().ok_or(())?),
            1 => {
                self.pos = self.pos.checked_add(8).filter(|p| *p <= self.buf.len()).ok_or(())?;
                Value::Skipped
            }
            2 => {
                let len = usize::try_from(self.varint().ok_or(())?).map_err(|_| ())?;
                let end = self.pos.checked_add(len).filter(|e| *e <= self.buf.len()).ok_or(())?;
                let data = self.buf.get(self.pos..end).ok_or(())?;
                self.pos = end;
                Value::Bytes(data)
            }
            5 => {
                self.pos = self.pos.checked_add(4).filter(|p| *p <= self.buf.len()).ok_or(())?;
                Value::Skipped
            }
            _ => return Err(()),
        };
        Ok((field, value))
    }
}

fn decode_status(buf: &[u8]) -> Option<Status> {
    let mut s = Status { code: Code::Unknown, remaining: 0, reset_secs: 0 };
    let mut r = Reader::new(buf);
    while let Some(f) = r.next() {
        match f.ok()? {
            (1, Value::Varint(v)) => s.code = Code::from_u64(v),
            (3, Value::Varint(v)) => s.remaining = v,
            (4, Value::Bytes(d)) => {
                let mut dr = Reader::new(d);
                while let Some(df) = dr.next() {
                    if let (1, Value::Varint(secs)) = df.ok()? {
                        s.reset_secs = secs;
                    }
                }
            }
            _ => {}
        }
    }
    Some(s)
}

/// Decode a `RateLimitResponse`; `None` when malformed.
pub fn decode_response(buf: &[u8]) -> Option<Response> {
    let mut resp = Response { overall: Code::Unknown, statuses: Vec::new() };
    let mut r = Reader::new(buf);
    while let Some(f) = r.next() {
        match f.ok()? {
            (1, Value::Varint(v)) => resp.overall = Code::from_u64(v),
            (2, Value::Bytes(d)) => resp.statuses.push(decode_status(d)?),
            _ => {}
        }
    }
    Some(resp)
}

/// A decoded descriptor of a request (tests: what the filter sent).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SentDescriptor {
    /// Entries.
    pub entries: Vec<(String, String)>,
    /// Limit override (requests per unit, unit).
    pub limit: Option<(u64, u64)>,
    /// Descriptor-level hits (`None`: the wrapper is absent).
    pub hits: Option<u64>,
    /// `is_negative_hits`.
    pub negative: bool,
}

/// A decoded request (tests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SentRequest {
    /// Domain.
    pub domain: String,
    /// Request-level hits.
    pub hits: u64,
    /// Descriptors.
    pub descriptors: Vec<SentDescriptor>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decode a `RateLimitRequest` (tests and property tests; `None` when malformed).
pub fn decode_request(buf: &[u8]) -> Option<SentRequest> {
    let mut out = SentRequest::default();
    let mut r = Reader::new(buf);
    while let Some(f) = r.next() {
        match f.ok()? {
            (1, Value::Bytes(d)) => out.domain = text(d),
            (3, Value::Varint(v)) => out.hits = v,
            (2, Value::Bytes(d)) => {
                let mut desc = SentDescriptor::default();
                let mut dr = Reader::new(d);
                while let Some(df) = dr.next() {
                    match df.ok()? {
                        (1, Value::Bytes(e)) => {
                            let (mut k, mut v) = (String::new(), String::new());
                            let mut er = Reader::new(e);
                            while let Some(ef) = er.next() {
                                match ef.ok()? {
                                    (1, Value::Bytes(b)) => k = text(b),
                                    (2, Value::Bytes(b)) => v = text(b),
                                    _ => {}
                                }
                            }
                            desc.entries.push((k, v));
                        }
                        (2, Value::Bytes(l)) => {
                            let (mut n, mut unit) = (0, 0);
                            let mut lr = Reader::new(l);
                            while let Some(lf) = lr.next() {
                                match lf.ok()? {
                                    (1, Value::Varint(x)) => n = x,
                                    (2, Value::Varint(x)) => unit = x,
                                    _ => {}
                                }
                            }
                            desc.limit = Some((n, unit));
                        }
                        (3, Value::Bytes(h)) => {
                            let mut hits = 0;
                            let mut hr = Reader::new(h);
                            while let Some(hf) = hr.next() {
                                if let (1, Value::Varint(x)) = hf.ok()? {
                                    hits = x;
                                }
                            }
                            desc.hits = Some(hits);
                        }
                        (4, Value::Varint(x)) => desc.negative = x != 0,
                        _ => {}
                    }
                }
                out.descriptors.push(desc);
            }
            _ => {}
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encode a response the way an RLS would (for tests).
    pub(crate) fn encode_response(overall: u64, statuses: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        put_uint(&mut out, 1, overall);
        for (code, remaining, reset) in statuses {
            let mut s = Vec::new();
            put_uint(&mut s, 1, *code);
            let mut lim = Vec::new();
            put_uint(&mut lim, 1, 100);
            put_uint(&mut lim, 2, 2);
            put_bytes(&mut s, 2, &lim);
            put_uint(&mut s, 3, *remaining);
            let mut d = Vec::new();
            put_uint(&mut d, 1, *reset);
            put_bytes(&mut s, 4, &d);
            put_bytes(&mut out, 2, &s);
        }
        out
    }

    #[test]
    fn request_bytes_match_protobuf() {
        let d = Descriptor {
            entries: vec![("user".into(), "alice".into())],
            limit: 150,
            unit: 2,
            hits: 300,
            negative: false,
        };
        let b = encode_request("sluice", 300, std::slice::from_ref(&d));
        // domain
        assert_eq!(&b[..8], b"\x0a\x06sluice");
        // descriptors: entry{key "user", value "alice"}, limit{150, MINUTE}, hits_addend{300}
        let desc = b"\x0a\x0d\x0a\x04user\x12\x05alice\x12\x05\x08\x96\x01\x10\x02\x1a\x03\x08\xac\x02";
        let mut want = vec![0x12, u8::try_from(desc.len()).unwrap()];
        want.extend_from_slice(desc);
        // request-level hits_addend = 300 (field 3, varint)
        want.extend_from_slice(b"\x18\xac\x02");
        assert_eq!(&b[8..], &want[..]);
        // a refund: is_negative_hits = true is field 4, varint 1, inside the descriptor
        let neg = encode_request("sluice", 300, &[Descriptor { negative: true, ..d.clone() }]);
        let decoded = decode_request(&neg).unwrap();
        assert!(decoded.descriptors[0].negative);
        assert!(neg.windows(2).any(|w| w == b"\x20\x01"));
        // zero hits: the wrapper is there (check only), empty; the request-level field is absent
        let zero = encode_request("d", 0, &[Descriptor { hits: 0, ..d }]);
        let decoded = decode_request(&zero).unwrap();
        assert_eq!((decoded.hits, decoded.descriptors[0].hits), (0, Some(0)));
        assert!(zero.ends_with(b"\x1a\x00"));
        // hits beyond 32 bits: exact per descriptor, clamped at request level
        let big = decode_request(&encode_request("d", u64::MAX, &[])).unwrap();
        assert_eq!(big.hits, u64::from(u32::MAX));
    }

    #[test]
    fn varints() {
        let mut v = Vec::new();
        put_varint(&mut v, 0);
        put_varint(&mut v, 300);
        put_varint(&mut v, u64::MAX);
        let mut r = Reader::new(&v);
        assert_eq!(r.varint(), Some(0));
        assert_eq!(r.varint(), Some(300));
        assert_eq!(r.varint(), Some(u64::MAX));
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn decodes_response() {
        let b = encode_response(2, &[(1, 40, 12), (2, 0, 3000)]);
        let r = decode_response(&b).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(r.statuses[0], Status { code: Code::Ok, remaining: 40, reset_secs: 12 });
        assert_eq!(r.statuses[1].code, Code::OverLimit);
        assert_eq!(r.statuses[1].reset_secs, 3000);
        assert_eq!(decode_response(b"").unwrap().overall, Code::Unknown);
    }

    #[test]
    fn malformed_response_is_none_not_panic() {
        for bad in [
            &b"\x12\xff\xff\xff"[..],
            b"\x08",
            b"\x0f",
            b"\x12\x02\x08",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert_eq!(decode_response(bad), None, "{bad:?}");
        }
    }
}
