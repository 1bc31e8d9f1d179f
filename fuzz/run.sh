#!/usr/bin/env bash
# Fuzzes the record converter and the GetRecords fast path, FUZZ_SECONDS each (default 60). cargo-fuzz is installed into
# the cache outside the clone; its build directory lives there too, so CI rebuilds little.
# The machine has only a stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the sanitizer
# flags cargo fuzz passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
if [ ! -x "$CACHE_DIR/cargo-fuzz/bin/cargo-fuzz" ]; then
    echo "[fuzz] installing cargo-fuzz into $CACHE_DIR/cargo-fuzz (about 2 minutes)"
    cargo install cargo-fuzz --locked --version 0.13.2 --root "$CACHE_DIR/cargo-fuzz"
fi
export PATH="$CACHE_DIR/cargo-fuzz/bin:$PATH" RUSTC_BOOTSTRAP=1
# Each target for FUZZ_SECONDS: the converter of SDK records, and the fast path that
# converts GetRecords bodies (seeded with real pages; new inputs go to the cache).
status=0
for target in convert convert_page; do
    corpus="$CACHE_DIR/fuzz-corpus/$target"
    mkdir -p "$corpus"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    echo "[fuzz] $target for ${FUZZ_SECONDS:-60} s"
    cargo fuzz run "$target" --target-dir "$CACHE_DIR/fuzz-target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="${FUZZ_SECONDS:-60}" -print_final_stats=1 2>&1 |
        grep -E "^(Done|stat::number_of_executed_units|==|SUMMARY|INFO: Seed|.*panicked)" || true
    # grep hides libFuzzer's chatter; the exit status of cargo fuzz decides.
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit "$status"
