//! sluice semantic-cache: answers a chat completion from a cache instead of the provider when
//! the same question (exact tier: Envoy shared data) or a question that means the same
//! (semantic tier: embeddings + a vector store such as Chroma) was answered before for the
//! same route, model and tenant. See README.md.
//!
//! - [`config`]: the plugin configuration.
//! - [`stage`]: the per-request stage and the root-side store jobs.
//! - [`key`]: key text, normalization, scope and hashing.
//! - [`answer`]: the stored record and its JSON / SSE replay.
//! - [`exact`]: the exact tier's slots in shared data.
//! - [`embeddings`], [`store`], [`upstream`]: the embeddings client and the vector-store
//!   trait with its Chroma implementation, from `sluice_core::vector` (shared with rag).

pub mod answer;
pub mod config;
pub mod exact;
pub mod key;
pub mod stage;

pub use sluice_core::vector::{embeddings, store, upstream};

use sluice_core::config::{ConfigError, Obj};
use sluice_core::stage::Plugin;

/// Name used in logs, metrics and error bodies.
pub const NAME: &str = "semantic-cache";

/// Build the plugin from its configuration object.
pub fn load(o: Obj<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Box<dyn Plugin>, ConfigError> {
    Ok(Box::new(stage::CachePlugin::new(config::Config::load(o, env)?)))
}

/// This filter alone: the whole document is its configuration.
pub fn assemble(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Box<dyn Plugin>>, ConfigError> {
    sluice_core::stage::single(bytes, env, load)
}

sluice_core::filter_main!(NAME, assemble);
