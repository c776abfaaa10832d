#!/usr/bin/env bash
# Runs Steward's whole test suite, exactly as CI does. Works on a fresh Debian machine:
# installs what is missing and makes sure a PostgreSQL answers (both SQLite and PostgreSQL
# are tested).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/setup.sh

ensure_toolchain
ensure_postgres
ensure_python_tools
ensure_models

log "building binaries and tests"
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins --tests --locked

log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
