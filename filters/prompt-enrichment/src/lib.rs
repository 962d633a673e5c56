//! sluice prompt-enrichment: adds gateway-managed prompts (system prompts and other
//! messages) to model requests in each format's own place, and sets request fields
//! (defaults, overrides, caps), with the profile chosen per route. See README.md.
//!
//! - [`config`]: the plugin configuration (templates compiled at load);
//! - [`stage`]: the per-request stage over the core pipeline;
//! - [`enrich`]: applying a profile to a parsed body, per format;
//! - [`shape`]: the request shape checks; [`template`]: `{{variable}}` templates.

pub mod config;
pub mod enrich;
pub mod shape;
pub mod stage;
pub mod template;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, error messages and metrics.
pub const NAME: &str = "prompt-enrichment";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::EnrichmentPlugin::new(config::Config::load(o)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
