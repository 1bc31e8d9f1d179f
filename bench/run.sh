#!/usr/bin/env bash
# The benchmark: builds the daemon and the benchmark in release mode, runs them, prints a
# table and writes bench/results.json (README, "Benchmark").
#
#   bench/run.sh                 # every part, 3 runs each (~30 minutes)
#   bench/run.sh --runs 5        # more runs
#   bench/run.sh --smoke         # seconds, tiny sizes, one run, debug build; writes target/bench/smoke.json
#   bench/run.sh --parts throughput --shards 16 --item-bytes 200
#   bench/run.sh --help          # every option
#
# Needs tansu (installed by ./localstack/up.sh; TANSU_BIN overrides the path). The latency,
# snapshot and tables parts need the emulator (moto): when nothing answers on MOTO_PORT
# (4566), this script starts the local stack with localstack/up.sh and stops it again with
# down.sh at the end.
# BENCH_RUNS sets the default number of runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=("$@")
smoke=false
latency=true
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --smoke) smoke=true ;;
        --help | -h)
            cargo bench --quiet --bench pipeline -- --help
            exit 0
            ;;
        --parts)
            [[ ${args[i + 1]:-} == *latency* || ${args[i + 1]:-} == *snapshot* || ${args[i + 1]:-} == *tables* ]] || latency=false
            ;;
        --parts=*)
            [[ ${args[i]} == *latency* || ${args[i]} == *snapshot* || ${args[i]} == *tables* ]] || latency=false
            ;;
    esac
done
if $smoke && [[ " ${args[*]} " != *" --out "* ]]; then
    # CI's run must not overwrite the committed results.
    args+=(--out target/bench/smoke.json)
fi
if [[ -n ${BENCH_RUNS:-} && " ${args[*]} " != *" --runs "* ]]; then
    args+=(--runs "$BENCH_RUNS")
fi

# The smoke run only proves the benchmark still works: it takes the debug build that the
# tests already made (a release build from scratch takes CI ~10 minutes); its timings are
# not judged.
if $smoke; then
    echo "[run.sh] building the daemon and the benchmark (debug, for the smoke run)" >&2
    run_bench() { cargo test --quiet --bench pipeline -- --bench "$@"; }
    cargo test --quiet --bench pipeline --no-run
else
    echo "[run.sh] building the daemon and the benchmark (release)" >&2
    run_bench() { cargo bench --quiet --bench pipeline -- "$@"; }
    cargo build --release --quiet --bin dynamodb-cdc
    cargo bench --quiet --bench pipeline --no-run
fi

started_stack=false
stop_stack() {
    if $started_stack; then
        ./localstack/down.sh || true
    fi
}
trap stop_stack EXIT
if $latency; then
    moto_port=${MOTO_PORT:-4566}
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null; then
        echo "[run.sh] the emulator is not running: starting the local stack for the latency, snapshot and tables parts" >&2
        ./localstack/up.sh >&2
        started_stack=true
    fi
    if [[ " ${args[*]} " != *" --moto-endpoint "* ]]; then
        args+=(--moto-endpoint "http://127.0.0.1:$moto_port")
    fi
fi

run_bench "${args[@]}"
