//! sluice prompt-enrichment: adds gateway-managed messages (system prompts and the like) to
//! chat-completion requests and sets request fields (defaults, overrides, caps), with the
//! profile chosen per route. See README.md.

pub mod config;
pub mod enrich;
pub mod template;

#[cfg(target_arch = "wasm32")]
mod filter;

/// Name used in logs, error messages and metrics.
pub const FILTER_NAME: &str = "prompt-enrichment";
