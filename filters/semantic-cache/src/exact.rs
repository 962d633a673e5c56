//! The exact tier: answers in Envoy shared data (every worker of the VM sees them), looked up
//! in one host call, no store needed.
//!
//! Direct-mapped and bounded: an entry lives in slot `key % max_entries`, so memory stays
//! under `max_entries × max_entry_bytes` however many prompts arrive; a newer entry simply
//! replaces an older one in its slot. The value carries the full key and the expiry, so a
//! slot holding another key, or an expired entry, is a miss.

use crate::answer::Answer;

/// Shared-data key of the slot for `key_hex` (`ns`: the cache's namespace).
pub fn slot_key(ns: &str, key_hex: &str, max_entries: u64) -> String {
    let head = key_hex.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok()).unwrap_or(0);
    format!("sluice.semantic_cache.{ns}.{}", head % max_entries.max(1))
}

/// The stored value: `v1 <expires_ms> <key>\n<answer record>`.
pub fn encode(key_hex: &str, expires_ms: u64, answer: &Answer) -> Vec<u8> {
    format!("v1 {expires_ms} {key_hex}\n{}", answer.encode()).into_bytes()
}

/// The answer in `value` if it is for `key_hex` and not expired at `now_ms`.
pub fn decode(value: &[u8], key_hex: &str, now_ms: u64) -> Option<Answer> {
    let text = std::str::from_utf8(value).ok()?;
    let (head, record) = text.split_once('\n')?;
    let mut parts = head.split(' ');
    if parts.next()? != "v1" {
        return None;
    }
    let expires: u64 = parts.next()?.parse().ok()?;
    if parts.next()? != key_hex || expires <= now_ms {
        return None;
    }
    Answer::decode(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::CacheKey;

    #[test]
    fn entries_match_only_their_key_and_expire() {
        let a = Answer {
            model: "m".into(),
            text: "t".into(),
            finish_reason: "stop".into(),
            input_tokens: 1,
            output_tokens: 2,
        };
        let k = CacheKey::new("r", "m", "user:alice", "q").exact;
        let other = CacheKey::new("r", "m", "user:bob", "q").exact;
        let v = encode(&k, 5000, &a);
        assert_eq!(decode(&v, &k, 4999), Some(a.clone()));
        assert_eq!(decode(&v, &k, 5000), None, "expired");
        assert_eq!(decode(&v, &other, 0), None, "another key in the same slot");
        assert_eq!(decode(b"v0 9 x\n{}", "x", 0), None);
        assert_eq!(decode(b"garbage", &k, 0), None);
        assert_eq!(decode(&[0xff, 0xfe], &k, 0), None);
    }

    #[test]
    fn slots_are_bounded() {
        let k = CacheKey::new("r", "m", "global", "q").exact;
        let s = slot_key("ns", &k, 8);
        let n: u64 = s.rsplit('.').next().unwrap().parse().unwrap();
        assert!(n < 8, "{s}");
        assert!(s.starts_with("sluice.semantic_cache.ns."));
        assert_eq!(slot_key("ns", "zz", 0), "sluice.semantic_cache.ns.0");
    }
}
