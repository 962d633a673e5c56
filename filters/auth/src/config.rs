//! Configuration, read with the one core reader (`sluice_core::config::Obj`): unknown fields
//! refused, errors name the field path, and everything compiled in one pass (keys parsed,
//! policies compiled, durations checked).

use crate::keys::KeySet;
use crate::rules::Rule;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sluice_core::config::{validate_header_name, ConfigError, Obj};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

/// A compiled credential source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Header, with an optional scheme prefix.
    Header { name: String, prefix: Option<String> },
    /// Query parameter.
    Query(String),
    /// Cookie.
    Cookie(String),
}

impl Source {
    fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(&["header", "prefix", "query", "cookie"])?;
        let (header, query, cookie) = (o.string("header")?, o.string("query")?, o.string("cookie")?);
        let prefix = o.string("prefix")?;
        if [header.is_some(), query.is_some(), cookie.is_some()].iter().filter(|b| **b).count() != 1 {
            return Err(o.err(".", "set exactly one of header, query, cookie"));
        }
        if let Some(h) = header {
            validate_header_name(&h).map_err(|e| o.err("header", e))?;
            return Ok(Source::Header { name: h, prefix: prefix.filter(|p| !p.is_empty()) });
        }
        if prefix.is_some() {
            return Err(o.err("prefix", "only valid with header"));
        }
        match (query, cookie) {
            (Some(q), _) if !q.is_empty() => Ok(Source::Query(q)),
            (_, Some(c)) if !c.is_empty() => Ok(Source::Cookie(c)),
            (Some(_), _) => Err(o.err("query", "empty")),
            _ => Err(o.err("cookie", "empty")),
        }
    }

    /// The default JWT source: `Authorization: Bearer <token>`.
    pub fn bearer() -> Self {
        Source::Header { name: "authorization".into(), prefix: Some("Bearer ".into()) }
    }
}

/// Compiled remote JWKS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    /// Envoy cluster.
    pub cluster: String,
    /// Path.
    pub path: String,
    /// Authority.
    pub authority: String,
    /// Refresh period.
    pub refresh_interval: Duration,
    /// Rate limit between fetches.
    pub min_refresh_interval: Duration,
    /// Callout timeout.
    pub timeout: Duration,
}

/// A compiled JWT provider.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Name.
    pub name: String,
    /// Issuer.
    pub issuer: String,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Allowed algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Static keys (inline JWKS, PEM, HMAC).
    pub static_keys: KeySet,
    /// Remote JWKS.
    pub remote: Option<RemoteJwks>,
    /// Leeway in seconds.
    pub leeway: u64,
    /// `exp` required.
    pub require_exp: bool,
}

/// A compiled API key: claims include `sub` and `team`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Stable id published for the caller (`sluice.key_id`): the first 32 hex digits of the
    /// hash, never the key.
    pub key_id: String,
    /// Claims object (`sub`, `team` and the configured claims).
    pub claims: std::rc::Rc<Value>,
}

/// Compiled jwt_authn settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthn {
    /// Namespace.
    pub namespace: String,
    /// Key.
    pub key: String,
}

/// Compiled model access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAccess {
    /// Claim template.
    pub claim: String,
    /// Models-list path suffix.
    pub models_path: String,
}

/// What bounds JWT verification work per worker VM (issue 13 §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyLimits {
    /// How long a refused token is remembered (`ZERO`: not at all).
    pub negative_ttl: Duration,
    /// Refused tokens remembered at most.
    pub negative_max_entries: usize,
    /// Keys tried for one token (a token without `kid` matches every key of its family).
    pub max_keys_per_token: usize,
    /// Signature checks per second per VM (token bucket, burst of one second; 0: unlimited).
    pub max_verifies_per_second: u64,
}

/// The compiled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Providers.
    pub providers: Vec<Provider>,
    /// JWT sources.
    pub from: Vec<Source>,
    /// API key sources.
    pub api_key_from: Vec<Source>,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
    /// jwt_authn.
    pub jwt_authn: Option<JwtAuthn>,
    /// Subject claim path.
    pub subject_claim: String,
    /// Team claim path.
    pub team_claim: String,
    /// Claims to filter state.
    pub claims_to_filter_state: Vec<String>,
    /// Header -> claim path.
    pub claims_to_headers: Vec<(String, String)>,
    /// Strip credentials.
    pub strip_credentials: bool,
    /// Policies.
    pub policies: BTreeMap<String, Rule>,
    /// Default policy.
    pub default_policy: Option<String>,
    /// A route with no `auth_policy` and no `default_policy` is refused (403 `no_policy`).
    pub require_policy: bool,
    /// Model access.
    pub model_access: Option<ModelAccess>,
    /// Body cap.
    pub max_body_bytes: usize,
    /// Cache size.
    pub cache_max_entries: usize,
    /// Verification bounds.
    pub limits: VerifyLimits,
}

const FIELDS: &[&str] = &[
    "providers",
    "from",
    "api_keys",
    "jwt_authn",
    "subject_claim",
    "team_claim",
    "claims_to_filter_state",
    "claims_to_headers",
    "strip_credentials",
    "policies",
    "default_policy",
    "require_policy",
    "model_access",
    "max_body_bytes",
    "cache_max_entries",
    "negative_cache_ttl",
    "negative_cache_max_entries",
    "max_keys_per_token",
    "max_verifies_per_second",
    "failure_mode",
];

impl Config {
    /// Parse and validate a whole configuration document; `env` resolves `hmac_secret_env`.
    /// (What `sluice-config-check` and the native tests call; the filter loads through
    /// [`crate::load`].)
    pub fn from_json(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, |o| Self::load(o, env))
    }

    /// Read and validate a configuration object.
    pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        o.known(FIELDS)?;
        match o.string("failure_mode")?.as_deref() {
            None | Some("deny") => {}
            Some(_) => return Err(o.err("failure_mode", "auth only supports \"deny\"")),
        }
        let providers = o.objects("providers", |p| load_provider(p, env))?.unwrap_or_default();
        for (i, p) in providers.iter().enumerate() {
            if providers.iter().take(i).any(|q| q.issuer == p.issuer) {
                return Err(o.err(&format!("providers[{i}].issuer"), "duplicate issuer"));
            }
        }
        let from = load_sources(o, "from", Source::bearer())?;
        let (api_key_from, api_keys) = o
            .object("api_keys", |a| {
                a.known(&["from", "keys"])?;
                let from = load_sources(a, "from", Source::Header { name: "x-api-key".into(), prefix: None })?;
                let keys = a.objects("keys", load_api_key)?.ok_or_else(|| a.err("keys", "missing field"))?;
                Ok((from, keys))
            })?
            .unwrap_or_default();
        let jwt_authn = o.object("jwt_authn", |j| {
            j.known(&["payload_in_metadata", "namespace"])?;
            let key = j.required("payload_in_metadata")?;
            let namespace = j.string("namespace")?.unwrap_or_else(|| "envoy.filters.http.jwt_authn".into());
            if key.is_empty() || namespace.is_empty() {
                return Err(j.err(".", "payload_in_metadata and namespace must not be empty"));
            }
            Ok(JwtAuthn { namespace, key })
        })?;
        if providers.is_empty() && api_keys.is_empty() && jwt_authn.is_none() {
            return Err(o.err("providers", "configure at least one of providers, api_keys, jwt_authn"));
        }
        let claims_to_headers = o
            .object("claims_to_headers", |m| {
                let mut out = Vec::with_capacity(m.len());
                for (h, c) in m.entries() {
                    validate_header_name(h).map_err(|e| m.err(h, e))?;
                    match c.as_str() {
                        Some(c) if !c.is_empty() => out.push((h.clone(), c.to_string())),
                        _ => return Err(m.err(h, "expected a non-empty claim path")),
                    }
                }
                Ok(out)
            })?
            .unwrap_or_default();
        let claims_to_filter_state = o.strings("claims_to_filter_state")?.unwrap_or_default();
        for (i, c) in claims_to_filter_state.iter().enumerate() {
            if c.is_empty() || c.contains('/') {
                return Err(o.err(&format!("claims_to_filter_state[{i}]"), "claim name must be non-empty, no '/'"));
            }
        }
        let policies = o
            .object("policies", |m| {
                let mut out = BTreeMap::new();
                for (name, v) in m.entries() {
                    let rule = Rule::compile(v).map_err(|e| e.within(&m.field_path(name)))?;
                    out.insert(name.clone(), rule);
                }
                Ok(out)
            })?
            .unwrap_or_default();
        let default_policy = o.string("default_policy")?;
        if let Some(d) = &default_policy {
            if !policies.contains_key(d) {
                return Err(o.err("default_policy", format!("no policy named {d:?}")));
            }
        }
        let model_access = o.object("model_access", |m| {
            m.known(&["claim", "models_path"])?;
            let claim = m.string("claim")?.unwrap_or_else(|| "llms.{provider}".into());
            if claim.is_empty() {
                return Err(m.err("claim", "empty"));
            }
            let path = m.string("models_path")?.unwrap_or_else(|| "/v1/models".into());
            // `/v1/models/` and `/v1/models` name the same list.
            let models_path = path.trim_end_matches('/').to_string();
            if !path.starts_with('/') || models_path.is_empty() {
                return Err(m.err("models_path", "must start with / and name a path, e.g. /v1/models"));
            }
            Ok(ModelAccess { claim, models_path })
        })?;
        let max_body_bytes = o.count("max_body_bytes")?.unwrap_or(1 << 20);
        if max_body_bytes == 0 {
            return Err(o.err("max_body_bytes", "must be > 0"));
        }
        let max_keys_per_token = o.count("max_keys_per_token")?.unwrap_or(2);
        if max_keys_per_token == 0 {
            return Err(o.err("max_keys_per_token", "must be at least 1"));
        }
        let limits = VerifyLimits {
            negative_ttl: o.duration("negative_cache_ttl")?.unwrap_or(Duration::from_secs(30)),
            negative_max_entries: o.count("negative_cache_max_entries")?.unwrap_or(1024),
            max_keys_per_token,
            max_verifies_per_second: o.u64("max_verifies_per_second")?.unwrap_or(200),
        };
        Ok(Config {
            providers,
            from,
            api_key_from,
            api_keys,
            jwt_authn,
            subject_claim: non_empty(o, "subject_claim", "sub")?,
            team_claim: non_empty(o, "team_claim", "team")?,
            claims_to_filter_state,
            claims_to_headers,
            strip_credentials: o.flag("strip_credentials", true)?,
            policies,
            default_policy,
            require_policy: o.flag("require_policy", true)?,
            model_access,
            max_body_bytes,
            cache_max_entries: o.count("cache_max_entries")?.unwrap_or(1024),
            limits,
        })
    }
}

fn non_empty(o: Obj<'_>, key: &str, default: &str) -> Result<String, ConfigError> {
    match o.string(key)? {
        None => Ok(default.to_string()),
        Some(s) if s.is_empty() => Err(o.err(key, "empty")),
        Some(s) => Ok(s),
    }
}

fn load_sources(o: Obj<'_>, key: &str, default: Source) -> Result<Vec<Source>, ConfigError> {
    match o.objects(key, Source::load)? {
        None => Ok(vec![default]),
        Some(list) if list.is_empty() => Err(o.err(key, "empty list")),
        Some(list) => Ok(list),
    }
}

fn load_api_key(o: Obj<'_>) -> Result<ApiKey, ConfigError> {
    o.known(&["sha256", "subject", "team", "claims"])?;
    let hex = o.required("sha256")?;
    let hash = parse_hex32(&hex).ok_or_else(|| o.err("sha256", "expected 64 hex characters"))?;
    let subject = o.required("subject")?;
    if subject.is_empty() {
        return Err(o.err("subject", "empty"));
    }
    let mut claims = match o.get("claims") {
        None => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(o.err("claims", "must be an object")),
    };
    claims.insert("sub".into(), Value::String(subject));
    if let Some(t) = o.string("team")? {
        claims.insert("team".into(), Value::String(t));
    }
    Ok(ApiKey { hash, key_id: key_id(&hash), claims: std::rc::Rc::new(Value::Object(claims)) })
}

/// The published id of an API key: the first 32 hex digits (16 bytes) of its SHA-256.
pub fn key_id(hash: &[u8; 32]) -> String {
    hash.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Parse 64 hex characters.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(i * 2..i * 2 + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn load_provider(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Provider, ConfigError> {
    o.known(&[
        "name",
        "issuer",
        "audiences",
        "algorithms",
        "jwks",
        "remote_jwks",
        "public_key_pem",
        "hmac_secret_env",
        "leeway",
        "require_exp",
    ])?;
    let name = o.required("name")?;
    if name.is_empty() {
        return Err(o.err("name", "empty"));
    }
    let issuer = o.required("issuer")?;
    if issuer.is_empty() {
        return Err(o.err("issuer", "empty"));
    }
    let names = o.strings("algorithms")?.unwrap_or_else(|| vec!["RS256".into()]);
    if names.is_empty() {
        return Err(o.err("algorithms", "empty list"));
    }
    let mut algorithms = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let a = Algorithm::from_str(n)
            .map_err(|_| o.err(&format!("algorithms[{i}]"), format!("unknown algorithm {n:?}")))?;
        algorithms.push(a);
    }
    let mut keys = KeySet::default();
    let mut sources = 0;
    if let Some(j) = o.get("jwks") {
        sources += 1;
        let text = match j {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let (set, skipped) = KeySet::from_jwks(text.as_bytes()).map_err(|e| o.err("jwks", e))?;
        for why in skipped {
            log::warn!("{} #root: providers {name:?}: skipping JWK: {why}", crate::NAME);
        }
        if set.is_empty() {
            return Err(o.err("jwks", "no usable keys"));
        }
        keys = set;
    }
    if let Some(pem) = o.string("public_key_pem")? {
        sources += 1;
        keys = KeySet::from_pem(pem.as_bytes()).map_err(|e| o.err("public_key_pem", e))?;
    }
    let hmac_var = o.string("hmac_secret_env")?;
    if let Some(var) = &hmac_var {
        sources += 1;
        let secret = env(var)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| o.err("hmac_secret_env", format!("environment variable {var} is not set")))?;
        keys = KeySet::from_secret(secret.as_bytes());
    }
    let remote = o.object("remote_jwks", load_remote)?;
    if remote.is_some() {
        sources += 1;
    }
    if sources != 1 {
        return Err(o.err("jwks", "set exactly one of jwks, remote_jwks, public_key_pem, hmac_secret_env"));
    }
    // Refuse alg/key-type mismatches at load time: an HMAC provider must not list RSA and
    // vice versa (the HS/RS confusion attack needs both in one provider).
    let hmac = hmac_var.is_some();
    for (i, a) in algorithms.iter().enumerate() {
        let is_hmac = matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        if is_hmac != hmac {
            return Err(o.err(
                &format!("algorithms[{i}]"),
                if hmac { "an hmac_secret_env provider accepts only HS*" } else { "HS* needs hmac_secret_env" },
            ));
        }
    }
    Ok(Provider {
        name,
        issuer,
        audiences: o.strings("audiences")?.unwrap_or_default(),
        algorithms,
        static_keys: keys,
        remote,
        leeway: o.duration("leeway")?.unwrap_or(Duration::from_secs(60)).as_secs(),
        require_exp: o.flag("require_exp", true)?,
    })
}

fn load_remote(r: Obj<'_>) -> Result<RemoteJwks, ConfigError> {
    r.known(&["cluster", "path", "authority", "refresh_interval", "min_refresh_interval", "timeout"])?;
    let cluster = r.required("cluster")?;
    if cluster.is_empty() {
        return Err(r.err("cluster", "empty"));
    }
    let path = r.required("path")?;
    if !path.starts_with('/') {
        return Err(r.err("path", "must start with /"));
    }
    let refresh_interval = r.duration("refresh_interval")?.unwrap_or(Duration::from_secs(300));
    if refresh_interval < Duration::from_secs(1) {
        return Err(r.err("refresh_interval", "must be at least 1s"));
    }
    let min_refresh_interval = r.duration("min_refresh_interval")?.unwrap_or(Duration::from_secs(10));
    let timeout = r.duration("timeout")?.unwrap_or(Duration::from_secs(2));
    if timeout.is_zero() {
        return Err(r.err("timeout", "must be > 0"));
    }
    Ok(RemoteJwks {
        authority: r.string("authority")?.unwrap_or_else(|| cluster.clone()),
        cluster,
        path,
        refresh_interval,
        min_refresh_interval,
        timeout,
    })
}
