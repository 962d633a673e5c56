//! sluice-core: what every sluice filter shares, in plain Rust.
//!
//! - [`stage`]: the one stage interface (`Plugin` per VM, `Stage` per request);
//! - [`pipeline`]: runs stages over one [`exchange::Exchange`] and decides what Envoy is told;
//! - [`host`]: the host operations as a trait, the Envoy-faithful `FakeHost`, `CountingHost`;
//! - [`api`]: the one place that knows the wire formats (chat, completions, responses,
//!   embeddings, Anthropic messages); [`usage`]: token usage in all of them; [`sse`]: the
//!   incremental SSE parser; [`json`]: strict parsing (duplicate keys refused);
//! - [`config`]: the one config reader; [`metrics`]: the one metrics helper; [`keys`]: the
//!   filter-state contract; [`route`]: per-route settings; [`encoding`]: the host's binary
//!   encodings; [`errors`]: OpenAI-style local replies;
//! - [`vector`]: the embeddings and vector-store clients (semantic-cache, rag).
//!
//! Nothing here calls a proxy-wasm host function except `proxy_host` and `glue`, which exist
//! only on wasm32 builds; everything else is tested natively and inside a wasm runtime.

pub mod api;
pub mod config;
pub mod encoding;
pub mod errors;
pub mod exchange;
pub mod host;
pub mod json;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod price;
pub mod route;
pub mod sse;
pub mod stage;
pub mod translate;
pub mod usage;
pub mod vector;

#[cfg(target_arch = "wasm32")]
pub mod glue;
#[cfg(target_arch = "wasm32")]
pub mod proxy_host;

/// Declare a filter's entry point: `sluice_core::filter_main!(NAME, assemble);`
/// (expands to nothing on native builds, so the crate's tests link). The entry point is
/// behind the crate's `filter` feature (on by default): the composed gateway links every
/// filter crate with `default-features = false`, so only its own entry point is exported.
#[macro_export]
macro_rules! filter_main {
    ($name:expr, $assemble:path) => {
        #[cfg(all(target_arch = "wasm32", feature = "filter"))]
        fn sluice_start() {
            $crate::glue::start($name, env!("CARGO_PKG_VERSION"), $assemble);
        }
        #[cfg(all(target_arch = "wasm32", feature = "filter"))]
        #[allow(unsafe_code)] // proxy_wasm::main! exports the module's initializer
        mod sluice_entry {
            proxy_wasm::main! {{
                super::sluice_start();
            }}
        }
    };
}
