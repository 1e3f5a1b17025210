#!/usr/bin/env bash
# Installs Debian's chromium, the headless browser that scenarios/tests/report_html.rs opens
# report.html in (`chromium --headless --dump-dom`), unless one is already there.
# Usage: scripts/install-chromium.sh   Prints the browser's path. Idempotent.
# Needs apt-get (Debian or a derivative) and root, or sudo without a password.
set -euo pipefail
for b in "${CHROMIUM:-}" chromium chromium-browser; do
  if [ -n "$b" ] && command -v "$b" >/dev/null 2>&1; then
    command -v "$b"; exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no chromium and no apt-get; install Chromium and set CHROMIUM" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "install-chromium: need root (or sudo without a password) to apt-get install chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends chromium >&2
command -v chromium
