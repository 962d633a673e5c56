//! What bounds the cost of JWT verification per worker VM (issue 13 §8, issue 15 §4):
//!
//! - [`TokenCache`]: tokens this VM verified, so a repeat costs one hash-map lookup (no
//!   SHA-256, no parsing, no crypto); never served past `exp` or after the provider's keys
//!   changed.
//! - [`NegativeCache`]: tokens this VM refused for a reason that cannot change by itself
//!   (bad signature, malformed, expired, wrong issuer or audience), remembered for a short
//!   TTL, so the same garbage token again is refused without crypto.
//! - [`VerifyBudget`]: a token bucket of signature checks per second; when it is empty a new
//!   token is refused (503 `jwt_verify_budget`) without crypto, while cached tokens keep
//!   working.
//!
//! Both caches are keyed by a 64-bit SipHash of the token under this VM's random key
//! ([`TokenHasher`]): one pass over the token, no allocation. The verified cache also keeps
//! the token itself and compares it on a hit, so a hash collision can never hand one
//! caller's identity to another token; in the negative cache a collision could only refuse a
//! token for the TTL, and with a secret per-VM key it cannot be aimed.

use crate::jwt::{Failure, Verified};
use serde_json::Value;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::rc::Rc;

/// Hashes tokens with this VM's random SipHash key.
#[derive(Debug, Default)]
pub struct TokenHasher(RandomState);

impl TokenHasher {
    /// The cache key of a token.
    pub fn key(&self, token: &str) -> u64 {
        self.0.hash_one(token)
    }
}

/// The map hasher for keys that are already hashes: passes the `u64` through.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByKey<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// A cached verification.
#[derive(Debug, Clone)]
struct Entry {
    token: Box<str>,
    claims: Rc<Value>,
    exp: Option<u64>,
    provider: usize,
    generation: u64,
}

/// Verified tokens per VM. Bounded: when full, expired entries go first, then everything (a
/// simple, predictable bound; only verified tokens get in, so an attacker cannot fill it).
#[derive(Debug, Default)]
pub struct TokenCache {
    map: ByKey<Entry>,
    max: usize,
}

impl TokenCache {
    /// A cache of at most `max` entries (0 disables).
    pub fn new(max: usize) -> Self {
        Self { map: ByKey::default(), max }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Empty?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A still-valid verification of `token` (whose key is `key`) at `now` (seconds).
    pub fn get(
        &mut self,
        key: u64,
        token: &str,
        now: u64,
        generation: impl Fn(usize) -> u64,
    ) -> Option<(usize, Rc<Value>)> {
        let e = self.map.get(&key)?;
        if &*e.token != token {
            return None; // another token with the same hash: a miss, never a match
        }
        let fresh = e.exp.is_none_or(|exp| now < exp) && generation(e.provider) == e.generation;
        if fresh {
            Some((e.provider, Rc::clone(&e.claims)))
        } else {
            self.map.remove(&key);
            None
        }
    }

    /// Remember a verification.
    pub fn put(&mut self, key: u64, token: &str, provider: usize, generation: u64, v: &Verified, now: u64) {
        if self.max == 0 {
            return;
        }
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            self.map.retain(|_, e| e.exp.is_none_or(|exp| now < exp));
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        let e = Entry { token: token.into(), claims: Rc::clone(&v.claims), exp: v.exp, provider, generation };
        self.map.insert(key, e);
    }
}

/// Whether a refusal is final for this token while the provider's keys stay the same (so it
/// may be remembered). Not: unknown `kid` and keys never loaded (a JWKS fetch can change
/// them), not-yet-valid (time fixes it).
pub fn remembered(f: Failure) -> bool {
    !matches!(f, Failure::UnknownKey | Failure::KeysUnavailable | Failure::NotYetValid)
}

#[derive(Debug, Clone, Copy)]
struct Refused {
    failure: Failure,
    until_ms: u64,
    /// Provider and key generation the refusal was made with (`None`: before a provider
    /// was chosen, e.g. malformed).
    keys: Option<(usize, u64)>,
}

/// Tokens refused recently, per VM. Bounded like [`TokenCache`].
#[derive(Debug, Default)]
pub struct NegativeCache {
    map: ByKey<Refused>,
    max: usize,
    ttl_ms: u64,
}

impl NegativeCache {
    /// At most `max` entries, each for `ttl` (0 entries or a zero TTL disable it).
    pub fn new(max: usize, ttl: std::time::Duration) -> Self {
        Self { map: ByKey::default(), max, ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX) }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Empty?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Why this token was refused, if it was within the TTL and with the provider's current
    /// keys.
    pub fn get(&mut self, key: u64, now_ms: u64, generation: impl Fn(usize) -> u64) -> Option<Failure> {
        let r = *self.map.get(&key)?;
        let current = r.keys.is_none_or(|(p, g)| generation(p) == g);
        if now_ms < r.until_ms && current {
            Some(r.failure)
        } else {
            self.map.remove(&key);
            None
        }
    }

    /// Remember a refusal (only the kinds [`remembered`] allows).
    pub fn put(&mut self, key: u64, failure: Failure, keys: Option<(usize, u64)>, now_ms: u64) {
        if self.max == 0 || self.ttl_ms == 0 || !remembered(failure) {
            return;
        }
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            self.map.retain(|_, r| now_ms < r.until_ms);
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        self.map.insert(key, Refused { failure, until_ms: now_ms.saturating_add(self.ttl_ms), keys });
    }
}

/// Signature checks per second per VM, as a token bucket holding one second's worth
/// (milli-checks, integer arithmetic). A check may run while at least one is available;
/// a token that needed several keys leaves the bucket in debt (at most one second's worth).
#[derive(Debug, Default)]
pub struct VerifyBudget {
    /// Checks per second (0: unlimited).
    rate: u64,
    level: i64,
    last_ms: Option<u64>,
}

const MILLI: i64 = 1000;

impl VerifyBudget {
    /// A full bucket of `rate` checks per second (0: unlimited).
    pub fn new(rate: u64) -> Self {
        Self { rate, level: Self::cap(rate), last_ms: None }
    }

    fn cap(rate: u64) -> i64 {
        i64::try_from(rate).unwrap_or(i64::MAX / MILLI).saturating_mul(MILLI)
    }

    fn refill(&mut self, now_ms: u64) {
        let cap = Self::cap(self.rate);
        if let Some(last) = self.last_ms {
            let elapsed = i64::try_from(now_ms.saturating_sub(last)).unwrap_or(i64::MAX);
            // `rate` checks per 1000 ms = `rate` milli-checks per ms.
            let add = elapsed.saturating_mul(i64::try_from(self.rate).unwrap_or(i64::MAX));
            self.level = self.level.saturating_add(add).min(cap);
        }
        if self.last_ms.is_none_or(|l| now_ms >= l) {
            self.last_ms = Some(now_ms);
        }
    }

    /// Whether a signature check may start now.
    pub fn allows(&mut self, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now_ms);
        self.level >= MILLI
    }

    /// Account for `n` signature checks made.
    pub fn charge(&mut self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let cost = i64::try_from(n).unwrap_or(i64::MAX).saturating_mul(MILLI);
        self.level = self.level.saturating_sub(cost).max(-Self::cap(self.rate));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn verified(exp: Option<u64>) -> Verified {
        Verified { claims: Rc::new(json!({"sub": "a"})), exp }
    }

    #[test]
    fn verified_cache_hits_by_key_and_compares_the_token() {
        let hasher = TokenHasher::default();
        let mut c = TokenCache::new(4);
        let k = hasher.key("tok-a");
        assert_eq!(k, hasher.key("tok-a"), "stable within a VM");
        c.put(k, "tok-a", 0, 7, &verified(Some(100)), 10);
        assert_eq!(c.get(k, "tok-a", 50, |_| 7).unwrap().1["sub"], "a");
        // A (forced) collision: same key, other token: a miss, never the other identity.
        assert!(c.get(k, "tok-b", 50, |_| 7).is_none());
        assert_eq!(c.len(), 1, "the entry of tok-a stays");
        // Expired, or keys changed: gone.
        assert!(c.get(k, "tok-a", 100, |_| 7).is_none());
        c.put(k, "tok-a", 0, 7, &verified(None), 10);
        assert!(c.get(k, "tok-a", 50, |_| 8).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn verified_cache_is_bounded() {
        let mut c = TokenCache::new(2);
        c.put(1, "a", 0, 0, &verified(Some(5)), 0);
        c.put(2, "b", 0, 0, &verified(Some(100)), 0);
        c.put(3, "c", 0, 0, &verified(Some(100)), 10); // full: the expired `a` goes
        assert_eq!(c.len(), 2);
        assert!(c.get(2, "b", 10, |_| 0).is_some());
        c.put(4, "d", 0, 0, &verified(Some(100)), 10); // full, nothing expired: cleared
        assert_eq!(c.len(), 1);
        let mut off = TokenCache::new(0);
        off.put(1, "a", 0, 0, &verified(None), 0);
        assert!(off.is_empty());
    }

    #[test]
    fn negative_cache_remembers_final_refusals_for_the_ttl() {
        let mut n = NegativeCache::new(8, Duration::from_secs(30));
        n.put(1, Failure::Signature, Some((0, 3)), 1_000);
        assert_eq!(n.get(1, 2_000, |_| 3), Some(Failure::Signature));
        assert_eq!(n.get(1, 31_000, |_| 3), None, "past the TTL");
        n.put(1, Failure::Signature, Some((0, 3)), 1_000);
        assert_eq!(n.get(1, 2_000, |_| 4), None, "the provider's keys changed: verify again");
        n.put(2, Failure::Malformed, None, 1_000);
        assert_eq!(n.get(2, 2_000, |_| 99), Some(Failure::Malformed), "no provider: keys do not matter");
        for f in [Failure::UnknownKey, Failure::KeysUnavailable, Failure::NotYetValid] {
            n.put(3, f, Some((0, 3)), 1_000);
            assert_eq!(n.get(3, 1_001, |_| 3), None, "{f:?} can change: never remembered");
        }
        for f in [Failure::Expired, Failure::Issuer, Failure::Audience, Failure::Algorithm] {
            assert!(remembered(f));
        }
    }

    #[test]
    fn negative_cache_is_bounded_and_can_be_off() {
        let mut n = NegativeCache::new(2, Duration::from_secs(1));
        n.put(1, Failure::Signature, None, 0);
        n.put(2, Failure::Signature, None, 500);
        n.put(3, Failure::Signature, None, 1_200); // full: the expired 1 goes
        assert_eq!(n.len(), 2);
        n.put(4, Failure::Signature, None, 1_300); // full, nothing expired: cleared
        assert_eq!(n.len(), 1);
        let mut off = NegativeCache::new(10, Duration::ZERO);
        off.put(1, Failure::Signature, None, 0);
        assert!(off.is_empty());
        let mut off = NegativeCache::new(0, Duration::from_secs(1));
        off.put(1, Failure::Signature, None, 0);
        assert!(off.is_empty());
    }

    #[test]
    fn budget_is_a_token_bucket_of_checks() {
        let mut b = VerifyBudget::new(3);
        let mut allowed = 0;
        for _ in 0..10 {
            if b.allows(1_000) {
                b.charge(1);
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3, "a burst of one second's worth");
        assert!(!b.allows(1_100), "0.3 of a check refilled: not yet");
        assert!(b.allows(1_334), "one check per 333 ms");
        b.charge(1);
        assert!(!b.allows(1_334));
        // A token that needed 2 keys with 1 check left: debt, paid back by time.
        assert!(b.allows(1_667));
        b.charge(2);
        assert!(!b.allows(2_000));
        assert!(b.allows(2_667));
        // Refill never exceeds one second's worth; the clock going back does not mint checks.
        let mut b = VerifyBudget::new(2);
        assert!(b.allows(10_000_000));
        b.charge(1);
        b.charge(1);
        assert!(!b.allows(5));
        assert!(b.allows(10_000_600));
        b.charge(1);
        assert!(!b.allows(10_000_600));
        let mut free = VerifyBudget::new(0);
        free.charge(1_000);
        assert!(free.allows(0), "0: unlimited");
    }
}
