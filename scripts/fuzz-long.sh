#!/usr/bin/env bash
# Runs every property test of the workspace (docs/RELIABILITY.md, "Property tests") with many
# cases, in the release profile, one property at a time, and prints a table: crate, property,
# cases, seconds, result. Exit status 1 when any property failed.
#
#   scripts/fuzz-long.sh                 # 1,000,000 cases per property
#   CASES=20000 scripts/fuzz-long.sh     # a shorter run
#   scripts/fuzz-long.sh token identity  # only the properties whose names contain a word
#
# The case count reaches the tests through CAPIF_PROPTEST_CASES (ccf_core::testing), which every
# property reads; CI runs the same properties with the default count (cargo test).
#
# The test binaries are built once, for all the crates together (so every crate is built with
# the same features), and then run directly.
set -euo pipefail
cd "$(dirname "$0")/.."

CASES="${CASES:-1000000}"
filters=("$@")

# crate (package), test target name: where the properties live
targets=(
  "ccf-core ccf_core"
  "capif-2e props"
  "aef-stub aef_stub"
  "capif-gateway capif_gateway"
  "capif-ccf capif_ccf"
  "capif-scenarios props"
)

echo "building the test binaries (release)..." >&2
pkgs=()
for t in "${targets[@]}"; do pkgs+=(-p "${t%% *}"); done
json=$(cargo test --release --no-run --message-format=json "${pkgs[@]}" \
  --lib --test props 2>/dev/null | grep '"executable":"/' || true)

# The executable of package $1's test target $2.
executable() {
  grep "\"package_id\":\"[^\"]*[/#]$1[@#]" <<<"$json" | grep "\"name\":\"$2\"" \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n 1
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
total_cases=0
start_all=$(date +%s.%N)
printf '%-16s %-66s %10s %9s %s\n' crate property cases seconds result
for t in "${targets[@]}"; do
  crate="${t%% *}"
  exe=$(executable "$crate" "${t#* }")
  if [[ -z "$exe" ]]; then
    echo "no test binary found for $t" >&2
    exit 2
  fi
  mapfile -t names < <("$exe" --list 2>/dev/null | sed -n 's/: test$//p' | grep 'props_' || true)
  for name in "${names[@]}"; do
    if ((${#filters[@]})); then
      keep=0
      for f in "${filters[@]}"; do [[ "$name" == *"$f"* ]] && keep=1; done
      ((keep)) || continue
    fi
    t0=$(date +%s.%N)
    if CAPIF_PROPTEST_CASES="$CASES" "$exe" --exact "$name" --test-threads=1 >"$log" 2>&1; then
      result=ok
    else
      result=FAILED
      failed=1
      echo "--- $crate $name failed:" >&2
      tail -n 40 "$log" >&2
    fi
    t1=$(date +%s.%N)
    total_cases=$((total_cases + CASES))
    printf '%-16s %-66s %10d %9.1f %s\n' "$crate" "$name" "$CASES" \
      "$(awk "BEGIN{print $t1 - $t0}")" "$result"
  done
done
end_all=$(date +%s.%N)
printf 'total: %d cases in %.0f s, %s\n' "$total_cases" "$(awk "BEGIN{print $end_all - $start_all}")" \
  "$([[ $failed == 0 ]] && echo "0 failures" || echo "FAILURES")"
exit "$failed"
