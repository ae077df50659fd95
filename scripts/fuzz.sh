#!/usr/bin/env bash
# `make fuzz`: runs each fuzz target (fuzz/fuzz_targets/) under libFuzzer for
# SECONDS, from its committed seeds (fuzz/corpus/<target>/) and what earlier
# runs found (.run/fuzz/corpus/<target>/, git-ignored: new inputs go there,
# the committed seeds stay as written). Prints the executions per target and
# fails if any target crashed; libFuzzer saves the input in
# fuzz/artifacts/<target>/, which the stable tests replay.
#
# usage: scripts/fuzz.sh SECONDS [TARGET...]   (no TARGET: every target)
# FUZZ_RUNS=N also stops each target after N executions, if that comes first.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
if (($#)); then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

# No sanitizer: natively the filter has no unsafe code, so what there is to
# find is a panic or a broken invariant (a panic too), and AddressSanitizer
# would halve the executions. Debug assertions and overflow checks stay on.
fuzz=(cargo +nightly fuzz)
opts=(--fuzz-dir fuzz --sanitizer none --target-dir "${CARGO_TARGET_DIR:-target}/fuzz")
"${fuzz[@]}" build "${opts[@]}"

mkdir -p .run/fuzz
report=()
failed=()
for t in "${targets[@]}"; do
  corpus=.run/fuzz/corpus/$t
  log=.run/fuzz/$t.log
  mkdir -p "$corpus"
  extra=()
  [ -f "fuzz/dict/$t.dict" ] && extra+=("-dict=fuzz/dict/$t.dict")
  [ -n "${FUZZ_RUNS:-}" ] && extra+=("-runs=$FUZZ_RUNS")
  echo "fuzz: $t for ${seconds}s${FUZZ_RUNS:+ or $FUZZ_RUNS executions} (log: $log)"
  result=ok
  if ! "${fuzz[@]}" run "${opts[@]}" "$t" "$corpus" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    result=CRASH
    failed+=("$t")
    echo "fuzz: $t failed ($log):"
    # The panic and its stack, through the line naming the saved input.
    awk '/panicked at|ERROR: libFuzzer/ { p = 1 } p && !/^#[0-9]/ { print } /Test unit written/ { exit }' \
      "$log" | head -n 80 | grep . || tail -n 20 "$log"
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  report+=("$(printf '%-14s %14s %10s  %s' "$t" "${execs:-?}" "${rate:-?}" "$result")")
done

printf '%-14s %14s %10s  %s\n' target executions exec/s result
printf '%s\n' "${report[@]}"
if ((${#failed[@]})); then
  echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/; minimize with" \
    "cargo +nightly fuzz tmin ${opts[*]} TARGET INPUT, then commit it under fuzz/corpus/TARGET/)" >&2
  exit 1
fi
