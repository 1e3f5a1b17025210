#!/usr/bin/env bash
# Installs Debian's nginx (nginx-light would do, the full package is what operators run) when
# `nginx` is missing, for case (g) of `capif bench`: the gRPC proxy chain operators would deploy
# instead of a federation gateway. Usage: scripts/install-nginx.sh. Prints nginx's path.
# Needs apt-get (root, or sudo) and access to the Debian archive. Idempotent. The package's own
# service is not used: the bench runs its own nginx master with its own prefix and config.
set -euo pipefail
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }; }
if p=$(find_nginx); then echo "$p"; exit 0; fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
# Where a policy-rc.d allows it, the package starts its own service on port 80; the bench does not
# use or need it.
$sudo apt-get install -y -qq --no-install-recommends nginx >&2
p=$(find_nginx)
"$p" -v >&2
echo "$p"
