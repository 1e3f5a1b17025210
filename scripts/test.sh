#!/usr/bin/env bash
# The project's test command (README, CI). First the whole suite on the embedded default (redb);
# then every test that runs CCFs and gateways through the harnesses (`capif_testkit::ccf`,
# `capif_testkit::federation`) once more with their state on PostgreSQL
# (`CAPIF_TEST_STORE=postgres`, see `capif_testkit::postgres`): one suite, run as a matrix over
# both store backends, with no copy of any test. PostgreSQL is installed by
# `scripts/install-postgres.sh` when missing; the tests start their own servers.
# Arguments go to every `cargo test` (e.g. `scripts/test.sh -- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== the whole suite, store backend: redb (the default)"
cargo test --workspace "$@"

echo "== the tests that run CCFs and gateways, store backend: postgres"
CAPIF_TEST_STORE=postgres cargo test -p capif-ccf -p capif-gateway "$@"
CAPIF_TEST_STORE=postgres cargo test -p capif-scenarios \
    --test e2e --test methods --test foreign_revocation --test capif1e_keylog --test reflection "$@"
