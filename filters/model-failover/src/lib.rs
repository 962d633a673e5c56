//! sluice model-failover: makes each Envoy retry attempt correct for the endpoint Envoy
//! picked (model, path, authority, credential), keeps rate-limited providers out for their
//! own Retry-After (through Envoy's `priority_group` override), and marks a context-window
//! error retriable. Envoy does the routing. See README.md.
//!
//! The same .wasm runs in up to three places: as an upstream HTTP filter on the cluster (role
//! `upstream`, once per attempt), as a downstream HTTP filter in the connection manager (role
//! `downstream`: internal headers, the per-request group order from the cooldown table), and
//! after Envoy's `header_to_metadata` (role `route_refresh`: clears the route cache).
//!
//! - [`config`]: the plugin configuration; [`stage`]: the plugin (all roles), metric names;
//! - [`upstream`], [`downstream`], [`refresh`]: the roles' stages;
//! - [`retry_after`]: provider waits; [`cooldown`]: the shared cooldown table;
//!   [`groups`]: route groups and the override Envoy's `priority_group` specifier reads.

pub mod config;
pub mod cooldown;
pub mod downstream;
pub mod groups;
pub mod refresh;
pub mod retry_after;
pub mod stage;
pub mod upstream;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Filter name used in logs, metrics and error replies.
pub const NAME: &str = "model-failover";

/// Build the plugin (either role) from its configuration object.
pub fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::FailoverPlugin::new(config::Config::load(o)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
