//! sluice auth filter: who is calling (JWT or API key), may they use this route (RBAC on
//! claims) and this model (per-model access). See README.md.
//!
//! - [`config`]: the plugin configuration; [`stage`]: the plugin (per VM) and the stage (per
//!   request) over the core pipeline;
//! - [`verifier`], [`jwt`], [`keys`], [`pem`], [`jwks`], [`cache`]: JWT verification, its keys
//!   and what bounds its cost;
//! - [`credential`], [`rules`], [`models`], [`replies`]: credentials, RBAC rules, the models
//!   endpoints, the answers.

pub mod cache;
pub mod config;
pub mod credential;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod models;
pub mod pem;
pub mod replies;
pub mod rules;
pub mod stage;
pub mod verifier;

#[cfg(test)]
mod stage_tests;

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "auth";

/// Build the plugin from its configuration object; `env` resolves `hmac_secret_env`.
pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::AuthPlugin::new(config::Config::load(o, env)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
