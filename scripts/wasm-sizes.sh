#!/usr/bin/env bash
# Print each built filter's size and fail when one is above its budget.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
budget_of() {
  local b
  b=$(awk -v n="$1" '$1==n {print $2}' scripts/wasm-budgets.txt)
  [ -n "$b" ] || b=$(awk '$1=="default" {print $2}' scripts/wasm-budgets.txt)
  echo "$b"
}
shopt -s nullglob
files=("$WASM_DIR"/*.wasm)
[ ${#files[@]} -gt 0 ] || die "no .wasm built in $WASM_DIR"
fail=0
printf '%-28s %10s %10s  %s\n' filter "size KiB" "budget" verdict
for f in "${files[@]}"; do
  name=$(basename "$f" .wasm)
  kib=$(( $(stat -c %s "$f") / 1024 ))
  budget=$(budget_of "$name")
  verdict=ok
  if [ "$kib" -gt "$budget" ]; then verdict="OVER BUDGET"; fail=1; fi
  printf '%-28s %10s %10s  %s\n' "$name" "$kib" "$budget" "$verdict"
done
exit $fail
