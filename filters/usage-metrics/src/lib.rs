//! sluice usage-metrics: counts the tokens a provider reports (JSON bodies and SSE streams of
//! every API sluice knows), estimates them when it reports none, prices them, and publishes
//! them as Prometheus metrics with OpenTelemetry `gen_ai` names and as filter state for
//! access logs and traces. See README.md.
//!
//! - [`config`]: the plugin configuration.
//! - [`stage`]: the per-request stage over the core pipeline.
//! - [`recorder`]: metric names, labels and the per-VM label bounds.

pub mod config;
pub mod recorder;
pub mod stage;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "usage-metrics";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::UsagePlugin::new(config::Config::load(o)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
