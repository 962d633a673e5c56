//! sluice prompt guard: reject or mask sensitive text in chat requests, mask it in
//! responses (JSON and SSE streams), per-route policies, optional webhook check.

pub mod builtins;
pub mod config;
pub mod inspect;
pub mod rules;
pub mod session;
pub mod stream;

#[cfg(target_arch = "wasm32")]
mod filter;
