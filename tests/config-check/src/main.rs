//! `sluice-config-check <filter> <file.json|->`: validate a sluice filter's JSON configuration
//! offline with the filter's own config loader. See check.rs and README.md.
//!
//! A native tool: the workspace's `cargo wasm` alias builds every member for wasm32-wasip1,
//! and linking all six filters (each exporting the proxy-wasm entry points) into one wasm
//! binary cannot work, so on wasm32 this crate is an empty program with no filter dependency.

#[cfg(not(target_arch = "wasm32"))]
mod check;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    check::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
