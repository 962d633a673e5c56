#!/usr/bin/env bash
# The README's test command: everything CI checks, from a fresh clone.
#   scripts/test.sh            all steps
#   scripts/test.sh -k auth    pass extra arguments to the end-to-end pytest run
# Steps: setup (toolchain target, Envoy, Python tools, Debian packages), rustfmt, clippy
# (native and wasm32-wasip1, warnings as errors), native unit tests, the core crate's tests
# inside a wasm runtime, release wasm build with size budgets, YAML validation and the
# end-to-end tests against real Envoy.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

timings=()
step() {
  local name="$1"; shift
  say "$name"
  local t0; t0=$(now)
  "$@"
  timings+=("$(printf '%-34s %5ss' "$name" "$(( $(now) - t0 ))")")
}

have_nextest() { cargo nextest --version >/dev/null 2>&1; }

unit_tests() {
  if have_nextest; then
    cargo nextest run --workspace --no-fail-fast
  else
    cargo test --workspace --no-fail-fast
  fi
}

wasm_tests() {
  # Each test runs in its own wasm instance under the PyPI wasmtime runtime (panics abort a
  # wasm process, so nextest's process-per-test reports every failure by name).
  export CARGO_TARGET_WASM32_WASIP1_RUNNER="$VENV/bin/python $ROOT/scripts/wasm-runner.py"
  if have_nextest; then
    cargo nextest run -p sluice-core --target wasm32-wasip1 --no-fail-fast
  else
    cargo test -p sluice-core --target wasm32-wasip1
  fi
}

e2e() {
  local workers=2
  "$VENV/bin/pytest" -q -n "$workers" --dist loadfile -p no:cacheprovider tests/e2e tests/rls tests/otlp "$@"
}

step "setup" scripts/setup.sh
step "rustfmt" cargo fmt --all -- --check
step "clippy (native)" cargo clippy --workspace --all-targets -- -D warnings
step "clippy (wasm32-wasip1)" cargo wasm-clippy
step "unit tests (native)" unit_tests
step "core tests inside wasm" wasm_tests
step "build + wasm sizes" scripts/build.sh
step "YAML validation + end-to-end" e2e "$@"

say "all steps passed"
printf '%s\n' "${timings[@]}"
