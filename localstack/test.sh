#!/usr/bin/env bash
# The test command: starts the local stack (installing what is missing), runs every test
# against it, and stops what it started. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
# Integration tests fail (never skip) when the stack is missing.
export CI="${CI:-1}"
export DYNAMODB_CDC_MOTO_SERVER="$CACHE_DIR/venv/bin/moto_server"
# The tansu that up.sh installs (sqlite + S3 storage): tests start brokers of their own
# with it (SCRAM users, TLS in front, restarts).
export DYNAMODB_CDC_TANSU="${DYNAMODB_CDC_TANSU:-$CACHE_DIR/tansu-dynostore-libsql/bin/tansu}"

./localstack/up.sh
trap './localstack/down.sh' EXIT
cargo test --all-targets "$@"
