#!/usr/bin/env bash
# Build every filter for Envoy (release wasm32-wasip1) and the mock provider, then report
# each .wasm size against its budget (scripts/wasm-budgets.txt). Fails above a budget.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
say "building filters (wasm32-wasip1, release) and the mock provider"
cargo wasm
cargo wasm-gateway
cargo build --release -p sluice-mock-provider
"$ROOT/scripts/wasm-sizes.sh"
# The benchmark's do-nothing baseline filter (its own small workspace and target dir), so the
# benchmark configurations validate in the test suite too.
cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml \
  --target-dir target/bench-noop
