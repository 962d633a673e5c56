//! sluice token-ratelimit: token budgets per user, team, route, model or header, over
//! several clock-aligned windows at once, enforced with reservations so concurrent requests
//! cannot overspend. See README.md.

pub mod budget;
pub mod config;
pub mod limiter;
pub mod rls;

#[cfg(target_arch = "wasm32")]
mod filter;
