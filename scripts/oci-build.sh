#!/usr/bin/env bash
# Build one Wasm plugin image per filter from packaging/filter.Dockerfile (FROM scratch +
# plugin.wasm: the layout Istio's WasmPlugin `url: oci://...` pulls).
#
#   scripts/oci-build.sh [--dry-run] [--push] [--registry REG] [--tag TAG] [filter...]
#
#   --dry-run       print the commands, run nothing (no container engine needed)
#   --push          push to the registry (OCI manifest with the annotation
#                   module.wasm.image/variant=compat); without it images are loaded locally
#   --registry REG  image name prefix (default $SLUICE_REGISTRY or "sluice"): REG/sluice-<filter>:TAG
#   --tag TAG       image tag (default: the workspace version from Cargo.toml)
#   filter...       filter names (directories under filters/); default: every filter
#
# Needs Docker with buildx (Docker 23+ has it built in) and the filters built first
# (scripts/build.sh). With no reachable engine it stops with a clear error.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

dry_run=0
push=0
registry="${SLUICE_REGISTRY:-sluice}"
tag=""
filters=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --push) push=1 ;;
    --registry) registry="${2:?--registry needs a value}"; shift ;;
    --tag) tag="${2:?--tag needs a value}"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) filters+=("$1") ;;
  esac
  shift
done

workspace_version() {
  awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && $1=="version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml
}
[ -n "$tag" ] || tag="$(workspace_version)"
[ -n "$tag" ] || die "could not read the workspace version from Cargo.toml (pass --tag)"

all_filters() {
  for dir in filters/*/; do
    local crate; crate=$(basename "$dir")
    [ "$crate" = core ] && continue
    echo "$crate"
  done
}
if [ ${#filters[@]} -eq 0 ]; then
  mapfile -t filters < <(all_filters)
fi

missing=()
for f in "${filters[@]}"; do
  [ -d "filters/$f" ] && [ "$f" != core ] || die "unknown filter '$f' (one of: $(all_filters | tr '\n' ' '))"
  wasm="sluice_${f//-/_}.wasm"
  [ -f "$WASM_DIR/$wasm" ] || missing+=("$wasm")
done

if [ $dry_run -eq 0 ]; then
  [ ${#missing[@]} -eq 0 ] || die "not built: ${missing[*]} (run scripts/build.sh first)"
  command -v docker >/dev/null 2>&1 \
    || die "no container engine: 'docker' is not installed. Install Docker (with buildx), or use --dry-run to print the commands"
  docker info >/dev/null 2>&1 \
    || die "no container engine: 'docker info' cannot reach a Docker daemon. Start one (or set DOCKER_HOST), or use --dry-run to print the commands"
  docker buildx version >/dev/null 2>&1 \
    || die "docker buildx is missing (needed for OCI annotations); install the buildx plugin"
else
  for w in "${missing[@]}"; do echo "# warning: $WASM_DIR/$w is not built yet (scripts/build.sh)"; done
fi

for f in "${filters[@]}"; do
  wasm="sluice_${f//-/_}.wasm"
  image="$registry/sluice-$f:$tag"
  cmd=(docker buildx build -f packaging/filter.Dockerfile
       --build-arg "FILTER=$f" --build-arg "WASM=$wasm" --build-arg "VERSION=$tag"
       -t "$image")
  if [ $push -eq 1 ]; then
    cmd+=(--annotation "manifest:module.wasm.image/variant=compat"
          --output "type=image,oci-mediatypes=true,push=true")
  else
    cmd+=(--load)
  fi
  cmd+=(.)
  if [ $dry_run -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    say "building $image"
    "${cmd[@]}"
  fi
done
