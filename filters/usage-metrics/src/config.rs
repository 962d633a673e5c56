//! Plugin configuration, read with the one core reader (`sluice_core::config::Obj`).

use sluice_core::config::{ConfigError, Obj};
use sluice_core::metrics::KnownValues;
use sluice_core::price::PriceTable;

/// Default cap on a request body the filter reads (Envoy's default buffer limit).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
/// Default cap on a non-streaming JSON response body read for its usage.
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Default cap on distinct user (and, separately, team) label values per VM.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 100;
/// Default cap on distinct metric names (label combinations) per VM.
pub const DEFAULT_MAX_METRIC_NAMES: usize = 5000;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Ask providers for stream usage when the client did not (and hide that chunk again).
    pub inject_include_usage: bool,
    /// Largest request body read, in bytes; a larger one gets 413.
    pub max_request_body_bytes: usize,
    /// Largest non-streaming response body read for usage; past it, usage is estimated.
    pub max_response_body_bytes: usize,
    /// Add a `sluice_user` label.
    pub user_label: bool,
    /// Add a `sluice_team` label.
    pub team_label: bool,
    /// Distinct user / team label values per VM before the rest are reported as `other`.
    pub max_label_values: usize,
    /// Distinct metric names per VM; past it, new label combinations are not recorded.
    pub max_metric_names: usize,
    /// Models that get their own label value (`*` suffix: prefix); every other requested
    /// model is labelled `other`, so client input cannot create series. Route metadata
    /// `default_model`/`models` and the model failover sent upstream are learnt too.
    pub known_models: KnownValues,
    /// Price table (first match wins) and its currency, for `sluice.cost` and the cost metric.
    pub prices: PriceTable,
    /// Add a `sluice_team` label to the cost metric.
    pub cost_by_team: bool,
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
            known_models: KnownValues::default(),
            prices: PriceTable { prices: Vec::new(), currency: "USD".into() },
            cost_by_team: false,
        }
    }
}

fn positive(o: &Obj<'_>, key: &str, default: usize, max: usize) -> Result<usize, ConfigError> {
    match o.count(key)? {
        None => Ok(default),
        Some(0) => Err(o.err(key, "must be greater than 0")),
        Some(n) if n > max => Err(o.err(key, format!("must be at most {max}"))),
        Some(n) => Ok(n),
    }
}

impl Config {
    /// Read and check the configuration object.
    pub fn load(o: Obj<'_>) -> Result<Self, ConfigError> {
        o.known(&[
            "inject_include_usage",
            "max_request_body_bytes",
            "max_response_body_bytes",
            "user_label",
            "team_label",
            "max_label_values",
            "max_metric_names",
            "known_models",
            "prices",
            "currency",
            "cost_by_team",
        ])?;
        const GIB: usize = 1024 * 1024 * 1024;
        let d = Self::default();
        Ok(Self {
            inject_include_usage: o.flag("inject_include_usage", true)?,
            max_request_body_bytes: positive(&o, "max_request_body_bytes", d.max_request_body_bytes, GIB)?,
            max_response_body_bytes: positive(&o, "max_response_body_bytes", d.max_response_body_bytes, GIB)?,
            user_label: o.flag("user_label", false)?,
            team_label: o.flag("team_label", false)?,
            max_label_values: positive(&o, "max_label_values", d.max_label_values, 100_000)?,
            max_metric_names: positive(&o, "max_metric_names", d.max_metric_names, 1_000_000)?,
            known_models: KnownValues::new(&o.strings("known_models")?.unwrap_or_default()),
            prices: PriceTable::load(&o)?,
            cost_by_team: o.flag("cost_by_team", false)?,
        })
    }

    /// Parse a whole document (tests, config-check).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        sluice_core::config::read(bytes, Self::load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_defaults() {
        for doc in [&b""[..], b"{}"] {
            let c = Config::parse(doc).unwrap();
            assert!(c.inject_include_usage && !c.user_label);
            assert_eq!(c.max_metric_names, DEFAULT_MAX_METRIC_NAMES);
        }
    }

    #[test]
    fn all_fields() {
        let c = Config::parse(
            br#"{"inject_include_usage":false,"max_request_body_bytes":10,"max_response_body_bytes":20,
                "user_label":true,"team_label":true,"max_label_values":3,"max_metric_names":50,
                "known_models":["gpt-4o","llama*"],"currency":"EUR","cost_by_team":true,
                "prices":[{"model":"gpt-4o*","input":2.5,"cached_input":1.25,"output":10}]}"#,
        )
        .unwrap();
        assert!(!c.inject_include_usage && c.user_label && c.team_label && c.cost_by_team);
        assert_eq!((c.max_request_body_bytes, c.max_response_body_bytes, c.max_label_values), (10, 20, 3));
        assert!(c.known_models.contains("llama-3"));
        assert_eq!(c.prices.price("gpt-4o-mini").unwrap().cached_input, 1.25);
        assert_eq!(c.prices.currency, "EUR");
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
            (r#"{"prices":[{"model":"m","input":1}]}"#, "prices[0].output"),
            (r#"{"prices":[{"model":"m","input":-1,"output":1}]}"#, "prices[0].input"),
            (r#"{"known_models":[1]}"#, "known_models[0]"),
        ];
        for (input, field) in cases {
            let e = Config::parse(input.as_bytes()).unwrap_err();
            assert!(e.field == *field, "{input}: {e}");
        }
    }
}
