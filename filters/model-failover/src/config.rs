//! Plugin configuration: read strictly, then checked (`Config::try_from(raw)`).

use serde::Deserialize;
use sluice_core::config::{parse_json_config, validate_env_var_name, validate_header_name, ConfigError};
use std::collections::BTreeMap;

/// Default request-body cap (bytes); Envoy's own default buffer limit is 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default status the upstream filter shows the router instead of a provider's 429.
pub const DEFAULT_RATE_LIMIT_STATUS_TO: u32 = 503;
/// Internal response header carrying the provider's original status to the downstream role.
pub const ORIGINAL_STATUS_HEADER: &str = "x-sluice-original-status";

/// Which half of the filter this instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Cluster upstream filter: runs once per attempt.
    #[default]
    Upstream,
    /// Connection-manager filter: restores the provider's original status for the client.
    Downstream,
}

/// How the client's own `authorization` is handled for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Remove the client's credential; send the provider key from `credential_env` if set.
    #[default]
    Provider,
    /// Forward the client's `authorization` unchanged (a provider that takes the caller's key).
    Passthrough,
}

impl AuthMode {
    /// Parse a metadata value.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "provider" => Some(Self::Provider),
            "passthrough" => Some(Self::Passthrough),
            _ => None,
        }
    }
}

/// A named provider profile as written in the plugin configuration. Endpoint (or cluster)
/// metadata with the same key overrides each field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// Replacement request path (query included if it has one).
    #[serde(default)]
    pub path: Option<String>,
    /// Replacement `:authority` (and `host`).
    #[serde(default)]
    pub authority: Option<String>,
    /// Environment variable holding the provider key (listed in `host_env_keys`).
    #[serde(default)]
    pub credential_env: Option<String>,
    /// Header that carries the key (`authorization`, `api-key`, `x-api-key`).
    #[serde(default)]
    pub credential_header: Option<String>,
    /// Prefix before the key (`"Bearer "` for `authorization`, empty otherwise).
    #[serde(default)]
    pub credential_prefix: Option<String>,
    /// `provider` (default) or `passthrough`.
    #[serde(default)]
    pub auth: Option<AuthMode>,
}

/// The JSON configuration as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `upstream` (default) or `downstream`.
    #[serde(default)]
    pub role: Role,
    /// Models for attempts 2, 3, ... (seed 004). Omit to disable; an empty list is an error.
    #[serde(default)]
    pub backup_models: Option<Vec<String>>,
    /// Request-body cap in bytes; larger bodies get 413.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Status shown to the router instead of 429 (so outlier detection ejects the host).
    /// `429` disables the mapping.
    #[serde(default)]
    pub rate_limit_status_to: Option<u32>,
    /// Provider profiles by name (endpoint metadata `provider` selects one).
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
}

/// A checked provider profile.
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Upstream,
            backup_models: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            rate_limit_status_to: DEFAULT_RATE_LIMIT_STATUS_TO,
            providers: BTreeMap::new(),
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

fn check_provider(raw: RawProvider) -> Result<ProviderProfile, ConfigError> {
    if let Some(p) = &raw.path {
        validate_path(p).map_err(|e| ConfigError::new("path", e))?;
    }
    if let Some(a) = &raw.authority {
        validate_authority(a).map_err(|e| ConfigError::new("authority", e))?;
    }
    if let Some(e) = &raw.credential_env {
        validate_env_var_name(e).map_err(|why| ConfigError::new("credential_env", why))?;
    }
    if let Some(h) = &raw.credential_header {
        validate_header_name(h).map_err(|e| ConfigError::new("credential_header", e))?;
        if h.starts_with(':') {
            return Err(ConfigError::new("credential_header", "pseudo-headers are not allowed"));
        }
    }
    if let Some(p) = &raw.credential_prefix {
        validate_header_value(p).map_err(|e| ConfigError::new("credential_prefix", e))?;
    }
    Ok(ProviderProfile {
        path: raw.path,
        authority: raw.authority,
        credential_env: raw.credential_env,
        credential_header: raw.credential_header,
        credential_prefix: raw.credential_prefix,
        auth: raw.auth,
    })
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let backup_models = match raw.backup_models {
            None => Vec::new(),
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    "backup_models",
                    "must list at least one model (omit the field to disable backup models)",
                ))
            }
            Some(list) => {
                for (i, m) in list.iter().enumerate() {
                    if m.trim().is_empty() {
                        return Err(ConfigError::new(format!("backup_models[{i}]"), "empty model name"));
                    }
                }
                list
            }
        };
        if raw.role == Role::Downstream && !backup_models.is_empty() {
            return Err(ConfigError::new(
                "backup_models",
                "only the upstream role (cluster http_filters) uses backup models",
            ));
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be greater than 0"));
        }
        let rate_limit_status_to = raw.rate_limit_status_to.unwrap_or(DEFAULT_RATE_LIMIT_STATUS_TO);
        if !(100..=599).contains(&rate_limit_status_to) {
            return Err(ConfigError::new("rate_limit_status_to", "must be an HTTP status (100-599)"));
        }
        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers {
            if name.is_empty() {
                return Err(ConfigError::new("providers", "empty provider name"));
            }
            let checked = check_provider(p).map_err(|e| e.within(&format!("providers.{name}")))?;
            providers.insert(name, checked);
        }
        Ok(Self { role: raw.role, backup_models, max_body_bytes, rate_limit_status_to, providers })
    }
}

/// Parse and check the plugin configuration bytes.
pub fn load(bytes: &[u8]) -> Result<Config, ConfigError> {
    let raw: RawConfig = parse_json_config(bytes)?;
    Config::try_from(raw)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_upstream_defaults() {
        let c = load(b"").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(load(b"{}").unwrap(), Config::default());
    }

    #[test]
    fn full_config() {
        let c = load(
            br#"{"role":"upstream","backup_models":["gpt-4.0-turbo","gpt-3.5-turbo"],"max_body_bytes":1000,
                "rate_limit_status_to":503,
                "providers":{"openai":{"credential_env":"OPENAI_API_KEY","authority":"api.openai.com","path":"/v1/chat/completions"},
                             "azure":{"credential_env":"AZURE_KEY","credential_header":"api-key","credential_prefix":""},
                             "local":{"auth":"passthrough"}}}"#,
        )
        .unwrap();
        assert_eq!(c.backup_models, vec!["gpt-4.0-turbo", "gpt-3.5-turbo"]);
        assert_eq!(c.max_body_bytes, 1000);
        assert_eq!(c.providers["azure"].credential_header.as_deref(), Some("api-key"));
        assert_eq!(c.providers["local"].auth, Some(AuthMode::Passthrough));
        assert_eq!(load(br#"{"role":"downstream"}"#).unwrap().role, Role::Downstream);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"backup_model":["a"]}"#, "unknown field `backup_model`"),
            (r#"{"backup_models":[]}"#, "backup_models"),
            (r#"{"backup_models":["a",""]}"#, "backup_models[1]"),
            (r#"{"providers":{"openai":{"credential_env":"OPENAI-KEY"}}}"#, "providers.openai.credential_env"),
            (r#"{"providers":{"openai":{"credential_env":"1KEY"}}}"#, "providers.openai.credential_env"),
            (r#"{"providers":{"openai":{"credential_header":"Api Key"}}}"#, "providers.openai.credential_header"),
            (r#"{"providers":{"openai":{"path":"v1/chat"}}}"#, "providers.openai.path"),
            (r#"{"providers":{"openai":{"authority":"a/b"}}}"#, "providers.openai.authority"),
            (r#"{"providers":{"openai":{"credential_prefix":"Bearer \n"}}}"#, "providers.openai.credential_prefix"),
            (r#"{"providers":{"openai":{"key":"x"}}}"#, "unknown field `key`"),
            (r#"{"providers":{"openai":{"auth":"maybe"}}}"#, "providers.openai.auth"),
            (r#"{"role":"sideways"}"#, "role"),
            (r#"{"max_body_bytes":0}"#, "max_body_bytes"),
            (r#"{"rate_limit_status_to":42}"#, "rate_limit_status_to"),
            (r#"{"role":"downstream","backup_models":["a"]}"#, "backup_models"),
            (r#"5"#, "invalid type"),
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
