#!/usr/bin/env bash
# Flame graphs of the miss path (docs/BENCHMARKS.md, "Miss path profile"): runs the full
# `capif bench` from target/release and, during case (b) only (the 3000 cross-domain misses with
# unique keys: gateway-A -> gateway-B -> CCF-B), samples operator-a's gateway, operator-b's
# gateway and operator-b's CCF with `perf record`, then folds each with inferno into an SVG.
# Case (b) is exactly the window between the last line of case (a) ("open-loop p50 ratio") and
# the "(b)" report of the bench: the floor's bare hops run first in it and are other processes,
# so these three profiles hold the miss path only. The bench's own figures are disturbed by the
# sampling; the script prints case (b)'s lines only to show the run was whole. Release builds have no debug info, so stacks are unwound from .eh_frame
# (`--call-graph dwarf`); inlined functions fold into their callers.
#
# With CASE=a it profiles the hit path instead: during case (a) (three repetitions of floor, then
# gateway-A, on one hot key) it samples operator-a's gateway and the one-hop floor process side by
# side, so the two flame graphs show what the gateway does that a bare tonic hop does not.
#
# CASE=d samples every process a full invoker flow touches during case (d) (the invoker is the
# bench process itself), into OUT_DIR/flame-flow-{invoker,aef-a,ccf-a,gateway-a,gateway,ccf}-LABEL.svg.
#
# Usage: [CASE=a|d] scripts/flamegraph.sh LABEL [OUT_DIR]   (e.g. `before`, `after`; default
# docs/bench). Writes OUT_DIR/flame-miss-{gateway-a,gateway,ccf}-LABEL.svg (gateway and ccf:
# operator-b's, the partner side), or with CASE=a OUT_DIR/flame-hit-{gateway-a,floor}-LABEL.svg.
# Needs: cargo build --release --bins, scripts/install-perf.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
label="${1:?usage: $0 LABEL [OUT_DIR]}"
out="${2:-$here/docs/bench}"
freq="${PERF_FREQ:-2999}"
bin="${BIN_DIR:-$here/target/release}"
work="$(mktemp -d)"
run="$work/run"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
mkdir -p "$out"

"$bin/capif" bench --run-dir "$run" >"$work/bench.log" 2>&1 &
bench=$!

wait_for() { # a line of the bench report
  until grep -q "$1" "$work/bench.log"; do
    kill -0 "$bench" 2>/dev/null || { cat "$work/bench.log" >&2; echo "bench ended early" >&2; exit 1; }
    sleep 0.05
  done
}
pid_of() { # binary, domain: the newest such process of this run
  pgrep -n -f "$bin/$1 .*$run/$2" || pgrep -n -f "$1.*$run.*$2"
}

declare -A pids=()
miss_path_pids() { # the processes a cross-domain miss crosses
  pids[gateway-a]="$(pid_of capif-gateway operator-a.test)"
  pids[gateway]="$(pid_of capif-gateway operator-b.test)"
  pids[ccf]="$(pid_of ccf operator-b.test)"
}

case="${CASE:-b}"
if [ "$case" = a ]; then
  wait_for '^(a) cache-hit'
  # The one-hop floor is the first floor process the bench starts (the chains of 2 and 3 follow).
  pids[gateway-a]="$(pid_of capif-gateway operator-a.test)"
  pids[floor]="$(pgrep -o -f "$bin/capif bench-floor")"
  kind=hit
  title="hit path (bench case a)"
  start='^(a) cache-hit' stop='open loop at'
elif [ "$case" = d ]; then
  # Case (d): where a full invoker flow's CPU goes, across every process it touches.
  wait_for 'ratio (c)'
  miss_path_pids
  pids[invoker]="$bench"
  pids[aef-a]="$(pid_of aef-stub operator-a.test)"
  pids[ccf-a]="$(pid_of ccf operator-a.test)"
  kind=flow
  title="full invoker flow (bench case d)"
  start='^(d) ' stop='flows per second'
else
  wait_for 'open-loop p50 ratio'
  miss_path_pids
  kind=miss
  title="miss path (bench case b)"
  start='^(b) ' stop='^(b) '
fi
recorders=()
for name in "${!pids[@]}"; do
  perf record -q -F "$freq" --call-graph dwarf,16384 -p "${pids[$name]}" \
    -o "$work/$name.data" >/dev/null 2>&1 &
  recorders+=($!)
done
wait_for "$stop"
for r in "${recorders[@]}"; do kill -INT "$r"; done
for r in "${recorders[@]}"; do wait "$r" || true; done

for name in "${!pids[@]}"; do
  perf script -i "$work/$name.data" 2>/dev/null \
    | inferno-collapse-perf >"$work/$name.folded"
  inferno-flamegraph --title "$title: $name, $label" \
    <"$work/$name.folded" >"$out/flame-$kind-$name-$label.svg"
  # FOLDED_DIR keeps the folded stacks, for counting shares by frame.
  [ -n "${FOLDED_DIR:-}" ] && cp "$work/$name.folded" "$FOLDED_DIR/$kind-$name-$label.folded"
  echo "$out/flame-$kind-$name-$label.svg"
done
grep -A3 "$start" "$work/bench.log" || true
kill -INT "$bench" 2>/dev/null || true
wait "$bench" || true
rm -rf "$work"
