#!/usr/bin/env bash
# Installs Linux `perf` (Debian's linux-perf) and inferno (folds `perf script` output, renders
# flame graphs as SVG) for scripts/flamegraph.sh. Not called by CI. Idempotent.
# Usage: scripts/install-perf.sh   (needs root or sudo for apt-get, and the crates registry)
set -euo pipefail
if ! command -v perf >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq linux-perf >&2
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
  cargo install --locked inferno >&2
fi
perf --version >&2
command -v perf
