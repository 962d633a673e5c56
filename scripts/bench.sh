#!/usr/bin/env bash
# Benchmark: what each sluice filter costs next to bare Envoy, and what the peer gateways (LiteLLM
# proxy, Portkey gateway) cost in front of the same provider, measured side by side in one run.
#   scripts/bench.sh              full run with the peers, writes docs/benchmarks.md (about 12 min
#                                 of load after setup + build; the first run also installs the
#                                 peers, a few minutes)
#   scripts/bench.sh --quick      ~2-minute smoke run of every sluice configuration, no peers
#   scripts/bench.sh --quick --peers --configs bare,composed,litellm-features,portkey-features
#   scripts/bench.sh --quick --no-build --configs bare --out /tmp/b.md   (tests/e2e/test_bench.py)
#   scripts/bench.sh --quick --configs semantic-cache-miss,semantic-cache-hit,semantic-cache-hit-semantic,rag
#                 (issue 17's rows: they start a Chroma, .venv/bin/chroma, on 127.0.0.1 and stop it)
# Options for the load (passed to bench/bench.py; `scripts/bench.sh --help` lists them):
#   --configs a,b  --rounds N  --latency-seconds S  --throughput-seconds S  --connections 4,16,64
#   --stream-requests N  --out FILE (default docs/benchmarks.md)  --json FILE  --workdir DIR
# Options of this script:
#   --no-build   skip scripts/setup.sh and scripts/build.sh (use what is already built)
#   --no-micro   skip the native micro-benchmarks (cargo bench -p sluice-core; skipped by --quick)
#   --peers / --no-peers   include / leave out the peers (default: a full run includes them, --quick
#                not); with them, bench/peers/install.sh installs them first when missing (LiteLLM
#                into its own virtualenv .venv-bench/, Portkey into bench/peers/node_modules). A peer
#                named in --configs is installed too.
# Needs wrk (Debian; scripts/setup.sh installs it from scripts/apt-packages.txt). 127.0.0.1 only;
# every load is bounded in time; every process the run starts is stopped at the end, also on
# failure or Ctrl-C (bench/bench.py stops them in a finally block, by PID).
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
started=$(now)

build=1
micro=1
quick=0
peers=
configs=all
args=()
prev=
for a in "$@"; do
  [ "$prev" = --configs ] && configs="$a"
  prev="$a"
  case "$a" in
    --no-build) build=0 ;;
    --no-micro) micro=0 ;;
    --quick) quick=1; micro=0; args+=("$a") ;;
    --peers) peers=1; args+=("$a") ;;
    --no-peers) peers=0; args+=("$a") ;;
    --configs=*) configs="${a#--configs=}"; args+=("$a") ;;
    -h|--help) sed -n '2,/^\. /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; echo
               exec "$VENV/bin/python" bench/bench.py --help ;;
    *) args+=("$a") ;;
  esac
done

if [ "$build" = 1 ]; then
  scripts/setup.sh
  # The benchmark's floor filter (bench/noop-filter; not a workspace member, own target dir).
  cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml \
    --target-dir target/bench-noop || say "warning: bench/noop-filter did not build (its rows say not built)"
  if scripts/build.sh; then
    build_note="scripts/setup.sh and scripts/build.sh ran first"
  else
    # A filter that does not build (or is over its size budget) must not hide the others' numbers:
    # go on with what is built; the report says so, and a missing .wasm shows as "not built".
    say "warning: scripts/build.sh failed; benchmarking whatever is built"
    build_note="scripts/build.sh FAILED: some .wasm may be missing or stale"
  fi
else
  build_note="--no-build: used the binaries already built"
fi
command -v wrk >/dev/null || die "wrk not found: run scripts/setup.sh (it installs scripts/apt-packages.txt)"

# The peers this run measures (the same rule as bench/bench.py's): all of them in `--configs all`
# of a full run or with --peers, and any named in --configs. Installed on demand, never into .venv.
[ -n "$peers" ] || { [ "$quick" = 1 ] && peers=0 || peers=1; }
want_peers=()
if [ "$configs" = all ]; then
  [ "$peers" = 1 ] && want_peers=(litellm portkey)
else
  case ",$configs," in *,litellm*) want_peers+=(litellm) ;; esac
  case ",$configs," in *,portkey*) want_peers+=(portkey) ;; esac
fi
if [ ${#want_peers[@]} -gt 0 ]; then
  # a peer that does not install must not hide the other numbers: its rows say "not installed"
  bench/peers/install.sh "${want_peers[@]}" || say "warning: bench/peers/install.sh failed; those peers' rows will say not installed"
fi

micro_args=()
if [ "$micro" = 1 ]; then
  say "native micro-benchmarks (cargo bench -p sluice-core --bench hot_paths)"
  mkdir -p "$ROOT/.work"
  micro_out="$ROOT/.work/bench-micro.md"
  if cargo bench -p sluice-core --bench hot_paths > "$micro_out"; then
    micro_args=(--micro "$micro_out")
  else
    say "warning: the micro-benchmarks failed; the report will not have them"
  fi
fi

say "load benchmark (bench/bench.py)"
exec "$VENV/bin/python" bench/bench.py --build-note "$build_note" --started-at "$started" \
  ${micro_args[@]+"${micro_args[@]}"} ${args[@]+"${args[@]}"}
