#!/usr/bin/env bash
# Fuzzes the record converter for FUZZ_SECONDS (default 60). cargo-fuzz is installed into
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
cargo fuzz run convert --target-dir "$CACHE_DIR/fuzz-target" -- \
    -max_total_time="${FUZZ_SECONDS:-60}" -print_final_stats=1 2>&1 | grep -E "^(Done|stat::|==|SUMMARY|INFO: Seed|.*panicked)" || true
# grep hides libFuzzer's chatter; the exit status of cargo fuzz decides.
exit "${PIPESTATUS[0]}"
