//! sluice model-failover: makes each Envoy retry attempt correct for the endpoint Envoy
//! picked (model, path, authority, credential), and turns a provider's 429 into something
//! Envoy's outlier detection and retry policy act on. See README.md.
//!
//! The same .wasm runs twice: as an upstream HTTP filter on the cluster (role `upstream`,
//! once per attempt) and as a downstream HTTP filter in the connection manager (role
//! `downstream`), which gives the client the provider's original 429 once retries are spent.

pub mod config;
pub mod downstream;
pub mod retry_after;
pub mod upstream;

#[cfg(target_arch = "wasm32")]
mod filter;

/// Filter name used in logs, metrics and error replies.
pub const FILTER: &str = "model-failover";

/// Crate version, logged once at VM start.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    filter::start();
}}
