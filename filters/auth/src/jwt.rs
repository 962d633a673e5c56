//! JWT verification: header peek, provider selection by `iss`, signature with the
//! provider's keys, then the claim checks (`iss`, `aud`, `exp`, `nbf`, `iat`) done here
//! against the host clock so they are deliberate and testable. jsonwebtoken
//! (`crypto::verify`) checks the signature; its `Validation` is not used, which also sidesteps
//! its `aud` pitfall (a token with `aud` is refused unless audiences are set): the audience
//! rule here is explicit, see `check_claims`.

use crate::config::Provider;
use crate::keys::{Key, KeySet};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::rc::Rc;

/// Longest token accepted; longer is `malformed` before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a token was refused. `class()` is the short reason shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not a JWT (shape, base64, JSON, missing required claim).
    Malformed,
    /// `alg` not accepted by the provider (includes `none`).
    Algorithm,
    /// Signature does not verify, or no key matches.
    Signature,
    /// `kid` not in the key set (may trigger a JWKS refresh).
    UnknownKey,
    /// `exp` passed.
    Expired,
    /// `nbf` / `iat` in the future.
    NotYetValid,
    /// `iss` not a configured issuer.
    Issuer,
    /// `aud` not accepted.
    Audience,
    /// The provider's remote JWKS has never been loaded.
    KeysUnavailable,
}

impl Failure {
    /// Short reason class for the client.
    pub fn class(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::Algorithm => "algorithm",
            Failure::Signature | Failure::UnknownKey => "signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not yet valid",
            Failure::Issuer => "issuer",
            Failure::Audience => "audience",
            Failure::KeysUnavailable => "keys unavailable",
        }
    }

    /// Stable code (`jwt_<class>`).
    pub fn code(self) -> &'static str {
        match self {
            Failure::Malformed => "jwt_malformed",
            Failure::Algorithm => "jwt_algorithm",
            Failure::Signature | Failure::UnknownKey => "jwt_signature",
            Failure::Expired => "jwt_expired",
            Failure::NotYetValid => "jwt_not_yet_valid",
            Failure::Issuer => "jwt_issuer",
            Failure::Audience => "jwt_audience",
            Failure::KeysUnavailable => "jwks_unavailable",
        }
    }
}

/// What the header and (unverified) payload say, enough to pick a provider and key.
#[derive(Debug, Clone, PartialEq)]
pub struct Peek {
    /// Header `alg`.
    pub alg: Algorithm,
    /// Header `kid`.
    pub kid: Option<String>,
    /// Payload `iss` (unverified: only used to pick the provider).
    pub iss: Option<String>,
    /// The payload; trusted only after the signature verified.
    pub payload: Value,
}

/// Check the token's shape and read its header and `iss`.
pub fn peek(token: &str) -> Result<Peek, Failure> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(Failure::Malformed);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, _s] = parts.as_slice() else {
        return Err(Failure::Malformed);
    };
    if !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err(Failure::Malformed);
    }
    let header: Value =
        crate::pem::b64_decode(h).and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Failure::Malformed)?;
    let alg_name = header.get("alg").and_then(Value::as_str).ok_or(Failure::Malformed)?;
    // `none`, lowercase variants and anything unknown are refused as an algorithm problem.
    let alg: Algorithm = alg_name.parse().map_err(|_| Failure::Algorithm)?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(Failure::Malformed),
    };
    let payload: Value =
        crate::pem::b64_decode(p).and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Failure::Malformed)?;
    if !payload.is_object() {
        return Err(Failure::Malformed);
    }
    let iss = payload.get("iss").and_then(Value::as_str).map(str::to_string);
    Ok(Peek { alg, kid, iss, payload })
}

/// The provider for a token: by `iss`; with a single provider, that one (its issuer check
/// then reports `issuer`).
pub fn select_provider(providers: &[Provider], peek: &Peek) -> Result<usize, Failure> {
    if let Some(iss) = &peek.iss {
        if let Some(i) = providers.iter().position(|p| &p.issuer == iss) {
            return Ok(i);
        }
    }
    if providers.len() == 1 {
        return Ok(0);
    }
    Err(Failure::Issuer)
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The claims.
    pub claims: Rc<Value>,
    /// `exp`, seconds since the epoch.
    pub exp: Option<u64>,
}

fn map_err(e: &jsonwebtoken::errors::Error) -> Failure {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidToken
        | K::Base64(_)
        | K::Json(_)
        | K::Utf8(_)
        | K::MissingRequiredClaim(_)
        | K::InvalidClaimFormat(_) => Failure::Malformed,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
            Failure::Algorithm
        }
        K::ExpiredSignature => Failure::Expired,
        K::ImmatureSignature => Failure::NotYetValid,
        K::InvalidIssuer => Failure::Issuer,
        K::InvalidAudience => Failure::Audience,
        _ => Failure::Signature,
    }
}

fn num_claim(claims: &Value, name: &str) -> Result<Option<u64>, Failure> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if let Some(f) = n.as_f64() {
                if f.is_finite() && f >= 0.0 {
                    Ok(Some(f as u64))
                } else {
                    Err(Failure::Malformed)
                }
            } else {
                Err(Failure::Malformed)
            }
        }
        Some(_) => Err(Failure::Malformed),
    }
}

/// The keys to try for a token: the provider must accept its `alg`, and at most `max` keys
/// are returned (with a `kid`, that key first). No crypto here: a token refused at this point
/// cost only its parsing.
pub fn candidates<'k>(peek: &Peek, provider: &Provider, keys: &'k KeySet, max: usize) -> Result<Vec<&'k Key>, Failure> {
    if !provider.algorithms.contains(&peek.alg) {
        return Err(Failure::Algorithm);
    }
    let all = keys.candidates(peek.kid.as_deref(), peek.alg);
    if all.is_empty() {
        return Err(match &peek.kid {
            Some(kid) if !keys.has_kid(kid) => Failure::UnknownKey,
            _ => Failure::Signature,
        });
    }
    Ok(all.into_iter().take(max).collect())
}

/// Check the signature against `keys` (one signature check each, stopping at the first that
/// verifies), then the claims at `now` (seconds). Returns the outcome and how many signature
/// checks ran.
pub fn verify_with(
    token: &str,
    peek: &Peek,
    provider: &Provider,
    keys: &[&Key],
    now: u64,
) -> (Result<Verified, Failure>, usize) {
    // jsonwebtoken checks the signature over `header.payload` as sent; the claims were
    // parsed once in `peek` and are checked below (its own claim validation would parse
    // them again through derive-heavy types that cost wasm size for nothing).
    let Some((message, signature)) = token.rsplit_once('.') else { return (Err(Failure::Malformed), 0) };
    let mut last = Failure::Signature;
    let mut verified = false;
    let mut checks = 0usize;
    for k in keys {
        checks = checks.saturating_add(1);
        match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &k.key, peek.alg) {
            Ok(true) => {
                verified = true;
                break;
            }
            Ok(false) => last = Failure::Signature,
            Err(e) => {
                last = map_err(&e);
                if last != Failure::Signature {
                    break;
                }
            }
        }
    }
    if !verified {
        return (Err(last), checks);
    }
    let claims = peek.payload.clone();
    let checked = check_claims(&claims, provider, now).and_then(|()| num_claim(&claims, "exp"));
    (checked.map(|exp| Verified { claims: Rc::new(claims), exp }), checks)
}

/// Verify with every candidate key (tests and tools; the filter caps the keys tried).
pub fn verify(token: &str, peek: &Peek, provider: &Provider, keys: &KeySet, now: u64) -> Result<Verified, Failure> {
    let keys = candidates(peek, provider, keys, usize::MAX)?;
    verify_with(token, peek, provider, &keys, now).0
}

/// `iss`, `aud`, `exp`, `nbf`, `iat` checks.
pub fn check_claims(claims: &Value, provider: &Provider, now: u64) -> Result<(), Failure> {
    if !claims.is_object() {
        return Err(Failure::Malformed);
    }
    if claims.get("iss").and_then(Value::as_str) != Some(provider.issuer.as_str()) {
        return Err(Failure::Issuer);
    }
    // RFC 7519 4.1.3: a token carrying `aud` is for those audiences only; with none
    // configured we are not one of them. With audiences configured, `aud` is required.
    let aud: Vec<&str> = match claims.get("aud") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(_) => return Err(Failure::Malformed),
    };
    let has_aud = claims.get("aud").is_some_and(|v| !v.is_null());
    if provider.audiences.is_empty() {
        if has_aud {
            return Err(Failure::Audience);
        }
    } else if !aud.iter().any(|a| provider.audiences.iter().any(|w| w == a)) {
        return Err(Failure::Audience);
    }
    let leeway = provider.leeway;
    match num_claim(claims, "exp")? {
        None if provider.require_exp => return Err(Failure::Malformed),
        Some(exp) if exp.saturating_add(leeway) <= now => return Err(Failure::Expired),
        _ => {}
    }
    if let Some(nbf) = num_claim(claims, "nbf")? {
        if nbf > now.saturating_add(leeway) {
            return Err(Failure::NotYetValid);
        }
    }
    if let Some(iat) = num_claim(claims, "iat")? {
        if iat > now.saturating_add(leeway) {
            return Err(Failure::NotYetValid);
        }
    }
    Ok(())
}

/// SHA-256 (API-key lookup, JWKS body change detection).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}
