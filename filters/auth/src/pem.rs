//! PEM public keys without the `use_pem` feature (its `simple_asn1` pulls the `time`
//! crate, about 90 KB of wasm): a PEM block is base64 DER; an SPKI `PUBLIC KEY` holds the
//! algorithm OID and the key as the first BIT STRING, which is what jsonwebtoken's
//! `from_*_der` constructors take.

use crate::keys::Family;

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Base64 (standard or URL alphabet; padding and whitespace ignored).
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' | b'\n' | b'\r' | b' ' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// One DER element: (tag, contents, rest).
fn der(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (lb, rest) = rest.split_at_checked(n)?;
        (lb.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)), rest)
    };
    let (body, rest) = rest.split_at_checked(len)?;
    Some((tag, body, rest))
}

/// A public key from PEM: `(family, key bytes for DecodingKey::from_*_der)`.
pub fn parse_public_pem(text: &str) -> Result<(Family, Vec<u8>), String> {
    let text = text.trim();
    let label_start = text.strip_prefix("-----BEGIN ").ok_or("missing -----BEGIN line")?;
    let (label, rest) = label_start.split_once("-----").ok_or("bad BEGIN line")?;
    let end = format!("-----END {label}-----");
    let body = rest.split(end.as_str()).next().filter(|_| rest.contains(end.as_str())).ok_or("missing END line")?;
    let der_bytes = b64_decode(body).ok_or("PEM body is not base64")?;
    match label {
        "RSA PUBLIC KEY" => Ok((Family::Rsa, der_bytes)),
        "PUBLIC KEY" => spki(&der_bytes),
        other => Err(format!("unsupported PEM block {other:?}: use a PUBLIC KEY (never a private key)")),
    }
}

fn spki(buf: &[u8]) -> Result<(Family, Vec<u8>), String> {
    let bad = || "malformed SubjectPublicKeyInfo".to_string();
    let (tag, seq, _) = der(buf).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, alg, rest) = der(seq).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, oid, params) = der(alg).ok_or_else(bad)?;
    if tag != 0x06 {
        return Err(bad());
    }
    let (tag, bits, _) = der(rest).ok_or_else(bad)?;
    if tag != 0x03 {
        return Err(bad());
    }
    let key = bits.get(1..).ok_or_else(bad)?.to_vec();
    let family = if oid == OID_RSA {
        Family::Rsa
    } else if oid == OID_ED25519 {
        Family::Ed
    } else if oid == OID_EC {
        match der(params) {
            Some((0x06, c, _)) if c == OID_P256 => Family::P256,
            Some((0x06, c, _)) if c == OID_P384 => Family::P384,
            _ => return Err("unsupported EC curve (P-256 and P-384 only)".into()),
        }
    } else {
        return Err("unsupported key algorithm (RSA, EC, Ed25519)".into());
    };
    Ok((family, key))
}
