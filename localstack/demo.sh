#!/usr/bin/env bash
# The demo: start the local stack, seed the demo tables and role, write changes, run
# dynamodb-cdc with config.example.json until every change is in Kafka, show some records
# and the throughput, then stop the daemon (the stack keeps running; ./localstack/down.sh
# stops it).
#   COUNT=5000 ./localstack/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COUNT="${COUNT:-2000}"
PY="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc/venv/bin/python"

./localstack/up.sh
./localstack/seed.sh
cargo build --release --bin dynamodb-cdc --example tail
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:${MOTO_PORT:-4566}"

tail_count() {
    target/release/examples/tail --count --topic dynamodb.demo_orders --topic dynamodb.demo_events |
        awk -F'[ =]' '{ r += $3; t += $5 } END { print r - t }'
}
before=$(tail_count 2>/dev/null || echo 0)
echo "[demo] writing $COUNT changes to demo_orders and demo_events"
"$PY" localstack/demo_writes.py --count "$COUNT" --quiet

mkdir -p .dynamodb-cdc
echo "[demo] starting dynamodb-cdc (log: .dynamodb-cdc/demo.log)"
start=$(date +%s.%N)
target/release/dynamodb-cdc run --config config.example.json 2>.dynamodb-cdc/demo.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
# moto records a few extra events (e.g. two INSERTs for an update of a new key), so wait
# for at least COUNT new change events.
for _ in $(seq 1 600); do
    now=$(tail_count 2>/dev/null || echo 0)
    [ $((now - before)) -ge "$COUNT" ] && break
    kill -0 $pid 2>/dev/null || { echo "[demo] dynamodb-cdc exited; see .dynamodb-cdc/demo.log"; exit 1; }
    sleep 0.2
done
end=$(date +%s.%N)
delivered=$(( $(tail_count) - before ))
echo "[demo] a few records from dynamodb.demo_orders:"
target/release/examples/tail --topic dynamodb.demo_orders | tail -n 3
awk -v n="$delivered" -v s="$start" -v e="$end" \
    'BEGIN { printf "[demo] %d change events in Kafka, %.1f s after the daemon started: %.0f changes/s (moto is the bottleneck)\n", n, e - s, n / (e - s) }'
kill -TERM $pid
wait $pid && echo "[demo] dynamodb-cdc stopped cleanly (exit 0); positions are in .dynamodb-cdc/checkpoints"
trap - EXIT
