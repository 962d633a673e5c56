//! sluice prompt guard: reject or mask sensitive text in everything a request shows the
//! model, on every endpoint core knows; mask it in answers (JSON, plain text and SSE streams
//! of every format); per-route policies, shadow mode, optional webhook check. See README.md.
//!
//! - [`config`]: the plugin configuration (policies, rules, webhook);
//! - [`stage`]: the per-request stage over the core pipeline;
//! - [`rules`]: compiled rules, the joined pre-filter and the per-text scan;
//! - [`builtins`]: the built-in detectors (every valid number, also inside longer runs);
//! - [`inspect`]: the guard pass over a body's texts (texts come from `sluice_core::api`);
//! - [`logprobs`]: exact masking of token log-probabilities;
//! - [`stream`]: masking SSE answers with a bounded hold-back.

pub mod builtins;
pub mod config;
pub mod inspect;
pub mod logprobs;
pub mod rules;
pub mod stage;
pub mod stream;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "prompt-guard";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, _env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::GuardPlugin::new(config::Config::load(o)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
