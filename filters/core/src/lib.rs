//! sluice-core: what several sluice filters need, in plain Rust.
//!
//! Nothing here calls a proxy-wasm host function except `proxy_host`, which exists only
//! on wasm32 builds; everything else is tested natively and inside a wasm runtime.

pub mod config;
pub mod errors;
pub mod host;
pub mod keys;
pub mod metrics;
pub mod sse;
pub mod usage;
pub mod wire;

#[cfg(target_arch = "wasm32")]
pub mod proxy_host;
