#!/usr/bin/env bash
# Release artifacts for users who do not build Rust:
#
#   scripts/dist.sh [--build] [--out DIR]
#
# writes into DIR (default dist/, recreated):
#   sluice_<filter>.wasm          each filter, as built by scripts/build.sh
#   sluice_<filter>.wasm.sha256   its checksum, `sha256sum -c` format
#   sluice-examples-<version>.tar.gz   examples/ and envoy/ (the configs the .wasm files run with;
#                                 never a local .env with provider keys)
#   SHA256SUMS                    every file above
# The tarball is reproducible (sorted, fixed mtime and owner) so its checksum only changes
# when the examples do. --build runs scripts/build.sh first.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

build=0
out="$ROOT/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1 ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[ $build -eq 1 ] && scripts/build.sh

version=$(awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && $1=="version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml)
[ -n "$version" ] || die "could not read the workspace version from Cargo.toml"

wasm_files=()
missing=()
for dir in filters/*/; do
  crate=$(basename "$dir")
  [ "$crate" = core ] && continue
  f="sluice_${crate//-/_}.wasm"
  if [ -f "$WASM_DIR/$f" ]; then wasm_files+=("$f"); else missing+=("$f"); fi
done
[ ${#missing[@]} -eq 0 ] || die "not built: ${missing[*]} (run scripts/build.sh, or scripts/dist.sh --build)"

rm -rf "$out"
mkdir -p "$out"
for f in "${wasm_files[@]}"; do
  cp "$WASM_DIR/$f" "$out/$f"
  (cd "$out" && sha256sum "$f" > "$f.sha256")
done

tarball="sluice-examples-$version.tar.gz"
# Fixed metadata: the same examples give the same bytes.
tar --sort=name --mtime='2000-01-01 00:00:00Z' --owner=0 --group=0 --numeric-owner \
    --exclude='__pycache__' --exclude='node_modules' --exclude='.env' \
    --transform "s,^,sluice-examples-$version/," \
    -cf - examples envoy | gzip -n -9 > "$out/$tarball"

(cd "$out" && sha256sum "${wasm_files[@]}" "$tarball" > SHA256SUMS)
say "release artifacts for sluice $version in ${out#"$ROOT"/}:"
(cd "$out" && ls -l --time-style=+ | awk 'NR>1 {printf "  %10s  %s\n", $5, $NF}') >&2
