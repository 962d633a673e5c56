//! The model-failover plugin: one per VM, making the stage of its role per request (upstream:
//! per attempt; downstream and route_refresh: per client request).

use crate::config::{Config, Role};
use crate::downstream::{DownstreamShared, DownstreamStage};
use crate::refresh::RouteRefreshStage;
use crate::upstream::{UpstreamShared, UpstreamStage};
use sluice_core::exchange::Exchange;
use sluice_core::metrics::Metrics;
use sluice_core::stage::{Plugin, Stage};
use std::rc::Rc;

/// Metric base names.
pub mod metric {
    /// Attempts handled, by provider and model sent.
    pub const ATTEMPTS: &str = "sluice_failover_attempts";
    /// Provider 429s seen, by provider.
    pub const RATE_LIMITED: &str = "sluice_failover_rate_limited";
    /// Wait a provider asked for after a 429, in ms, by provider.
    pub const RETRY_AFTER_MS: &str = "sluice_failover_retry_after_ms";
    /// Bodies forwarded unchanged because they are not a JSON object, by reason.
    pub const BODY_PASSTHROUGH: &str = "sluice_failover_body_passthrough";
    /// Requests refused with 413.
    pub const BODY_TOO_LARGE: &str = "sluice_failover_body_too_large";
    /// Attempts sent without a provider credential that the endpoint asked for.
    pub const CREDENTIAL_MISSING: &str = "sluice_failover_credential_missing";
    /// Rate-limited statuses restored for the client by the downstream role.
    pub const STATUS_RESTORED: &str = "sluice_failover_status_restored";
    /// Client copies of internal request headers removed by the downstream role.
    pub const CLIENT_HEADER_REMOVED: &str = "sluice_failover_client_header_removed";
    /// Attempts refused because `backup_models` runs without the downstream role.
    pub const MISCONFIGURED: &str = "sluice_failover_misconfigured";
    /// Provider 429s whose wait was recorded as the cluster's cooldown, by provider and model.
    pub const COOLDOWN_RECORDED: &str = "sluice_failover_cooldown_recorded";
    /// Provider errors read as a context-window overflow and marked retriable.
    pub const CONTEXT_OVERFLOW: &str = "sluice_failover_context_overflow";
    /// Requests whose group order left out cooling clusters (downstream role).
    pub const COOLDOWN_OVERRIDE: &str = "sluice_failover_cooldown_override";
    /// Requests answered 429 because every cluster of the route was cooling (downstream role).
    pub const ALL_COOLING: &str = "sluice_failover_all_cooling";
    /// Attempts whose request was translated to the provider's API, by provider and model.
    pub const TRANSLATED: &str = "sluice_failover_translated";
    /// Attempts refused because the provider's API cannot express the request.
    pub const UNTRANSLATABLE: &str = "sluice_failover_untranslatable";
    /// Route caches cleared so the first attempt uses the group order (route_refresh role).
    pub const ROUTE_REFRESHED: &str = "sluice_failover_route_refreshed";
}

/// Most distinct metric names one VM defines (labels are bounded by config anyway).
pub const MAX_METRIC_NAMES: usize = 512;

/// Whether the pipeline refused the body for its size before the stage decided: a local
/// reply with 413 (or, when no status came back through this filter, one sent before the
/// body was complete).
pub fn refused_too_large(x: &Exchange, wanted_body: bool, decided: bool) -> bool {
    wanted_body
        && !decided
        && x.response.local
        && (x.response.status == 413 || (x.response.status == 0 && x.request.body.is_none()))
}

enum RoleState {
    Upstream(Rc<UpstreamShared>),
    Downstream(Rc<DownstreamShared>),
    RouteRefresh(Rc<Metrics>),
}

/// The configured filter.
pub struct FailoverPlugin {
    config: Rc<Config>,
    role: RoleState,
}

impl FailoverPlugin {
    /// A plugin for `config`.
    pub fn new(config: Config) -> Self {
        let config = Rc::new(config);
        let role = match config.role {
            Role::Upstream => RoleState::Upstream(Rc::new(UpstreamShared::new(Rc::clone(&config)))),
            Role::Downstream => RoleState::Downstream(Rc::new(DownstreamShared::new())),
            Role::RouteRefresh => RoleState::RouteRefresh(Rc::new(Metrics::new(MAX_METRIC_NAMES))),
        };
        Self { config, role }
    }
}

impl Plugin for FailoverPlugin {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    fn stage(&self) -> Box<dyn Stage> {
        match &self.role {
            RoleState::Upstream(s) => Box::new(UpstreamStage::new(Rc::clone(s))),
            RoleState::Downstream(d) => Box::new(DownstreamStage::new(Rc::clone(d))),
            RoleState::RouteRefresh(m) => Box::new(RouteRefreshStage::new(Rc::clone(m))),
        }
    }

    fn body_limit(&self) -> Option<usize> {
        match self.role {
            RoleState::Upstream(_) => Some(self.config.max_body_bytes),
            RoleState::Downstream(_) | RoleState::RouteRefresh(_) => None,
        }
    }

    fn holds_headers(&self) -> bool {
        // Upstream: the body is rewritten and a 413 must come before anything reaches the
        // provider (allow_on_headers_stop_iteration: true). Downstream and route_refresh:
        // never read the body.
        matches!(self.role, RoleState::Upstream(_))
    }

    fn publishes_model(&self) -> bool {
        // The upstream role's body names one attempt's model, not the client's.
        !matches!(self.role, RoleState::Upstream(_))
    }
}
