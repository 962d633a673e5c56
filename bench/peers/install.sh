#!/usr/bin/env bash
# Installs the peer gateways scripts/bench.sh measures next to sluice, on demand and idempotently:
#   - LiteLLM proxy (PyPI litellm[proxy], pinned in bench/peers/litellm-requirements.txt, every
#     dependency pinned in bench/peers/litellm-constraints.txt) into its own virtualenv,
#     .venv-bench/ (SLUICE_BENCH_VENV overrides), never into the project's .venv (the tests use it);
#   - the Portkey gateway (npm @portkey-ai/gateway, pinned in bench/peers/package.json and
#     package-lock.json) into bench/peers/node_modules, with `npm ci`.
# A no-op when both are installed as pinned. A change of pins reinstalls from scratch, so the time
# and size recorded for the report (<install dir>/.sluice-install.json) are those of a clean install.
#   bench/peers/install.sh [litellm] [portkey]     (default: both)
. "$(dirname "$0")/../../scripts/lib.sh"
cd "$ROOT"
PEERS="$ROOT/bench/peers"
BVENV="${SLUICE_BENCH_VENV:-$ROOT/.venv-bench}"

# record DIR SECONDS WHAT: the install's time and size, for the benchmark report
record() {
  local mib
  mib=$(du -sm "$1" | cut -f1)
  printf '{"what": "%s", "seconds": %s, "mib": %s, "date": "%s"}\n' "$3" "$2" "$mib" "$(date -u +%FT%TZ)" \
    > "$1/.sluice-install.json"
  say "$3: installed in $2 s, $mib MiB ($1)"
}

install_litellm() {
  local want stamp t0 py
  want=$(cat "$PEERS/litellm-requirements.txt" "$PEERS/litellm-constraints.txt" | sha256sum | cut -d' ' -f1)
  stamp="$BVENV/.sluice-requirements"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$BVENV/bin/litellm" ]; then
    return 0
  fi
  py=$(command -v python3) || die "python3 not found (LiteLLM needs Python >= 3.10)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "LiteLLM needs Python >= 3.10; python3 is $("$py" --version 2>&1)"
  say "installing LiteLLM proxy into $BVENV (its own virtualenv; a few minutes)"
  rm -rf "$BVENV"
  t0=$(now)
  "$py" -m venv "$BVENV"
  echo '*' > "$BVENV/.gitignore"  # never committed (the repo's .gitignore does not list it)
  "$BVENV/bin/pip" install --quiet --disable-pip-version-check \
    -r "$PEERS/litellm-requirements.txt" -c "$PEERS/litellm-constraints.txt"
  echo "$want" > "$stamp"
  record "$BVENV" $(( $(now) - t0 )) "$(grep -m1 '^litellm' "$PEERS/litellm-requirements.txt")"
}

install_portkey() {
  local want t0
  command -v node >/dev/null || die "node not found (the Portkey gateway runs on Node.js)"
  command -v npm >/dev/null || die "npm not found"
  want=$(sha256sum "$PEERS/package-lock.json" | cut -d' ' -f1)
  if [ "$(cat "$PEERS/node_modules/.sluice-lock" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  say "installing the Portkey gateway into bench/peers/node_modules (npm ci)"
  rm -rf "$PEERS/node_modules"
  t0=$(now)
  npm ci --prefix "$PEERS" --no-audit --no-fund --loglevel=error
  echo "$want" > "$PEERS/node_modules/.sluice-lock"
  record "$PEERS/node_modules" $(( $(now) - t0 )) \
    "@portkey-ai/gateway@$(node -p 'require(process.argv[1]).version' "$PEERS/node_modules/@portkey-ai/gateway/package.json")"
}

what=("$@")
[ ${#what[@]} -gt 0 ] || what=(litellm portkey)
for w in "${what[@]}"; do
  case "$w" in
    litellm) install_litellm ;;
    portkey) install_portkey ;;
    *) die "unknown peer '$w' (litellm, portkey)" ;;
  esac
done
