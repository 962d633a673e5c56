//! sluice model-failover: makes each Envoy retry attempt correct for the endpoint Envoy
//! picked (model, path, authority, credential), and turns a provider's 429 into something
//! Envoy's outlier detection and retry policy act on. See README.md.
//!
//! The same .wasm runs twice: as an upstream HTTP filter on the cluster (role `upstream`,
//! once per attempt) and as a downstream HTTP filter in the connection manager (role
//! `downstream`), which removes client copies of internal headers and gives the client the
//! provider's original 429 once retries are spent.
//!
//! - [`config`]: the plugin configuration; [`stage`]: the plugin (both roles), metric names;
//! - [`upstream`], [`downstream`]: the two roles' stages; [`retry_after`]: provider waits.

pub mod config;
pub mod downstream;
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
