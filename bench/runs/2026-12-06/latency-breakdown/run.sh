#!/usr/bin/env bash
cd /work/main
B=$(ls -t /tmp/lto-target/release/deps/pipeline-* | grep -v '\.d$' | head -1)
( while sleep 0.5; do curl -s -m 1 127.0.0.1:19464/metrics > /tmp/m.new 2>/dev/null && [ -s /tmp/m.new ] && mv /tmp/m.new /tmp/m.txt; done ) &
SCR=$!
$B --bench --parts latency --runs 1 --daemon /tmp/lto-target/release/dynamodb-cdc --daemon-config '{"metrics":{"listen":"127.0.0.1:19464"}}' --out /tmp/lat.json 2>&1 | grep -E "latency|received"
kill $SCR
grep -E "^dynamodb_cdc_(aws_request_duration_seconds|produce_duration_seconds)_(sum|count)|aws_request_duration_seconds_bucket\{.*GetRecords" /tmp/m.txt
