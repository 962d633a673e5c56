//! sluice auth filter: who is calling (JWT or API key), may they use this route (RBAC on
//! claims) and this model (per-model access). See README.md.

pub mod config;
pub mod flow;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod metadata;
pub mod pem;
pub mod rules;

#[cfg(target_arch = "wasm32")]
mod filter;

#[cfg(test)]
mod tests;
