#!/usr/bin/env bash
# Seed the local emulator with the demo tables and IAM role (see seed.py).
# Uses the venv created by up.sh (boto3 is a dependency of moto); falls back
# to a python3 that can import boto3 (e.g. when using docker-compose.yml).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc/venv"

if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import boto3' 2>/dev/null; then
    PY="$VENV/bin/python"
elif python3 -c 'import boto3' 2>/dev/null; then
    PY=python3
else
    echo "[seed] no python with boto3 found; run localstack/up.sh first (it creates $VENV)" >&2
    exit 1
fi

export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:${MOTO_PORT:-4566}}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"

exec "$PY" "$HERE/seed.py" "$@"
