//! Hand-written encoders (the crate is std-only): base64 (standard
//! alphabet, padded), CRC-32 (IEEE 802.3, as used by gzip) and gzip with
//! stored (uncompressed) deflate blocks.

/// Largest payload of one stored deflate block.
const STORED_BLOCK_MAX: usize = 65535;

/// Standard base64 (RFC 4648 section 4) with `=` padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        out.push(symbol(n >> 18));
        out.push(symbol(n >> 12));
        out.push(if chunk.len() > 1 { symbol(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { symbol(n) } else { '=' });
    }
    out
}

/// The base64 symbol for the low six bits of `v`.
fn symbol(v: u32) -> char {
    let v = u8::try_from(v & 63).unwrap_or(0);
    char::from(match v {
        0..=25 => b'A' + v,
        26..=51 => b'a' + (v - 26),
        52..=61 => b'0' + (v - 52),
        62 => b'+',
        _ => b'/',
    })
}

/// CRC-32 (reflected polynomial `0xEDB88320`, initial value and final XOR
/// `0xFFFFFFFF`), computed bit by bit.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// A gzip member (RFC 1952) whose deflate stream is made of stored blocks
/// (RFC 1951 section 3.2.4), so any gzip decoder can read it.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.reserve(data.len() + data.len() / STORED_BLOCK_MAX * 5 + 13);
    if data.is_empty() {
        // One final stored block of length 0.
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    let mut blocks = data.chunks(STORED_BLOCK_MAX).peekable();
    while let Some(block) = blocks.next() {
        // BFINAL in bit 0, BTYPE=00 (stored); the rest of the byte is padding.
        out.push(u8::from(blocks.peek().is_none()));
        let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    // ISIZE is the input size modulo 2^32.
    #[allow(clippy::cast_possible_truncation)]
    let isize = data.len() as u32;
    out.extend_from_slice(&isize.to_le_bytes());
    out
}

#[cfg(test)]
pub mod tests {

    use super::*;

    /// Decodes standard padded base64 (test helper).
    pub fn unbase64(text: &str) -> Vec<u8> {
        let value = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => u32::from(c - b'A'),
                b'a'..=b'z' => u32::from(c - b'a') + 26,
                b'0'..=b'9' => u32::from(c - b'0') + 52,
                b'+' => 62,
                b'/' => 63,
                _ => panic!("bad base64 byte {c}"),
            }
        };
        let bytes = text.as_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let mut out = Vec::new();
        for quad in bytes.chunks(4) {
            let pad = quad.iter().filter(|&&c| c == b'=').count();
            let n = quad.iter().take(4 - pad).fold(0u32, |acc, &c| (acc << 6) | value(c)) << (6 * pad);
            let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&three[..3 - pad]);
        }
        out
    }

    /// Reads a gzip member made of stored deflate blocks, checking the
    /// header, every block's LEN/NLEN, the CRC-32 and ISIZE (test helper).
    pub fn gunzip_stored(data: &[u8]) -> Vec<u8> {
        assert!(data.len() >= 18, "too short");
        assert_eq!(&data[..4], &[0x1f, 0x8b, 8, 0], "header: magic, deflate, no flags");
        let mut pos = 10;
        let mut out = Vec::new();
        loop {
            let header = data[pos];
            assert_eq!(header & 0b110, 0, "BTYPE must be 00 (stored)");
            let len = u16::from_le_bytes([data[pos + 1], data[pos + 2]]);
            let nlen = u16::from_le_bytes([data[pos + 3], data[pos + 4]]);
            assert_eq!(len, !nlen, "NLEN is the complement of LEN");
            pos += 5;
            out.extend_from_slice(&data[pos..pos + usize::from(len)]);
            pos += usize::from(len);
            if header & 1 == 1 {
                break;
            }
        }
        let crc = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap());
        let size = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap());
        assert_eq!(pos + 8, data.len(), "nothing after the trailer");
        assert_eq!(crc, crc32(&out), "CRC-32");
        assert_eq!(size as usize, out.len(), "ISIZE");
        out
    }

    #[test]
    fn base64_vectors() {
        // RFC 4648 section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
            assert_eq!(unbase64(encoded), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        let encoded = base64(&all);
        assert!(encoded.contains('+') && encoded.contains('/'));
        assert_eq!(unbase64(&encoded), all);
    }

    #[test]
    fn crc32_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }

    #[test]
    fn gzip_round_trips() {
        for len in [0usize, 1, 100, 65535, 65536, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let gz = gzip(&data);
            assert_eq!(gunzip_stored(&gz), data, "len {len}");
        }
        // Known bytes for a tiny input.
        let gz = gzip(b"hi");
        assert_eq!(&gz[10..17], &[1, 2, 0, 0xfd, 0xff, b'h', b'i']);
    }
}
