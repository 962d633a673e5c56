//! Plugin configuration, read with the one core reader (`sluice_core::config::Obj`).

use sluice_core::config::{validate_env_var_name, validate_header_name, ConfigError, Obj};
use sluice_core::translate::Dialect;
use std::collections::BTreeMap;
use std::time::Duration;

/// Default request-body cap (bytes); Envoy's own default buffer limit is 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default status the upstream filter shows the router instead of a provider's 429: `429`,
/// i.e. unchanged. Envoy 1.36+ counts a 429 for outlier detection itself
/// (`HttpProtocolOptions.outlier_detection.error_matcher`); `503` restores the old rewrite for
/// Envoy versions without it.
pub const DEFAULT_RATE_LIMIT_STATUS_TO: u32 = 429;
/// Default cap on a provider's requested wait that the upstream role records as a cooldown.
pub const DEFAULT_MAX_COOLDOWN: Duration = Duration::from_secs(3600);
/// Response header the upstream role sets on a context-window error it read, for the route's
/// `retry_policy.retriable_headers`; the downstream role removes it before the client sees it.
pub const RETRY_MARKER_HEADER: &str = "x-sluice-retry";
/// Value of [`RETRY_MARKER_HEADER`] for a prompt longer than the model's context window.
pub const RETRY_MARKER_CONTEXT: &str = "context-length";
/// Request header carrying the per-request group order (base64 of a protobuf `Value`) from the
/// downstream role to Envoy's `header_to_metadata` filter; a client's copy is always removed.
pub const GROUPS_HEADER: &str = "x-sluice-failover-groups";
/// Provider error bodies that mean "the prompt does not fit the model's context window"
/// (matched case-insensitively as substrings of a 400/413/422 body):
/// OpenAI and Azure OpenAI (`context_length_exceeded`, "This model's maximum context length
/// is N tokens"), vLLM (the same sentence; "... is longer than the maximum model length"),
/// Anthropic ("prompt is too long: N tokens > M maximum"), llama.cpp's server
/// (`exceed_context_size_error`, "the request exceeds the available context size"), Ollama
/// ("the input length exceeds the context length"; its chat endpoints truncate instead),
/// Google Gemini ("The input token count (N) exceeds the maximum number of tokens allowed"),
/// AWS Bedrock ("Input is too long for requested model").
pub const DEFAULT_CONTEXT_OVERFLOW_MARKERS: &[&str] = &[
    "context_length_exceeded",
    "maximum context length",
    "longer than the maximum model length",
    "prompt is too long",
    "exceed_context_size_error",
    "exceeds the available context size",
    "exceeds the context length",
    "exceeds the maximum number of tokens allowed",
    "input is too long",
];
/// `max_tokens` sent to an endpoint whose API requires one (Anthropic) when the client's
/// request sets no output cap and the profile sets no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Statuses whose body is checked for [`DEFAULT_CONTEXT_OVERFLOW_MARKERS`].
pub const CONTEXT_OVERFLOW_STATUSES: &[u32] = &[400, 413, 422];
/// Internal response header carrying the provider's original status to the downstream role.
pub const ORIGINAL_STATUS_HEADER: &str = "x-sluice-original-status";
/// The attempt number Envoy's router sends (with `include_request_attempt_count: true`).
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";
/// Request headers only Envoy or sluice may set: the downstream role removes a client's copy.
pub const INTERNAL_REQUEST_HEADERS: &[&str] = &[ATTEMPT_COUNT_HEADER, ORIGINAL_STATUS_HEADER, GROUPS_HEADER];

/// Client credential headers removed before an attempt goes to a provider that takes the
/// gateway's key (the client's credential is for the gateway, never for a provider):
/// OpenAI/most (`authorization`), Azure OpenAI (`api-key`), Anthropic (`x-api-key`), Google
/// (`x-goog-api-key`), AWS session tokens (`x-amz-security-token`), proxies
/// (`proxy-authorization`) and browser sessions (`cookie`).
pub const DEFAULT_CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-amz-security-token",
];

/// Which half of the filter this instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Cluster upstream filter: runs once per attempt.
    #[default]
    Upstream,
    /// Connection-manager filter: removes client copies of internal headers, writes the
    /// per-request group order from the cooldown table, restores the provider's original
    /// status and removes internal response headers.
    Downstream,
    /// Connection-manager filter after `header_to_metadata`: clears the route cache so the
    /// first attempt's cluster is picked with the group order the downstream role wrote.
    RouteRefresh,
}

/// How the client's own credential is handled for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Remove the client's credentials; send the provider key from `credential_env` if set.
    #[default]
    Provider,
    /// Forward the client's credential in the profile's `credential_header` (default
    /// `authorization`) unchanged; every other client credential header is still removed.
    Passthrough,
}

impl AuthMode {
    /// Parse a config or metadata value.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "provider" => Some(Self::Provider),
            "passthrough" => Some(Self::Passthrough),
            _ => None,
        }
    }
}

/// A named provider profile. Endpoint (or cluster) metadata with the same key overrides each
/// field except `client_credential_headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderProfile {
    /// Replacement request path.
    pub path: Option<String>,
    /// Replacement authority.
    pub authority: Option<String>,
    /// Env var with the key.
    pub credential_env: Option<String>,
    /// Header carrying the key.
    pub credential_header: Option<String>,
    /// Prefix before the key.
    pub credential_prefix: Option<String>,
    /// Client-credential handling.
    pub auth: Option<AuthMode>,
    /// Client credential headers to remove (replaces the top-level list for this profile).
    pub client_credential_headers: Option<Vec<String>>,
    /// The API the provider speaks (`openai`: whatever the client sent; `anthropic`: an
    /// OpenAI chat request is translated to Messages and the answer back).
    pub api: Option<Dialect>,
    /// `max_tokens` for a translated request without an output cap.
    pub max_tokens: Option<u64>,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Which half this instance is.
    pub role: Role,
    /// Backup models, in order (empty: none).
    pub backup_models: Vec<String>,
    /// Body cap in bytes.
    pub max_body_bytes: usize,
    /// Status shown to the router instead of 429 (`429`: unchanged).
    pub rate_limit_status_to: u32,
    /// Provider profiles by name.
    pub providers: BTreeMap<String, ProviderProfile>,
    /// Client credential headers removed before every attempt (see
    /// [`DEFAULT_CLIENT_CREDENTIAL_HEADERS`]).
    pub client_credential_headers: Vec<String>,
    /// Mark a provider's context-window error retriable ([`RETRY_MARKER_HEADER`]).
    pub retry_context_overflow: bool,
    /// Lowercase substrings of an error body that mean a context-window overflow.
    pub context_overflow_markers: Vec<String>,
    /// Longest cooldown recorded for a rate-limited cluster.
    pub max_cooldown: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Upstream,
            backup_models: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            rate_limit_status_to: DEFAULT_RATE_LIMIT_STATUS_TO,
            providers: BTreeMap::new(),
            client_credential_headers: DEFAULT_CLIENT_CREDENTIAL_HEADERS.iter().map(|s| s.to_string()).collect(),
            retry_context_overflow: false,
            context_overflow_markers: DEFAULT_CONTEXT_OVERFLOW_MARKERS.iter().map(|s| s.to_string()).collect(),
            max_cooldown: DEFAULT_MAX_COOLDOWN,
        }
    }
}

/// Check a path value (metadata or config).
pub fn validate_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path {p:?} must start with /"));
    }
    if p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("path {p:?} contains spaces or control characters"));
    }
    Ok(())
}

/// Check an authority value (metadata or config).
pub fn validate_authority(a: &str) -> Result<(), String> {
    if a.is_empty() || a.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'/' || b == b'@') {
        return Err(format!("authority {a:?} must be host[:port]"));
    }
    Ok(())
}

/// Check a header value we will send (no CR/LF/NUL).
pub fn validate_header_value(v: &str) -> Result<(), String> {
    if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err("value contains CR, LF or NUL".into());
    }
    Ok(())
}

/// Check a header the filter sets or removes: a lowercase name, not a pseudo-header.
pub fn validate_credential_header(h: &str) -> Result<(), String> {
    validate_header_name(h)?;
    if h.starts_with(':') {
        return Err("pseudo-headers are not allowed".into());
    }
    Ok(())
}

fn header_list(o: &Obj<'_>, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = o.strings(key)? else { return Ok(None) };
    for (i, h) in list.iter().enumerate() {
        validate_credential_header(h).map_err(|why| ConfigError::new(format!("{}[{i}]", o.field_path(key)), why))?;
    }
    Ok(Some(list))
}

fn provider(o: Obj<'_>) -> Result<ProviderProfile, ConfigError> {
    o.known(&[
        "path",
        "authority",
        "credential_env",
        "credential_header",
        "credential_prefix",
        "auth",
        "client_credential_headers",
        "api",
        "max_tokens",
    ])?;
    let path = o.string("path")?;
    if let Some(p) = &path {
        validate_path(p).map_err(|e| o.err("path", e))?;
    }
    let authority = o.string("authority")?;
    if let Some(a) = &authority {
        validate_authority(a).map_err(|e| o.err("authority", e))?;
    }
    let credential_env = o.string("credential_env")?;
    if let Some(e) = &credential_env {
        validate_env_var_name(e).map_err(|why| o.err("credential_env", why))?;
    }
    let credential_header = o.string("credential_header")?;
    if let Some(h) = &credential_header {
        validate_credential_header(h).map_err(|e| o.err("credential_header", e))?;
    }
    let credential_prefix = o.string("credential_prefix")?;
    if let Some(p) = &credential_prefix {
        validate_header_value(p).map_err(|e| o.err("credential_prefix", e))?;
    }
    let auth = match o.choice("auth", &["provider", "passthrough"])? {
        Some(s) => AuthMode::parse(&s),
        None => None,
    };
    let api = match o.choice("api", Dialect::NAMES)? {
        Some(s) => Dialect::parse(&s),
        None => None,
    };
    let max_tokens = match o.u64("max_tokens")? {
        Some(0) => return Err(o.err("max_tokens", "must be greater than 0")),
        n => n,
    };
    Ok(ProviderProfile {
        path,
        authority,
        credential_env,
        credential_header,
        credential_prefix,
        auth,
        client_credential_headers: header_list(&o, "client_credential_headers")?,
        api,
        max_tokens,
    })
}

impl Config {
    /// Read and check the configuration object.
    pub fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(&[
            "role",
            "backup_models",
            "max_body_bytes",
            "rate_limit_status_to",
            "providers",
            "client_credential_headers",
            "retry_context_overflow",
            "context_overflow_markers",
            "max_cooldown",
        ])?;
        let role = match o.choice("role", &["upstream", "downstream", "route_refresh"])?.as_deref() {
            Some("downstream") => Role::Downstream,
            Some("route_refresh") => Role::RouteRefresh,
            _ => Role::Upstream,
        };
        if role != Role::Upstream {
            for key in
                ["backup_models", "retry_context_overflow", "context_overflow_markers", "max_cooldown", "providers"]
            {
                if o.has(key) {
                    return Err(o.err(key, "only the upstream role (cluster http_filters) uses this field"));
                }
            }
        }
        let backup_models = match o.strings("backup_models")? {
            None => Vec::new(),
            Some(list) if list.is_empty() => {
                return Err(
                    o.err("backup_models", "must list at least one model (omit the field to disable backup models)")
                )
            }
            Some(list) => {
                if let Some(i) = list.iter().position(|m| m.trim().is_empty()) {
                    return Err(ConfigError::new(format!("backup_models[{i}]"), "empty model name"));
                }
                list
            }
        };
        let max_body_bytes = match o.count("max_body_bytes")? {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(0) => return Err(o.err("max_body_bytes", "must be greater than 0")),
            Some(n) => n,
        };
        let rate_limit_status_to = match o.u64("rate_limit_status_to")? {
            None => DEFAULT_RATE_LIMIT_STATUS_TO,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (100..=599).contains(n))
                .ok_or_else(|| o.err("rate_limit_status_to", "must be an HTTP status (100-599)"))?,
        };
        let mut providers = BTreeMap::new();
        for (name, p) in o.named("providers", |_, p| provider(p))?.unwrap_or_default() {
            if name.is_empty() {
                return Err(o.err("providers", "empty provider name"));
            }
            providers.insert(name, p);
        }
        let client_credential_headers = header_list(&o, "client_credential_headers")?
            .unwrap_or_else(|| DEFAULT_CLIENT_CREDENTIAL_HEADERS.iter().map(|s| s.to_string()).collect());
        let retry_context_overflow = o.flag("retry_context_overflow", false)?;
        let context_overflow_markers = match o.strings("context_overflow_markers")? {
            None => DEFAULT_CONTEXT_OVERFLOW_MARKERS.iter().map(|s| s.to_string()).collect(),
            Some(list) if list.is_empty() => {
                return Err(
                    o.err("context_overflow_markers", "must list at least one marker (omit it for the defaults)")
                )
            }
            Some(list) => {
                if let Some(i) = list.iter().position(|m| m.trim().is_empty()) {
                    return Err(ConfigError::new(format!("context_overflow_markers[{i}]"), "empty marker"));
                }
                list.iter().map(|m| m.trim().to_ascii_lowercase()).collect()
            }
        };
        let max_cooldown = match o.duration("max_cooldown")? {
            None => DEFAULT_MAX_COOLDOWN,
            Some(d) if d.is_zero() => return Err(o.err("max_cooldown", "must be greater than 0")),
            Some(d) => d.min(crate::retry_after::MAX_WAIT),
        };
        Ok(Self {
            role,
            backup_models,
            max_body_bytes,
            rate_limit_status_to,
            providers,
            client_credential_headers,
            retry_context_overflow,
            context_overflow_markers,
            max_cooldown,
        })
    }
}

/// Parse and check a whole configuration document (empty means `{}`): tests, config-check.
pub fn load(bytes: &[u8]) -> Result<Config, ConfigError> {
    sluice_core::config::read(bytes, Config::load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_upstream_defaults() {
        assert_eq!(load(b"").unwrap(), Config::default());
        assert_eq!(load(b"{}").unwrap(), Config::default());
        assert!(Config::default().client_credential_headers.iter().any(|h| h == "x-api-key"));
    }

    #[test]
    fn full_config() {
        let c = load(
            br#"{"role":"upstream","backup_models":["gpt-4.0-turbo","gpt-3.5-turbo"],"max_body_bytes":1000,
                "rate_limit_status_to":503,"client_credential_headers":["authorization","x-custom-key"],
                "providers":{"openai":{"credential_env":"OPENAI_API_KEY","authority":"api.openai.com","path":"/v1/chat/completions"},
                             "azure":{"credential_env":"AZURE_KEY","credential_header":"api-key","credential_prefix":""},
                             "local":{"auth":"passthrough","client_credential_headers":["cookie"]}}}"#,
        )
        .unwrap();
        assert_eq!(c.backup_models, vec!["gpt-4.0-turbo", "gpt-3.5-turbo"]);
        assert_eq!(c.max_body_bytes, 1000);
        assert_eq!(c.client_credential_headers, ["authorization", "x-custom-key"]);
        assert_eq!(c.providers["azure"].credential_header.as_deref(), Some("api-key"));
        assert_eq!(c.providers["local"].auth, Some(AuthMode::Passthrough));
        assert_eq!(c.providers["local"].client_credential_headers.as_deref(), Some(&["cookie".to_string()][..]));
        let a = load(
            br#"{"providers":{"claude":{"api":"anthropic","max_tokens":1024,"credential_env":"ANTHROPIC_API_KEY"}}}"#,
        )
        .unwrap();
        assert_eq!(a.providers["claude"].api, Some(Dialect::Anthropic));
        assert_eq!(a.providers["claude"].max_tokens, Some(1024));
        assert_eq!(load(br#"{"role":"downstream"}"#).unwrap().role, Role::Downstream);
        assert_eq!(load(br#"{"role":"route_refresh"}"#).unwrap().role, Role::RouteRefresh);
        let c =
            load(br#"{"retry_context_overflow":true,"context_overflow_markers":["Too Long"],"max_cooldown":"90s"}"#)
                .unwrap();
        assert!(c.retry_context_overflow);
        assert_eq!(c.context_overflow_markers, ["too long"]);
        assert_eq!(c.max_cooldown, Duration::from_secs(90));
        assert_eq!(Config::default().rate_limit_status_to, 429, "native: no rewrite by default");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"backup_model":["a"]}"#, "backup_model: unknown field `backup_model`"),
            (r#"{"backup_models":[]}"#, "backup_models: must list at least one model"),
            (r#"{"backup_models":["a",""]}"#, "backup_models[1]"),
            (
                r#"{"providers":{"openai":{"credential_env":"OPENAI-KEY"}}}"#,
                "providers.openai.credential_env: invalid environment variable name",
            ),
            (r#"{"providers":{"openai":{"credential_env":"1KEY"}}}"#, "providers.openai.credential_env"),
            (r#"{"providers":{"openai":{"credential_header":"Api Key"}}}"#, "providers.openai.credential_header"),
            (r#"{"providers":{"openai":{"credential_header":":path"}}}"#, "providers.openai.credential_header"),
            (r#"{"providers":{"openai":{"path":"v1/chat"}}}"#, "providers.openai.path"),
            (r#"{"providers":{"openai":{"authority":"a/b"}}}"#, "providers.openai.authority"),
            (r#"{"providers":{"openai":{"credential_prefix":"Bearer \n"}}}"#, "providers.openai.credential_prefix"),
            (r#"{"providers":{"openai":{"key":"x"}}}"#, "providers.openai.key: unknown field `key`"),
            (r#"{"providers":{"openai":{"auth":"maybe"}}}"#, "providers.openai.auth"),
            (r#"{"providers":{"a":{"api":"gemini"}}}"#, "providers.a.api"),
            (r#"{"providers":{"a":{"max_tokens":0}}}"#, "providers.a.max_tokens: must be greater than 0"),
            (r#"{"providers":{"a":{"max_tokens":"many"}}}"#, "providers.a.max_tokens"),
            (
                r#"{"providers":{"o":{"client_credential_headers":["X-Key"]}}}"#,
                "providers.o.client_credential_headers[0]",
            ),
            (r#"{"client_credential_headers":"authorization"}"#, "client_credential_headers: expected a list"),
            (r#"{"role":"sideways"}"#, "role"),
            (r#"{"max_body_bytes":0}"#, "max_body_bytes"),
            (r#"{"rate_limit_status_to":42}"#, "rate_limit_status_to"),
            (r#"{"role":"downstream","backup_models":["a"]}"#, "backup_models: only the upstream role"),
            (r#"{"role":"route_refresh","providers":{}}"#, "providers: only the upstream role"),
            (r#"{"retry_context_overflow":"yes"}"#, "retry_context_overflow"),
            (r#"{"context_overflow_markers":[]}"#, "context_overflow_markers: must list"),
            (r#"{"context_overflow_markers":["a"," "]}"#, "context_overflow_markers[1]"),
            (r#"{"max_cooldown":"soon"}"#, "max_cooldown"),
            (r#"{"max_cooldown":"0s"}"#, "max_cooldown: must be greater than 0"),
            (r#"5"#, "expected an object"),
        ];
        for (json, want) in cases {
            let e = load(json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(want), "{json}: got {e}");
        }
    }

    #[test]
    fn auth_mode_parse() {
        assert_eq!(AuthMode::parse("passthrough"), Some(AuthMode::Passthrough));
        assert_eq!(AuthMode::parse(" provider "), Some(AuthMode::Provider));
        assert_eq!(AuthMode::parse("x"), None);
    }
}
