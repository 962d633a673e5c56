//! Configuration: the JSON is read strictly (unknown fields refused, errors name the field
//! path) and compiled in one pass (keys parsed, policies compiled, durations checked).

use crate::keys::{KeySet, KeySource};
use crate::rules::Rule;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sluice_core::config::{json_kind, parse_duration, validate_header_name, ConfigError};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

/// Filter name used in logs and error messages.
pub const FILTER: &str = "auth";

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
    fn parse(o: &Obj<'_>) -> Result<Self, ConfigError> {
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

/// A JSON object being read, with its dotted path for error messages. Hand-written instead
/// of serde derive + serde_path_to_error: that pair costs about 60 KB of wasm here, and
/// sluice_auth.wasm is size-constrained by the JWT crypto.
pub struct Obj<'a> {
    map: &'a serde_json::Map<String, Value>,
    path: String,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() || path == "." {
        key.to_string()
    } else if key.starts_with('[') {
        format!("{path}{key}")
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Obj<'a> {
    /// Read `v` at `path` as an object.
    pub fn new(v: &'a Value, path: &str) -> Result<Self, ConfigError> {
        match v {
            Value::Object(map) => Ok(Self { map, path: path.to_string() }),
            other => Err(ConfigError::new(
                if path.is_empty() { "." } else { path },
                format!("expected an object, got {}", json_kind(other)),
            )),
        }
    }
    fn err(&self, key: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::new(
            if key == "." {
                if self.path.is_empty() {
                    ".".to_string()
                } else {
                    self.path.clone()
                }
            } else {
                join(&self.path, key)
            },
            why,
        )
    }
    fn known(&self, fields: &[&str]) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !fields.contains(&k.as_str())) {
            Some(k) => Err(self.err(k, format!("unknown field `{k}`, expected one of {}", fields.join(", ")))),
            None => Ok(()),
        }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, got {}", json_kind(v)))),
        }
    }
    fn required(&self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or_else(|| self.err(key, "missing field"))
    }
    fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {}", json_kind(v)))),
        }
    }
    fn count(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {}", json_kind(v)))),
        }
    }
    fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => parse_duration(&s).map(Some).map_err(|e| self.err(key, e)),
        }
    }
    fn object(&self, key: &str) -> Result<Option<Obj<'a>>, ConfigError> {
        self.get(key).map(|v| Obj::new(v, &join(&self.path, key))).transpose()
    }
    /// A list: each element with its path.
    fn list(&self, key: &str) -> Result<Option<Vec<(String, &'a Value)>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let base = join(&self.path, key);
                Ok(Some(a.iter().enumerate().map(|(i, v)| (format!("{base}[{i}]"), v)).collect()))
            }
            Some(v) => Err(self.err(key, format!("expected a list, got {}", json_kind(v)))),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(items) = self.list(key)? else { return Ok(None) };
        items
            .into_iter()
            .map(|(path, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ConfigError::new(path, format!("expected a string, got {}", json_kind(v))))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
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
    /// Claims object (`sub`, `team` and the configured claims).
    pub claims: Value,
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
    /// Model access.
    pub model_access: Option<ModelAccess>,
    /// Body cap.
    pub max_body_bytes: usize,
    /// Cache size.
    pub cache_max_entries: usize,
}

impl Config {
    /// Parse and validate JSON bytes; `env` resolves `hmac_secret_env`.
    pub fn from_json(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let trimmed = bytes.iter().all(u8::is_ascii_whitespace);
        let doc: Value = if trimmed {
            Value::Object(serde_json::Map::new())
        } else {
            let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::new(".", "configuration is not UTF-8"))?;
            serde_json::from_str(text).map_err(|e| ConfigError::new(".", format!("not valid JSON: {e}")))?
        };
        Self::compile(&Obj::new(&doc, "")?, env)
    }

    /// Validate a configuration object.
    pub fn compile(o: &Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        o.known(&[
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
            "model_access",
            "max_body_bytes",
            "cache_max_entries",
            "failure_mode",
        ])?;
        match o.string("failure_mode")?.as_deref() {
            None | Some("deny") => {}
            Some(_) => return Err(o.err("failure_mode", "auth only supports \"deny\"")),
        }
        let mut providers = Vec::new();
        for (path, v) in o.list("providers")?.unwrap_or_default() {
            providers.push(compile_provider(&Obj::new(v, &path)?, env)?);
        }
        for (i, p) in providers.iter().enumerate() {
            if providers.iter().take(i).any(|q| q.issuer == p.issuer) {
                return Err(ConfigError::new(format!("providers[{i}].issuer"), "duplicate issuer"));
            }
        }
        let from = compile_sources(o, "from", Source::bearer())?;
        let (api_key_from, api_keys) = match o.object("api_keys")? {
            None => (Vec::new(), Vec::new()),
            Some(a) => {
                a.known(&["from", "keys"])?;
                let from = compile_sources(&a, "from", Source::Header { name: "x-api-key".into(), prefix: None })?;
                let mut keys = Vec::new();
                for (path, v) in a.list("keys")?.ok_or_else(|| a.err("keys", "missing field"))? {
                    keys.push(compile_api_key(&Obj::new(v, &path)?)?);
                }
                (from, keys)
            }
        };
        let jwt_authn = match o.object("jwt_authn")? {
            None => None,
            Some(j) => {
                j.known(&["payload_in_metadata", "namespace"])?;
                let key = j.required("payload_in_metadata")?;
                let namespace = j.string("namespace")?.unwrap_or_else(|| "envoy.filters.http.jwt_authn".into());
                if key.is_empty() || namespace.is_empty() {
                    return Err(o.err("jwt_authn", "payload_in_metadata and namespace must not be empty"));
                }
                Some(JwtAuthn { namespace, key })
            }
        };
        if providers.is_empty() && api_keys.is_empty() && jwt_authn.is_none() {
            return Err(o.err("providers", "configure at least one of providers, api_keys, jwt_authn"));
        }
        let mut claims_to_headers = Vec::new();
        if let Some(m) = o.object("claims_to_headers")? {
            for (h, c) in m.map {
                let field = join("claims_to_headers", h);
                validate_header_name(h).map_err(|e| ConfigError::new(field.clone(), e))?;
                match c.as_str() {
                    Some(c) if !c.is_empty() => claims_to_headers.push((h.clone(), c.to_string())),
                    _ => return Err(ConfigError::new(field, "expected a non-empty claim path")),
                }
            }
        }
        let claims_to_filter_state = o.strings("claims_to_filter_state")?.unwrap_or_default();
        for (i, c) in claims_to_filter_state.iter().enumerate() {
            if c.is_empty() || c.contains('/') {
                return Err(ConfigError::new(
                    format!("claims_to_filter_state[{i}]"),
                    "claim name must be non-empty, no '/'",
                ));
            }
        }
        let mut policies = BTreeMap::new();
        if let Some(m) = o.object("policies")? {
            for (name, v) in m.map {
                let rule = Rule::compile(v).map_err(|e| e.within(&join("policies", name)))?;
                policies.insert(name.clone(), rule);
            }
        }
        let default_policy = o.string("default_policy")?;
        if let Some(d) = &default_policy {
            if !policies.contains_key(d) {
                return Err(o.err("default_policy", format!("no policy named {d:?}")));
            }
        }
        let model_access = match o.object("model_access")? {
            None => None,
            Some(m) => {
                m.known(&["claim", "models_path"])?;
                let claim = m.string("claim")?.unwrap_or_else(|| "llms.{provider}".into());
                if claim.is_empty() {
                    return Err(m.err("claim", "empty"));
                }
                let models_path = m.string("models_path")?.unwrap_or_else(|| "/v1/models".into());
                if !models_path.starts_with('/') {
                    return Err(m.err("models_path", "must start with /"));
                }
                Some(ModelAccess { claim, models_path })
            }
        };
        let max_body_bytes = o.count("max_body_bytes")?.unwrap_or(1 << 20);
        if max_body_bytes == 0 {
            return Err(o.err("max_body_bytes", "must be > 0"));
        }
        Ok(Config {
            providers,
            from,
            api_key_from,
            api_keys,
            jwt_authn,
            subject_claim: non_empty(o.string("subject_claim")?, "sub", "subject_claim")?,
            team_claim: non_empty(o.string("team_claim")?, "team", "team_claim")?,
            claims_to_filter_state,
            claims_to_headers,
            strip_credentials: o.boolean("strip_credentials")?.unwrap_or(true),
            policies,
            default_policy,
            model_access,
            max_body_bytes,
            cache_max_entries: o.count("cache_max_entries")?.unwrap_or(1024),
        })
    }
}

fn non_empty(v: Option<String>, default: &str, field: &str) -> Result<String, ConfigError> {
    match v {
        None => Ok(default.to_string()),
        Some(s) if s.is_empty() => Err(ConfigError::new(field, "empty")),
        Some(s) => Ok(s),
    }
}

fn compile_sources(o: &Obj<'_>, key: &str, default: Source) -> Result<Vec<Source>, ConfigError> {
    match o.list(key)? {
        None => Ok(vec![default]),
        Some(list) if list.is_empty() => Err(o.err(key, "empty list")),
        Some(list) => list.into_iter().map(|(path, v)| Source::parse(&Obj::new(v, &path)?)).collect(),
    }
}

fn compile_api_key(o: &Obj<'_>) -> Result<ApiKey, ConfigError> {
    o.known(&["sha256", "subject", "team", "claims"])?;
    let hash = parse_hex32(&o.required("sha256")?).ok_or_else(|| o.err("sha256", "expected 64 hex characters"))?;
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
    Ok(ApiKey { hash, claims: Value::Object(claims) })
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

fn compile_provider(o: &Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Provider, ConfigError> {
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
        keys = KeySet::from_jwks(text.as_bytes(), KeySource::Inline).map_err(|e| o.err("jwks", e))?;
        if keys.is_empty() {
            return Err(o.err("jwks", "no usable keys"));
        }
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
    let remote = match o.object("remote_jwks")? {
        None => None,
        Some(r) => {
            sources += 1;
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
            Some(RemoteJwks {
                authority: r.string("authority")?.unwrap_or_else(|| cluster.clone()),
                cluster,
                path,
                refresh_interval,
                min_refresh_interval,
                timeout,
            })
        }
    };
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
        require_exp: o.boolean("require_exp")?.unwrap_or(true),
    })
}
