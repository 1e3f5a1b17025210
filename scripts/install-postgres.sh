#!/usr/bin/env bash
# Installs Debian's PostgreSQL server (`postgresql`) when no `initdb` is found under
# /usr/lib/postgresql/*/bin, for the CCF's PostgreSQL store backend: its tests start their own
# throwaway clusters (capif_scenarios::postgres::PgServer) from that bin dir.
# Usage: scripts/install-postgres.sh. Prints the newest bin dir (e.g. /usr/lib/postgresql/15/bin).
# Needs apt-get (root, or sudo) and access to the Debian archive. Idempotent. The package's own
# cluster and service are not used: each test runs its own server in its own data dir.
set -euo pipefail
find_bin() {
  local newest=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] || continue
    if [ -z "$newest" ] || [ "$(basename "$(dirname "$d")")" -gt "$(basename "$(dirname "$newest")")" ] 2>/dev/null; then
      newest="$d"
    fi
  done
  [ -n "$newest" ] && echo "$newest"
}
if d=$(find_bin); then echo "$d"; exit 0; fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
# Where a policy-rc.d allows it, the package creates and starts a default cluster on port 5432;
# the tests neither use nor need it. The package also creates the `postgres` user the tests run
# their servers as when they are root (PostgreSQL refuses to run as root).
$sudo apt-get install -y -qq --no-install-recommends postgresql >&2
d=$(find_bin)
"$d/postgres" --version >&2
echo "$d"
