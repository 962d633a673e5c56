//! Verification keys: parsed once (config load or JWKS fetch), looked up by `kid`.

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The key family a token's `alg` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// RS*/PS*.
    Rsa,
    /// ES256.
    P256,
    /// ES384.
    P384,
    /// EdDSA.
    Ed,
    /// HS*.
    Hmac,
}

/// The family an algorithm needs.
pub fn family_of(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 => Family::P256,
        Algorithm::ES384 => Family::P384,
        Algorithm::EdDSA => Family::Ed,
        _ => Family::Rsa,
    }
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    /// `kid`, if any.
    pub kid: Option<String>,
    /// Family.
    pub family: Family,
    /// `alg` pinned by the JWK, if any.
    pub alg: Option<Algorithm>,
    /// The key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("family", &self.family).finish()
    }
}

/// A set of keys.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    /// Keys, in JWKS order.
    pub keys: Vec<Key>,
}

fn str_field<'a>(jwk: &'a Value, name: &str) -> Option<&'a str> {
    jwk.get(name).and_then(Value::as_str)
}

/// One JWK as a verification key; `None` for keys not usable for signatures here.
/// Parsed from `serde_json::Value` by hand: jsonwebtoken's `JwkSet` deserializer (flatten,
/// untagged enums) costs about 40 KB of wasm.
fn jwk_key(jwk: &Value) -> Option<Result<Key, String>> {
    if str_field(jwk, "use").is_some_and(|u| u != "sig") {
        return None;
    }
    let kid = str_field(jwk, "kid").map(str::to_string);
    let alg = str_field(jwk, "alg").and_then(|a| a.parse::<Algorithm>().ok());
    let need = |name: &str| str_field(jwk, name).ok_or_else(|| format!("JWK {kid:?}: missing {name}"));
    let built = match str_field(jwk, "kty")? {
        "RSA" => {
            (|| Ok((Family::Rsa, DecodingKey::from_rsa_components(need("n")?, need("e")?).map_err(|e| e.to_string())?)))(
            )
        }
        "EC" => {
            let family = match str_field(jwk, "crv")? {
                "P-256" => Family::P256,
                "P-384" => Family::P384,
                _ => return None,
            };
            (|| Ok((family, DecodingKey::from_ec_components(need("x")?, need("y")?).map_err(|e| e.to_string())?)))()
        }
        "OKP" if str_field(jwk, "crv") == Some("Ed25519") => {
            (|| Ok((Family::Ed, DecodingKey::from_ed_components(need("x")?).map_err(|e| e.to_string())?)))()
        }
        // Symmetric keys in a JWKS would let anyone holding the (public) JWKS sign tokens.
        _ => return None,
    };
    Some(built.map(|(family, key)| Key { kid, family, alg, key }))
}

impl KeySet {
    /// Parse a JWKS document. Keys that are not for signatures, symmetric, or of an
    /// unsupported type are skipped silently; keys that fail to parse are skipped and
    /// returned as reasons (the caller logs them with its context); a document that is not a
    /// JWKS is an error.
    pub fn from_jwks(bytes: &[u8]) -> Result<(Self, Vec<String>), String> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        let list = doc.get("keys").and_then(Value::as_array).ok_or("not a JWKS document: no \"keys\" list")?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for jwk in list {
            match jwk_key(jwk) {
                Some(Ok(k)) => keys.push(k),
                Some(Err(e)) => skipped.push(e),
                None => {}
            }
        }
        Ok((Self { keys }, skipped))
    }

    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519).
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "PEM is not UTF-8".to_string())?;
        let (family, der) = crate::pem::parse_public_pem(text)?;
        let key = match family {
            Family::Rsa => DecodingKey::from_rsa_der(&der),
            Family::P256 | Family::P384 => DecodingKey::from_ec_der(&der),
            Family::Ed => DecodingKey::from_ed_der(&der),
            Family::Hmac => return Err("not a public key".into()),
        };
        Ok(Self { keys: vec![Key { kid: None, family, alg: None, key }] })
    }

    /// An HMAC secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self { keys: vec![Key { kid: None, family: Family::Hmac, alg: None, key: DecodingKey::from_secret(secret) }] }
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys that may verify a token with this `kid` and `alg`, best first. With a `kid`, the
    /// keys with that `kid`, then keys that have none; without, every key of the right family
    /// (the caller caps how many are tried: `max_keys_per_token`).
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<&Key> {
        let fam = family_of(alg);
        let usable = |k: &&Key| k.family == fam && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(want) => {
                let exact = self.keys.iter().filter(usable).filter(|k| k.kid.as_deref() == Some(want));
                let anonymous = self.keys.iter().filter(usable).filter(|k| k.kid.is_none());
                exact.chain(anonymous).collect()
            }
            None => self.keys.iter().filter(usable).collect(),
        }
    }

    /// Whether a key with this `kid` exists (any family).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}
