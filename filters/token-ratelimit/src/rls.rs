//! The few protobuf messages of `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! this filter needs, encoded and decoded by hand (no codegen, small wasm).
//!
//! Request: `RateLimitRequest { domain = 1; descriptors = 2; hits_addend = 3 }` with
//! `RateLimitDescriptor { entries = 1 {key = 1; value = 2}; limit = 2 {requests_per_unit = 1;
//! unit = 2}; hits_addend = 3 (UInt64Value {value = 1}) }`.
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
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
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
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    put_tag(out, field, 0);
    put_varint(out, v);
}

/// Encode a `RateLimitRequest` (request-level `hits_addend` left 0: each descriptor carries its own).
pub fn encode_request(domain: &str, descriptors: &[Descriptor]) -> Vec<u8> {
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
        let mut hits = Vec::new();
        put_uint(&mut hits, 1, d.hits);
        put_bytes(&mut desc, 3, &hits);
        put_bytes(&mut out, 2, &desc);
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

/// The descriptor-level `hits_addend` of each descriptor in an encoded request (for tests).
#[cfg(test)]
pub(crate) fn decode_hits(req: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut r = Reader::new(req);
    while let Some(Ok((field, value))) = r.next() {
        let (2, Value::Bytes(desc)) = (field, value) else { continue };
        let mut dr = Reader::new(desc);
        while let Some(Ok((f, v))) = dr.next() {
            let (3, Value::Bytes(h)) = (f, v) else { continue };
            let mut hr = Reader::new(h);
            if let Some(Ok((1, Value::Varint(n)))) = hr.next() {
                out.push(n);
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
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
        let d = Descriptor { entries: vec![("user".into(), "alice".into())], limit: 150, unit: 2, hits: 300 };
        let b = encode_request("sluice", &[d]);
        // domain
        assert_eq!(&b[..8], b"\x0a\x06sluice");
        // descriptors: entry{key "user", value "alice"}, limit{150, MINUTE}, hits_addend{300}
        let desc = b"\x0a\x0d\x0a\x04user\x12\x05alice\x12\x05\x08\x96\x01\x10\x02\x1a\x03\x08\xac\x02";
        let mut want = vec![0x12, desc.len() as u8];
        want.extend_from_slice(desc);
        assert_eq!(&b[8..], &want[..]);
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
