//! Plugin configuration: `RawConfig` is read strictly, `Config::try_from` checks ranges.

use serde::Deserialize;
use sluice_core::config::{parse_json_config, ConfigError};

/// Default cap on a request body the filter reads (Envoy's default buffer limit).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
/// Default cap on a non-streaming JSON response body the filter copies to read its usage.
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Default cap on distinct user (and, separately, team) label values per VM.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 100;
/// Default cap on distinct metric names (label combinations) per VM.
pub const DEFAULT_MAX_METRIC_NAMES: usize = 5000;

/// The configuration as written in `envoy.yaml` (JSON inside a `StringValue`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Ask providers for stream usage when the client did not (and hide that chunk again).
    #[serde(default)]
    pub inject_include_usage: Option<bool>,
    /// Largest request body read, in bytes; a larger one gets 413.
    #[serde(default)]
    pub max_request_body_bytes: Option<usize>,
    /// Largest non-streaming response body copied to read usage; past it, usage is estimated.
    #[serde(default)]
    pub max_response_body_bytes: Option<usize>,
    /// Add a `sluice_user` label (from filter state `sluice.user`).
    #[serde(default)]
    pub user_label: Option<bool>,
    /// Add a `sluice_team` label (from filter state `sluice.team`).
    #[serde(default)]
    pub team_label: Option<bool>,
    /// Distinct user / team label values per VM before the rest are reported as `other`.
    #[serde(default)]
    pub max_label_values: Option<usize>,
    /// Distinct metric names per VM; past it, new label combinations are not recorded.
    #[serde(default)]
    pub max_metric_names: Option<usize>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// See [`RawConfig::inject_include_usage`]; default `true`.
    pub inject_include_usage: bool,
    /// See [`RawConfig::max_request_body_bytes`].
    pub max_request_body_bytes: usize,
    /// See [`RawConfig::max_response_body_bytes`].
    pub max_response_body_bytes: usize,
    /// See [`RawConfig::user_label`]; default `false`.
    pub user_label: bool,
    /// See [`RawConfig::team_label`]; default `false`.
    pub team_label: bool,
    /// See [`RawConfig::max_label_values`].
    pub max_label_values: usize,
    /// See [`RawConfig::max_metric_names`].
    pub max_metric_names: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            inject_include_usage: true,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            max_response_body_bytes: DEFAULT_MAX_RESPONSE_BODY_BYTES,
            user_label: false,
            team_label: false,
            max_label_values: DEFAULT_MAX_LABEL_VALUES,
            max_metric_names: DEFAULT_MAX_METRIC_NAMES,
        }
    }
}

fn positive(field: &str, v: Option<usize>, default: usize, max: usize) -> Result<usize, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(n) if n > max => Err(ConfigError::new(field, format!("must be at most {max}"))),
        Some(n) => Ok(n),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        const GIB: usize = 1024 * 1024 * 1024;
        Ok(Self {
            inject_include_usage: raw.inject_include_usage.unwrap_or(true),
            max_request_body_bytes: positive(
                "max_request_body_bytes",
                raw.max_request_body_bytes,
                DEFAULT_MAX_REQUEST_BODY_BYTES,
                GIB,
            )?,
            max_response_body_bytes: positive(
                "max_response_body_bytes",
                raw.max_response_body_bytes,
                DEFAULT_MAX_RESPONSE_BODY_BYTES,
                GIB,
            )?,
            user_label: raw.user_label.unwrap_or(false),
            team_label: raw.team_label.unwrap_or(false),
            max_label_values: positive("max_label_values", raw.max_label_values, DEFAULT_MAX_LABEL_VALUES, 100_000)?,
            max_metric_names: positive("max_metric_names", raw.max_metric_names, DEFAULT_MAX_METRIC_NAMES, 1_000_000)?,
        })
    }
}

impl Config {
    /// Parse and validate the plugin configuration bytes (empty means all defaults).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_json_config(bytes)?;
        Config::try_from(raw)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_defaults() {
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        assert_eq!(Config::parse(b"{}").unwrap(), Config::default());
        assert!(Config::default().inject_include_usage);
    }

    #[test]
    fn all_fields() {
        let c = Config::parse(
            br#"{"inject_include_usage":false,"max_request_body_bytes":10,"max_response_body_bytes":20,
                "user_label":true,"team_label":true,"max_label_values":3,"max_metric_names":50}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                inject_include_usage: false,
                max_request_body_bytes: 10,
                max_response_body_bytes: 20,
                user_label: true,
                team_label: true,
                max_label_values: 3,
                max_metric_names: 50,
            }
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"user_lable":true}"#, "user_lable"),
            (r#"{"user_label":"yes"}"#, "user_label"),
            (r#"{"max_label_values":0}"#, "max_label_values"),
            (r#"{"max_metric_names":-1}"#, "max_metric_names"),
            (r#"{"max_request_body_bytes":0}"#, "max_request_body_bytes"),
            (r#"{"max_response_body_bytes":99999999999999}"#, "max_response_body_bytes"),
            (r#"{"inject_include_usage":1}"#, "inject_include_usage"),
        ];
        for (input, field) in cases {
            let e = Config::parse(input.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(field), "{input}: {e}");
        }
    }
}
