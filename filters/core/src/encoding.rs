//! The host's binary encodings, decoded in plain Rust:
//! - `envoy.config.core.v3.Metadata` and `google.protobuf.Struct` (protobuf): what
//!   `get_property(["xds","route_metadata"])`, `["xds","upstream_host_metadata"]`,
//!   `["xds","cluster_metadata"]` and `["metadata"]` return (verified on Envoy 1.40: a path
//!   that stops at a whole metadata returns the serialized message; deeper paths return leaf
//!   strings raw but maps in the flat pair encoding, which loses nesting);
//! - proxy-wasm's map encoding (header maps, local-reply headers, callout headers).
//!
//! One read of a whole metadata message replaces one host call per key.

use serde_json::{Map, Number, Value};

const MAX_DEPTH: usize = 32;

/// The payload under `namespace`/`key` of a serialized `Metadata`.
pub fn payload_from_metadata(bytes: &[u8], namespace: &str, key: &str) -> Option<Value> {
    let mut r = Reader { buf: bytes, pos: 0 };
    while !r.done() {
        let (field, wire) = r.tag()?;
        if field != 1 || wire != 2 {
            r.skip(wire)?;
            continue;
        }
        let entry = r.bytes()?;
        let mut e = Reader { buf: entry, pos: 0 };
        let (mut ns, mut value) = (None, None);
        while !e.done() {
            let (f, w) = e.tag()?;
            match (f, w) {
                (1, 2) => ns = Some(e.bytes()?),
                (2, 2) => value = Some(e.bytes()?),
                _ => e.skip(w)?,
            }
        }
        if ns == Some(namespace.as_bytes()) {
            let s = decode_struct(value?, 0)?;
            return s.get(key).filter(|v| v.is_object()).cloned();
        }
    }
    None
}

/// The `filter_metadata[namespace]` struct of a serialized `Metadata`, as a JSON object.
pub fn metadata_namespace(bytes: &[u8], namespace: &str) -> Option<Map<String, Value>> {
    let mut r = Reader { buf: bytes, pos: 0 };
    while !r.done() {
        let (field, wire) = r.tag()?;
        if field != 1 || wire != 2 {
            r.skip(wire)?;
            continue;
        }
        let entry = r.bytes()?;
        let mut e = Reader { buf: entry, pos: 0 };
        let (mut ns, mut value) = (None, None);
        while !e.done() {
            let (f, w) = e.tag()?;
            match (f, w) {
                (1, 2) => ns = Some(e.bytes()?),
                (2, 2) => value = Some(e.bytes()?),
                _ => e.skip(w)?,
            }
        }
        if ns == Some(namespace.as_bytes()) {
            return match decode_struct(value.unwrap_or_default(), 0)? {
                Value::Object(m) => Some(m),
                _ => None,
            };
        }
    }
    None
}

/// proxy-wasm's map encoding: count, (key len, value len) pairs, then NUL-terminated bytes.
pub fn encode_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(0).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(0).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Decode proxy-wasm's map encoding; a malformed map decodes as far as it is sound.
pub fn decode_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let Some(n) = word(0) else { return Vec::new() };
    let mut out = Vec::with_capacity(n.min(256));
    let Some(mut p) = n.checked_mul(8).and_then(|x| x.checked_add(4)) else { return out };
    for i in 0..n {
        let Some(s) = i.checked_mul(8).and_then(|x| x.checked_add(4)) else { break };
        let (Some(kl), Some(vl)) = (word(s), word(s.saturating_add(4))) else { break };
        let Some(k) = p.checked_add(kl).and_then(|end| bytes.get(p..end)) else { break };
        p = p.saturating_add(kl).saturating_add(1);
        let Some(v) = p.checked_add(vl).and_then(|end| bytes.get(p..end)) else { break };
        p = p.saturating_add(vl).saturating_add(1);
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    out
}

/// Decode a verified payload: JSON object, or protobuf `Struct`.
pub fn decode_payload(bytes: &[u8]) -> Option<Value> {
    if let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(bytes) {
        return Some(v);
    }
    let v = decode_struct(bytes, 0)?;
    match &v {
        Value::Object(m) if !m.is_empty() => Some(v),
        _ => None,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self) -> Option<u64> {
        let mut out: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let end = self.pos.checked_add(len)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn fixed64(&mut self) -> Option<u64> {
        let s = self.buf.get(self.pos..self.pos.checked_add(8)?)?;
        self.pos += 8;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Some(u64::from_le_bytes(a))
    }
    /// (field number, wire type)
    fn tag(&mut self) -> Option<(u64, u8)> {
        let t = self.varint()?;
        Some((t >> 3, (t & 7) as u8))
    }
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.fixed64().map(|_| ()),
            2 => self.bytes().map(|_| ()),
            5 => {
                self.pos = self.pos.checked_add(4)?;
                (self.pos <= self.buf.len()).then_some(())
            }
            _ => None,
        }
    }
}

fn decode_struct(buf: &[u8], depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut r = Reader { buf, pos: 0 };
    let mut out = Map::new();
    while !r.done() {
        let (field, wire) = r.tag()?;
        if field == 1 && wire == 2 {
            let entry = r.bytes()?;
            let mut e = Reader { buf: entry, pos: 0 };
            let mut key = None;
            let mut value = Value::Null;
            while !e.done() {
                let (f, w) = e.tag()?;
                match (f, w) {
                    (1, 2) => key = Some(String::from_utf8(e.bytes()?.to_vec()).ok()?),
                    (2, 2) => value = decode_value(e.bytes()?, depth + 1)?,
                    _ => e.skip(w)?,
                }
            }
            out.insert(key?, value);
        } else {
            r.skip(wire)?;
        }
    }
    Some(Value::Object(out))
}

fn decode_value(buf: &[u8], depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut r = Reader { buf, pos: 0 };
    let mut out = Value::Null;
    while !r.done() {
        let (field, wire) = r.tag()?;
        out = match (field, wire) {
            (1, 0) => {
                r.varint()?;
                Value::Null
            }
            (2, 1) => {
                let f = f64::from_bits(r.fixed64()?);
                // Integral numbers (exp, iat) come back as integers.
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Value::Number(Number::from(f as i64))
                } else {
                    Number::from_f64(f).map_or(Value::Null, Value::Number)
                }
            }
            (3, 2) => Value::String(String::from_utf8(r.bytes()?.to_vec()).ok()?),
            (4, 0) => Value::Bool(r.varint()? != 0),
            (5, 2) => decode_struct(r.bytes()?, depth + 1)?,
            (6, 2) => {
                let list = r.bytes()?;
                let mut l = Reader { buf: list, pos: 0 };
                let mut items = Vec::new();
                while !l.done() {
                    let (f, w) = l.tag()?;
                    if f == 1 && w == 2 {
                        items.push(decode_value(l.bytes()?, depth + 1)?);
                    } else {
                        l.skip(w)?;
                    }
                }
                Value::Array(items)
            }
            _ => {
                r.skip(wire)?;
                continue;
            }
        };
    }
    Some(out)
}

/// Encode `{namespace: meta}` as a serialized `envoy.config.core.v3.Metadata` (for fake
/// hosts in tests: what `get_property(["xds","route_metadata"])` returns).
pub fn test_encode_metadata(namespace: &str, meta: &Value) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn ld(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint((field << 3) | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }
    fn value(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        match v {
            Value::Null => {
                varint(1 << 3, &mut o);
                varint(0, &mut o);
            }
            Value::Number(n) => {
                varint((2 << 3) | 1, &mut o);
                o.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
            }
            Value::String(s) => ld(3, s.as_bytes(), &mut o),
            Value::Bool(b) => {
                varint(4 << 3, &mut o);
                varint(u64::from(*b), &mut o);
            }
            Value::Object(_) => ld(5, &structure(v), &mut o),
            Value::Array(a) => {
                let mut l = Vec::new();
                for x in a {
                    ld(1, &value(x), &mut l);
                }
                ld(6, &l, &mut o);
            }
        }
        o
    }
    fn structure(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        for (k, x) in v.as_object().into_iter().flatten() {
            let mut e = Vec::new();
            ld(1, k.as_bytes(), &mut e);
            ld(2, &value(x), &mut e);
            ld(1, &e, &mut o);
        }
        o
    }
    let mut entry = Vec::new();
    ld(1, namespace.as_bytes(), &mut entry);
    ld(2, &structure(meta), &mut entry);
    let mut md = Vec::new();
    ld(1, &entry, &mut md);
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn ld(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }
    fn enc_value(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        match v {
            Value::Null => {
                varint(1 << 3, &mut o);
                varint(0, &mut o);
            }
            Value::Number(n) => {
                varint(2 << 3 | 1, &mut o);
                o.extend_from_slice(&n.as_f64().unwrap().to_bits().to_le_bytes());
            }
            Value::String(s) => ld(3, s.as_bytes(), &mut o),
            Value::Bool(b) => {
                varint(4 << 3, &mut o);
                varint(u64::from(*b), &mut o);
            }
            Value::Object(_) => ld(5, &enc_struct(v), &mut o),
            Value::Array(a) => {
                let mut l = Vec::new();
                for x in a {
                    ld(1, &enc_value(x), &mut l);
                }
                ld(6, &l, &mut o);
            }
        }
        o
    }
    fn enc_struct(v: &Value) -> Vec<u8> {
        let mut o = Vec::new();
        for (k, x) in v.as_object().unwrap() {
            let mut e = Vec::new();
            ld(1, k.as_bytes(), &mut e);
            ld(2, &enc_value(x), &mut e);
            ld(1, &e, &mut o);
        }
        o
    }

    #[test]
    fn struct_round_trip() {
        let v = json!({"sub":"alice","exp":1700000000,"ratio":0.5,"admin":true,"none":null,
                       "llms":{"openai":["gpt-4o-mini","gpt-4o"]}});
        assert_eq!(decode_payload(&enc_struct(&v)).unwrap(), v);
    }

    #[test]
    fn payload_from_envoy_metadata() {
        let payload = json!({"sub":"alice","llms":{"openai":["gpt-4o-mini"]},"exp":1795247449});
        let ns_struct = enc_struct(&json!({"jwt_payload": payload}));
        let mut entry = Vec::new();
        ld(1, b"envoy.filters.http.jwt_authn", &mut entry);
        ld(2, &ns_struct, &mut entry);
        let mut md = Vec::new();
        let mut other = Vec::new();
        ld(1, b"other", &mut other);
        ld(2, &enc_struct(&json!({"x": 1})), &mut other);
        ld(1, &other, &mut md);
        ld(1, &entry, &mut md);
        assert_eq!(payload_from_metadata(&md, "envoy.filters.http.jwt_authn", "jwt_payload").unwrap(), payload);
        assert_eq!(payload_from_metadata(&md, "envoy.filters.http.jwt_authn", "nope"), None);
        assert_eq!(payload_from_metadata(&md, "missing", "jwt_payload"), None);
        assert_eq!(payload_from_metadata(b"\x0a\xff", "a", "b"), None);
    }

    #[test]
    fn namespace_of_route_metadata() {
        let mut entry = Vec::new();
        ld(1, b"sluice", &mut entry);
        ld(2, &enc_struct(&json!({"provider": "openai", "n": 3, "list": ["a", "b"]})), &mut entry);
        let mut md = Vec::new();
        ld(1, &entry, &mut md);
        let m = metadata_namespace(&md, "sluice").unwrap();
        assert_eq!(m["provider"], "openai");
        assert_eq!(m["n"], 3);
        assert_eq!(m["list"], json!(["a", "b"]));
        assert_eq!(metadata_namespace(&md, "other"), None);
        assert_eq!(metadata_namespace(b"", "sluice"), None);
    }

    #[test]
    fn map_encoding_round_trip_and_garbage() {
        let pairs: Vec<(&str, &[u8])> = vec![(":status", b"200"), ("x-a", b""), ("k", b"v\xffw")];
        let enc = encode_map(&pairs);
        let dec = decode_map(&enc);
        assert_eq!(dec.len(), 3);
        assert_eq!(dec[0], (":status".to_string(), b"200".to_vec()));
        assert_eq!(dec[2].1, b"v\xffw".to_vec());
        for cut in 0..enc.len() {
            let _ = decode_map(&enc[..cut]);
        }
        assert!(decode_map(&[0xff, 0xff, 0xff, 0xff]).is_empty());
    }

    #[test]
    fn json_and_garbage() {
        assert_eq!(decode_payload(br#"{"sub":"a"}"#).unwrap(), json!({"sub":"a"}));
        assert_eq!(decode_payload(b""), None);
        assert_eq!(decode_payload(b"\xff\xff\xff"), None);
        assert_eq!(decode_payload(b"alice"), None);
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = decode_payload(&junk);
        }
    }
}
