#!/usr/bin/env bash
# Stop what localstack/up.sh started (by pid file). Idempotent: exits 0 when
# nothing is running. Services not started by up.sh are never touched.
set -euo pipefail

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
STATE_DIR="${DYNAMODB_CDC_STATE_DIR:-$CACHE_DIR/run}"
STOP_TIMEOUT="${STOP_TIMEOUT:-10}"

log() { printf '[down] %s\n' "$*" >&2; }

# stop NAME PATTERN: PATTERN must occur in the process's command line, so a
# stale pid file whose pid was reused by another program is not acted upon.
stop() {
    local name=$1 pattern=$2 pidfile="$STATE_DIR/$1.pid" pid i
    if [[ ! -s $pidfile ]]; then
        log "$name: not running (no pid file)"
        return 0
    fi
    pid=$(<"$pidfile")
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null ||
        ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"; then
        log "$name: not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name: still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
    log "$name: stopped (pid $pid)"
}

stop tansu tansu
stop moto moto_server
