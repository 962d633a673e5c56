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
# Every filter crate (filters/* except the core library) must have built its .wasm.
fail=0
printf '%-28s %10s %10s  %s\n' filter "size KiB" "budget" verdict
for dir in filters/*/; do
  crate=$(basename "$dir")
  [ "$crate" = core ] && continue
  name="sluice_${crate//-/_}"
  f="$WASM_DIR/$name.wasm"
  if [ ! -f "$f" ]; then
    printf '%-28s %10s %10s  %s\n' "$name" - - "NOT BUILT"; fail=1; continue
  fi
  kib=$(( $(stat -c %s "$f") / 1024 ))
  budget=$(budget_of "$name")
  verdict=ok
  if [ "$kib" -gt "$budget" ]; then verdict="OVER BUDGET"; fail=1; fi
  printf '%-28s %10s %10s  %s\n' "$name" "$kib" "$budget" "$verdict"
done
exit $fail
