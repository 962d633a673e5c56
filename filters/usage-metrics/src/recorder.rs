//! Metric names, their labels, and the per-VM cache that defines each name once.
//!
//! Every metric is a flat Envoy stat with its labels embedded Istio-style
//! (`sluice_core::metrics::tagged_name`); Envoy's `stats_tags` (envoy/stats-tags.yaml) turn
//! them into Prometheus labels. Only tag names from `sluice_core::metrics::TAG_NAMES` are used.

use sluice_core::host::Host;
use sluice_core::metrics::{tagged_name, KnownValues, LabelCap, Metrics};
use std::cell::RefCell;

/// Tokens used, by `gen_ai_token_type` (`input`, `output`). OpenTelemetry names it
/// `gen_ai.client.token.usage` (a histogram there); here a counter, so sums are exact.
pub const TOKEN_USAGE: &str = "gen_ai_client_token_usage";
/// Requests seen, by `sluice_status_class` (`2xx`, `4xx`, `5xx`, ... or `none`).
pub const REQUESTS: &str = "sluice_usage_requests";
/// Milliseconds from the request to the first response byte of a stream (histogram).
pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token";
/// Milliseconds per output token after the first, for streams (histogram).
pub const TIME_PER_OUTPUT_TOKEN: &str = "gen_ai_server_time_per_output_token";
/// Requests whose usage was estimated, by `sluice_reason`.
pub const ESTIMATED_REQUESTS: &str = "sluice_usage_estimated";
/// The estimated part of [`TOKEN_USAGE`], by `gen_ai_token_type`.
pub const ESTIMATED_TOKENS: &str = "sluice_usage_estimated_tokens";
/// Cost of requests in micro-units of the price table's currency, by provider and model.
pub const COST: &str = "sluice_usage_cost_micros";

/// The labels every metric of one request shares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLabels {
    /// `gen_ai_operation_name`: `chat`, `text_completion`, `embeddings`.
    pub operation: String,
    /// `gen_ai_provider_name`.
    pub provider: String,
    /// `gen_ai_request_model`.
    pub request_model: String,
    /// `gen_ai_response_model`.
    pub response_model: String,
    /// `sluice_user`, when enabled.
    pub user: Option<String>,
    /// `sluice_team`, when enabled.
    pub team: Option<String>,
}

impl RequestLabels {
    /// Provider and requested model (plus user/team when enabled), then `extra`.
    fn base<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut tags = vec![
            ("gen_ai_provider_name", self.provider.as_str()),
            ("gen_ai_request_model", self.request_model.as_str()),
        ];
        tags.extend_from_slice(extra);
        if let Some(user) = &self.user {
            tags.push(("sluice_user", user.as_str()));
        }
        if let Some(team) = &self.team {
            tags.push(("sluice_team", team.as_str()));
        }
        tags
    }

    /// Stat name of the token counter for one token type.
    pub fn token_usage(&self, token_type: &str) -> String {
        tagged_name(
            TOKEN_USAGE,
            &self.base(&[
                ("gen_ai_operation_name", self.operation.as_str()),
                ("gen_ai_response_model", self.response_model.as_str()),
                ("gen_ai_token_type", token_type),
            ]),
        )
    }

    /// Stat name of the request counter.
    pub fn requests(&self, status_class: &str) -> String {
        tagged_name(
            REQUESTS,
            &self.base(&[("gen_ai_operation_name", self.operation.as_str()), ("sluice_status_class", status_class)]),
        )
    }

    /// Stat name of a latency histogram ([`TIME_TO_FIRST_TOKEN`], [`TIME_PER_OUTPUT_TOKEN`]).
    pub fn latency(&self, base: &str) -> String {
        tagged_name(base, &self.base(&[]))
    }

    /// Stat name of the estimated-request counter.
    pub fn estimated(&self, reason: &str) -> String {
        tagged_name(ESTIMATED_REQUESTS, &self.base(&[("sluice_reason", reason)]))
    }

    /// Stat name of the cost counter (`base` is [`COST`]).
    pub fn cost(&self, base: &str, currency: &str) -> String {
        tagged_name(base, &self.base(&[("sluice_currency", currency)]))
    }

    /// Stat name of the estimated-token counter.
    pub fn estimated_tokens(&self, token_type: &str) -> String {
        tagged_name(ESTIMATED_TOKENS, &self.base(&[("gen_ai_token_type", token_type)]))
    }
}

/// Per-VM metric state: the metrics helper and the label caps.
#[derive(Debug)]
pub struct Recorder {
    /// The one metrics helper.
    pub metrics: Metrics,
    users: RefCell<LabelCap>,
    teams: RefCell<LabelCap>,
    models: RefCell<KnownValues>,
}

impl Recorder {
    /// A recorder holding at most `max_names` metric names and `max_label_values` distinct
    /// values each for the user and team labels; model labels bounded to `models`.
    pub fn new(max_names: usize, max_label_values: usize, models: KnownValues) -> Self {
        Self {
            metrics: Metrics::new(max_names),
            users: RefCell::new(LabelCap::new(max_label_values)),
            teams: RefCell::new(LabelCap::new(max_label_values)),
            models: RefCell::new(models),
        }
    }

    /// The user label value: itself while under the cap, else `other`.
    pub fn user_label(&self, user: &str) -> String {
        self.users.try_borrow_mut().map_or_else(|_| "other".to_string(), |mut c| c.admit(user))
    }

    /// The team label value: itself while under the cap, else `other`.
    pub fn team_label(&self, team: &str) -> String {
        self.teams.try_borrow_mut().map_or_else(|_| "other".to_string(), |mut c| c.admit(team))
    }

    /// Learn a model name from trusted config (route metadata, the model sent upstream).
    pub fn learn_model(&self, model: &str) {
        if let Ok(mut m) = self.models.try_borrow_mut() {
            m.learn(model);
        }
    }

    /// The label for a model: itself when known, else `other`.
    pub fn model_label(&self, model: &str) -> String {
        self.models.try_borrow().map_or_else(|_| "other".to_string(), |m| m.label(model).to_string())
    }

    /// The label for the model a response names: itself when known or a dated version of
    /// the known requested model (`gpt-4o` → `gpt-4o-2024-08-06`), else `other`.
    pub fn response_model_label(&self, response: &str, request_label: &str) -> String {
        let known = self.models.try_borrow().is_ok_and(|m| m.contains(response));
        if known || (request_label != "other" && response.starts_with(request_label)) {
            response.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Add `by` to the counter `name` (a full tagged name).
    pub fn count(&self, host: &mut dyn Host, name: &str, by: u64) {
        self.metrics.count(host, name, &[], by);
    }

    /// Record `value` in the histogram `name`.
    pub fn observe(&self, host: &mut dyn Host, name: &str, value: u64) {
        self.metrics.record(host, name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::host::FakeHost;
    use sluice_core::metrics::KnownValues;
    use sluice_core::metrics::TAG_NAMES;

    fn labels() -> RequestLabels {
        RequestLabels {
            operation: "chat".into(),
            provider: "openai".into(),
            request_model: "gpt-4.1".into(),
            response_model: "gpt-4.1-2025".into(),
            user: None,
            team: None,
        }
    }

    #[test]
    fn names_embed_only_known_tags() {
        let mut l = labels();
        l.user = Some("alice".into());
        l.team = Some("dev".into());
        for name in [
            l.token_usage("input"),
            l.requests("2xx"),
            l.latency(TIME_TO_FIRST_TOKEN),
            l.estimated("no_usage"),
            l.estimated_tokens("output"),
        ] {
            let tags: Vec<&str> = name
                .split(";.;")
                .filter_map(|g| g.split("=.=").next())
                .filter(|t| !t.is_empty())
                .map(|t| t.rsplit('.').next().unwrap())
                .collect();
            for t in tags {
                assert!(TAG_NAMES.contains(&t), "{t} in {name}");
            }
        }
        assert_eq!(
            labels().token_usage("input"),
            "gen_ai_client_token_usage.gen_ai_provider_name=.=openai;.;gen_ai_request_model=.=gpt-4.1;.;\
gen_ai_operation_name=.=chat;.;gen_ai_response_model=.=gpt-4.1-2025;.;gen_ai_token_type=.=input;.;"
        );
        assert!(l.requests("2xx").ends_with("sluice_user=.=alice;.;sluice_team=.=dev;.;"));
    }

    #[test]
    fn hostile_values_are_sanitized() {
        let mut l = labels();
        l.request_model = "x;.;sluice_user=.=evil".into();
        let name = l.requests("2xx");
        assert_eq!(name.matches("=.=").count(), 4, "{name}");
    }

    #[test]
    fn ids_cached_and_values_recorded() {
        let mut h = FakeHost::default();
        let r = Recorder::new(10, 2, KnownValues::default());
        r.count(&mut h, "a", 2);
        r.count(&mut h, "a", 3);
        r.observe(&mut h, "h", 7);
        assert_eq!(h.metric("a"), Some(5));
        assert_eq!(h.metric_defs.len(), 2);
    }

    #[test]
    fn label_caps_and_models() {
        let r = Recorder::new(10, 1, KnownValues::new(&["gpt-4o".into()]));
        assert_eq!(r.user_label("alice"), "alice");
        assert_eq!(r.user_label("bob"), "other");
        assert_eq!(r.team_label("dev"), "dev");
        assert_eq!(r.team_label("ops"), "other");
        assert_eq!(r.model_label("gpt-4o"), "gpt-4o");
        assert_eq!(r.model_label("x-random"), "other");
        r.learn_model("x-random");
        assert_eq!(r.model_label("x-random"), "x-random");
        assert_eq!(r.response_model_label("gpt-4o-2024-08-06", "gpt-4o"), "gpt-4o-2024-08-06");
        assert_eq!(r.response_model_label("evil", "gpt-4o"), "other");
    }
}
