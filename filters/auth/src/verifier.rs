//! One JWT through the per-VM state: verified-token cache, negative cache, provider and key
//! choice (with keys another worker published), the verify budget, the signature and claim
//! checks. Pure over [`VmState`] and a read-only [`Host`] (one shared-data read, only when a
//! remote provider lacks the token's key); the stage decides what to answer and makes the
//! JWKS callout when [`Verdict::Fetch`] says one may help.

use crate::cache::{NegativeCache, TokenCache, TokenHasher, VerifyBudget};
use crate::config::Config;
use crate::jwks::RemoteState;
use crate::jwt::{self, Failure};
use crate::keys::KeySet;
use serde_json::Value;
use sluice_core::host::Host;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Everything one VM (one worker thread) keeps across requests.
#[derive(Debug)]
pub struct VmState {
    /// Remote JWKS state by provider index (unused for static providers).
    pub remote: Vec<RemoteState>,
    /// This VM's token hash key.
    pub hasher: TokenHasher,
    /// Verified tokens.
    pub cache: TokenCache,
    /// Refused tokens.
    pub negative: NegativeCache,
    /// Signature checks per second.
    pub budget: VerifyBudget,
}

impl VmState {
    /// Fresh state for a configuration.
    pub fn new(cfg: &Config) -> Self {
        Self {
            remote: vec![RemoteState::default(); cfg.providers.len()],
            hasher: TokenHasher::default(),
            cache: TokenCache::new(cfg.cache_max_entries),
            negative: NegativeCache::new(cfg.limits.negative_max_entries, cfg.limits.negative_ttl),
            budget: VerifyBudget::new(cfg.limits.max_verifies_per_second),
        }
    }

    /// Key generation of a provider (0 for static keys).
    pub fn generation(&self, provider: usize) -> u64 {
        self.remote.get(provider).map_or(0, |r| r.generation)
    }
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token itself.
    Token(Failure),
    /// This VM's signature-check budget is spent (no crypto was done).
    Budget,
}

/// What to do with a token.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Verified (now or earlier): the claims.
    Verified(Rc<Value>),
    /// Refused.
    Refused(Refusal),
    /// The provider's remote keys lack the token's `kid` (or were never loaded): a JWKS fetch
    /// may help; refuse with `failure` if none can be made.
    Fetch {
        /// Provider index.
        provider: usize,
        /// The refusal if no fetch is made.
        failure: Failure,
    },
}

/// A verdict and what it cost (for metrics and logs).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// Signature checks made.
    pub checks: usize,
    /// Served from the verified-token cache.
    pub cache_hit: bool,
    /// Refused from the negative cache.
    pub negative_hit: bool,
    /// A provider whose keys were adopted from another worker's published JWKS.
    pub adopted: Option<String>,
}

impl Outcome {
    fn of(verdict: Verdict) -> Self {
        Self { verdict, checks: 0, cache_hit: false, negative_hit: false, adopted: None }
    }
}

fn clock(h: &dyn Host) -> (u64, u64) {
    let d = h.now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Verify `token` (`may_fetch`: a JWKS fetch may still be made for it).
pub fn verify(vm: &mut VmState, cfg: &Config, h: &dyn Host, token: &str, may_fetch: bool) -> Outcome {
    let (now, now_ms) = clock(h);
    let VmState { remote, hasher, cache, negative, budget } = vm;
    let key = hasher.key(token);
    let generation = |i: usize| remote.get(i).map_or(0, |r| r.generation);
    // A repeat of a token this VM verified (same bytes, keys unchanged, before `exp`): one
    // hash-map lookup, no parsing, no crypto.
    if let Some((_, claims)) = cache.get(key, token, now, generation) {
        return Outcome { cache_hit: true, ..Outcome::of(Verdict::Verified(claims)) };
    }
    if let Some(f) = negative.get(key, now_ms, generation) {
        return Outcome { negative_hit: true, ..Outcome::of(Verdict::Refused(Refusal::Token(f))) };
    }
    let refuse = |negative: &mut NegativeCache, f: Failure, keys: Option<(usize, u64)>| {
        negative.put(key, f, keys, now_ms);
        Outcome::of(Verdict::Refused(Refusal::Token(f)))
    };
    let peek = match jwt::peek(token) {
        Ok(p) => p,
        Err(f) => return refuse(negative, f, None),
    };
    let idx = match jwt::select_provider(&cfg.providers, &peek) {
        Ok(i) => i,
        Err(f) => return refuse(negative, f, None),
    };
    let Some(provider) = cfg.providers.get(idx) else { return refuse(negative, Failure::Issuer, None) };
    let mut adopted = None;
    let (keys, gen): (&KeySet, u64) = match (&provider.remote, remote.get_mut(idx)) {
        (Some(_), Some(r)) => {
            // Another worker may already hold keys this VM lacks (start-up, rotation).
            let lacks = !r.loaded || peek.kid.as_deref().is_some_and(|k| !r.keys.has_kid(k));
            if lacks && r.sync_shared(h, &provider.name) {
                adopted = Some(provider.name.clone());
            }
            if !r.loaded {
                let verdict = if may_fetch {
                    Verdict::Fetch { provider: idx, failure: Failure::KeysUnavailable }
                } else {
                    Verdict::Refused(Refusal::Token(Failure::KeysUnavailable))
                };
                return Outcome { adopted, ..Outcome::of(verdict) };
            }
            (&r.keys, r.generation)
        }
        _ => (&provider.static_keys, 0),
    };
    let candidates = match jwt::candidates(&peek, provider, keys, cfg.limits.max_keys_per_token) {
        Ok(c) => c,
        Err(Failure::UnknownKey) if may_fetch && provider.remote.is_some() => {
            let verdict = Verdict::Fetch { provider: idx, failure: Failure::UnknownKey };
            return Outcome { adopted, ..Outcome::of(verdict) };
        }
        Err(f) => return Outcome { adopted, ..refuse(negative, f, Some((idx, gen))) },
    };
    if !budget.allows(now_ms) {
        return Outcome { adopted, ..Outcome::of(Verdict::Refused(Refusal::Budget)) };
    }
    let (result, checks) = jwt::verify_with(token, &peek, provider, &candidates, now);
    budget.charge(checks);
    let out = match result {
        Ok(v) => {
            cache.put(key, token, idx, gen, &v, now);
            Outcome::of(Verdict::Verified(v.claims))
        }
        Err(f) => refuse(negative, f, Some((idx, gen))),
    };
    Outcome { checks, adopted, ..out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;
    use sluice_core::host::FakeHost;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &str = "test-secret-0123456789abcdef0123456789";

    fn cfg(extra: Value) -> Config {
        let mut base = json!({"providers": [{"name": "p", "issuer": "iss", "algorithms": ["HS256"],
                                             "hmac_secret_env": "S"}]});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        let env = |n: &str| (n == "S").then(|| SECRET.to_string());
        Config::from_json(base.to_string().as_bytes(), &env).unwrap()
    }

    fn b64url(data: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn host(at: u64) -> FakeHost {
        FakeHost { time: Some(UNIX_EPOCH + Duration::from_millis(at)), ..FakeHost::default() }
    }

    fn token(secret: &str, sub: &str) -> String {
        let claims = json!({"iss": "iss", "sub": sub, "exp": NOW + 3600});
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn verified_then_cached_without_crypto() {
        let c = cfg(json!({}));
        let mut vm = VmState::new(&c);
        let h = host(NOW * 1000);
        let t = token(SECRET, "alice");
        let first = verify(&mut vm, &c, &h, &t, true);
        assert!(matches!(first.verdict, Verdict::Verified(_)));
        assert_eq!((first.checks, first.cache_hit), (1, false));
        let again = verify(&mut vm, &c, &h, &t, true);
        assert_eq!((again.checks, again.cache_hit), (0, true));
    }

    #[test]
    fn the_same_garbage_token_is_refused_once_with_crypto_then_from_the_negative_cache() {
        let c = cfg(json!({}));
        let mut vm = VmState::new(&c);
        let bad = token("another-secret-0123456789abcdef0123456789", "mallory");
        let first = verify(&mut vm, &c, &host(NOW * 1000), &bad, true);
        assert_eq!(first.verdict, Verdict::Refused(Refusal::Token(Failure::Signature)));
        assert_eq!(first.checks, 1);
        for i in 1..50 {
            let o = verify(&mut vm, &c, &host(NOW * 1000 + i * 100), &bad, true);
            assert_eq!(o.verdict, Verdict::Refused(Refusal::Token(Failure::Signature)));
            assert_eq!((o.checks, o.negative_hit), (0, true), "request {i}");
        }
        // After the TTL (default 30 s) it is checked again.
        let later = verify(&mut vm, &c, &host(NOW * 1000 + 31_000), &bad, true);
        assert_eq!((later.checks, later.negative_hit), (1, false));
        // Malformed garbage is remembered too (no provider: keys do not matter).
        assert!(!verify(&mut vm, &c, &host(NOW * 1000), "x.y.z", true).negative_hit);
        assert!(verify(&mut vm, &c, &host(NOW * 1000), "x.y.z", true).negative_hit);
    }

    #[test]
    fn the_budget_refuses_new_tokens_without_crypto_and_cached_ones_still_pass() {
        let c = cfg(json!({"max_verifies_per_second": 3}));
        let mut vm = VmState::new(&c);
        let h = host(NOW * 1000);
        let good = token(SECRET, "alice");
        assert!(matches!(verify(&mut vm, &c, &h, &good, true).verdict, Verdict::Verified(_)));
        let mut checks = 0;
        let mut refused = 0;
        for i in 0..20 {
            let o = verify(&mut vm, &c, &h, &token("wrong-secret-0123456789abcdef0123456789", &format!("u{i}")), true);
            checks += o.checks;
            if o.verdict == Verdict::Refused(Refusal::Budget) {
                refused += 1;
                assert_eq!(o.checks, 0);
            }
        }
        assert_eq!(checks, 2, "3 per second, one spent on the good token");
        assert_eq!(refused, 18);
        assert!(verify(&mut vm, &c, &h, &good, true).cache_hit, "a cached token is never budgeted");
        // A second later the budget is back.
        let later = host(NOW * 1000 + 1_000);
        assert!(matches!(verify(&mut vm, &c, &later, &token(SECRET, "bob"), true).verdict, Verdict::Verified(_)));
    }

    #[test]
    fn a_token_without_kid_tries_at_most_max_keys_per_token() {
        // Four EC keys without kid in an inline JWKS: a garbage ES256 token would try all four.
        let jwk = |x: &str, y: &str| json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "use": "sig"});
        let keys = [
            jwk("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"),
            jwk("gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0", "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps"),
            jwk("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"),
            jwk("gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0", "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps"),
        ];
        let doc =
            json!({"providers": [{"name": "p", "issuer": "iss", "algorithms": ["ES256"], "jwks": {"keys": keys}}]});
        let c = Config::from_json(doc.to_string().as_bytes(), &|_| None).unwrap();
        assert_eq!(c.limits.max_keys_per_token, 2);
        let mut vm = VmState::new(&c);
        let b64 = |v: &Value| b64url(v.to_string().as_bytes());
        let garbage = format!(
            "{}.{}.{}",
            b64(&json!({"alg": "ES256", "typ": "JWT"})),
            b64(&json!({"iss": "iss", "sub": "x", "exp": NOW + 60})),
            b64url(&[7u8; 64])
        );
        let o = verify(&mut vm, &c, &host(NOW * 1000), &garbage, true);
        assert_eq!(o.verdict, Verdict::Refused(Refusal::Token(Failure::Signature)));
        assert_eq!(o.checks, 2, "capped at max_keys_per_token");
    }
}
