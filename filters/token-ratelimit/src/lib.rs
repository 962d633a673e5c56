//! sluice token-ratelimit: token budgets per user, team, API key, route, model or header,
//! over several clock-aligned windows at once, enforced with reservations so concurrent
//! requests cannot overspend, and settled with what each exchange really used. See README.md.
//!
//! - [`config`]: the plugin configuration;
//! - [`stage`]: the plugin (per VM) and the stage (per request) over the core pipeline;
//! - [`limiter`]: key values, estimates and answers; [`budget`]: local counters in shared
//!   data; [`rls`]: the rate-limit service protocol (shared mode).
#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod budget;
pub mod config;
pub mod limiter;
pub mod rls;
pub mod stage;

#[cfg(test)]
mod stage_tests;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "token-ratelimit";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::RateLimitPlugin::new(config::Config::load(o)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
