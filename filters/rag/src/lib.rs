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
//!   (Chroma), the same source files as semantic-cache's.

pub mod config;
pub mod passages;
pub mod stage;

// The embeddings client and the vector-store trait, shared with semantic-cache as source
// files: a crate dependency would link semantic-cache's proxy-wasm entry point into this
// module whenever both crates are built in one cargo invocation (features are unified).
#[path = "../../semantic-cache/src/embeddings.rs"]
pub mod embeddings;
#[path = "../../semantic-cache/src/store.rs"]
pub mod store;
#[path = "../../semantic-cache/src/upstream.rs"]
pub mod upstream;

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
