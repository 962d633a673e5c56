//! sluice rag: retrieval-augmented prompts. On routes whose `sluice` metadata names a
//! collection, the prompt is embedded, the nearest passages are retrieved from the vector
//! store (Chroma) and added to the request as a system text before it goes to the model.
//! See README.md.
//!
//! - [`config`]: the plugin configuration and the per-route settings.
//! - [`stage`]: the per-request stage.
//! - [`passages`]: which passages are added, and how they are rendered.
//!
//! - [`embeddings`], [`store`], [`upstream`]: the embeddings client and the vector-store trait
//!   (Chroma), from `sluice_core::vector` (shared with semantic-cache).

pub mod config;
pub mod passages;
pub mod stage;

pub use sluice_core::vector::{embeddings, store, upstream};

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "rag";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::RagPlugin::new(config::Config::load(o, env)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
