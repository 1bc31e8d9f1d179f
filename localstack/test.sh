#!/usr/bin/env bash
# The test command: starts the local stack (installing what is missing), runs every test
# against it, and stops what it started. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
# Integration tests fail (never skip) when the stack is missing.
export CI="${CI:-1}"
export DYNAMODB_CDC_MOTO_SERVER="$CACHE_DIR/venv/bin/moto_server"

./localstack/up.sh
trap './localstack/down.sh' EXIT
cargo test --all-targets "$@"
