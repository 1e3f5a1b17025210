#!/usr/bin/env bash
# Installs Debian's prometheus package (the `prometheus` server and `promtool`) when promtool or
# prometheus is missing, so tests and people can check and scrape the components' /metrics as an
# operator's Prometheus would. Usage: scripts/install-prometheus.sh. Prints promtool's path.
# Needs apt-get (root, or sudo) and access to the Debian archive. Idempotent.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  command -v promtool; exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
# The package's own service is not what the tests use: each test runs its own server.
$sudo apt-get install -y -qq --no-install-recommends prometheus >&2
promtool --version >&2
command -v promtool
