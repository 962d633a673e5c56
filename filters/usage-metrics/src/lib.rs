//! sluice usage-metrics: counts the tokens an OpenAI-compatible provider reports (JSON bodies
//! and SSE streams), estimates them when it reports none, and publishes them as Prometheus
//! metrics with OpenTelemetry `gen_ai` names and as filter state for access logs.
//!
//! - [`config`]: the plugin configuration (strict JSON, validated).
//! - [`exchange`]: the per-request state machine, written against `sluice_core::host::Host`.
//! - [`recorder`]: metric names, labels and the per-VM metric-id cache.
//! - `filter` (wasm32 only): the proxy-wasm glue.

pub mod config;
pub mod exchange;
pub mod recorder;

#[cfg(target_arch = "wasm32")]
mod filter;
