#!/usr/bin/env bash
# Start a local, Docker-free stack for dynamodb-cdc:
#   - moto server (DynamoDB, DynamoDB Streams, STS, IAM, ...) on 127.0.0.1:${MOTO_PORT:-4566}
#   - tansu Kafka broker (in-memory storage)          on 127.0.0.1:${KAFKA_PORT:-9092}
# tansu is built once with cargo (features dynostore = S3 storage, libsql = sqlite storage,
# which tansu needs to check SCRAM) and cached in $CACHE_DIR/tansu-<features>/; the tests'
# own brokers use that same binary (localstack/test.sh exports DYNAMODB_CDC_TANSU).
# Idempotent: a service that already answers on its port is left alone.
# Set KAFKA_BOOTSTRAP to use your own broker instead of starting tansu on KAFKA_PORT.
# Stop with localstack/down.sh.
set -euo pipefail

MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
MOTO_PORT="${MOTO_PORT:-4566}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
HOST=127.0.0.1
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-30}"

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
VENV="$CACHE_DIR/venv"
TANSU_FEATURES="dynostore,libsql"
# One root per feature set (the version is checked in its .crates.toml): changing the
# features builds a new binary next to the old one instead of replacing it.
TANSU_ROOT="$CACHE_DIR/tansu-${TANSU_FEATURES//,/-}"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
STATE_DIR="${DYNAMODB_CDC_STATE_DIR:-$CACHE_DIR/run}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROBE="$HERE/probe.py"

log() { printf '[up] %s\n' "$*" >&2; }
die() { printf '[up] ERROR: %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is required"
for port in "$MOTO_PORT" "$KAFKA_PORT"; do
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        die "invalid port: $port"
    fi
done
mkdir -p "$STATE_DIR" "$CACHE_DIR"
# Serialise concurrent runs of up.sh on the same state dir.
if command -v flock >/dev/null; then
    exec 8>"$STATE_DIR/up.lock"
    flock 8
fi

# pid_alive PIDFILE PATTERN: true when the pid file names a live process whose
# command line contains PATTERN (guards against pid reuse).
pid_alive() {
    local pidfile=$1 pattern=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

aws_healthy() { python3 "$PROBE" aws "$HOST" "$MOTO_PORT" 2>/dev/null; }
kafka_healthy() { python3 "$PROBE" kafka "$HOST" "$KAFKA_PORT" >/dev/null 2>&1; }

# spawn NAME LOGFILE PIDFILE CMD...: detach CMD into its own session.
spawn() {
    local name=$1 logfile=$2 pidfile=$3
    shift 3
    local detach=() i
    command -v setsid >/dev/null && detach=(setsid)
    : >"$logfile"
    rm -f "$pidfile"
    # The inner shell records its own pid and then execs the service, so the
    # pid file is right even if setsid had to fork. Lock fds 8/9 are closed so
    # the long-running service does not hold up.sh's locks.
    # shellcheck disable=SC2016
    nohup "${detach[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
        >>"$logfile" 2>&1 </dev/null 8>&- 9>&- &
    for ((i = 0; i < 50; i++)); do
        [[ -s $pidfile ]] && break
        sleep 0.1
    done
    [[ -s $pidfile ]] || die "$name did not start (no pid file $pidfile)"
    log "started $name (pid $(<"$pidfile")), log: $logfile"
}

# wait_healthy NAME PIDFILE LOGFILE CHECK_FN
wait_healthy() {
    local name=$1 pidfile=$2 logfile=$3 check=$4 start=$SECONDS
    while ! "$check"; do
        if ! kill -0 "$(<"$pidfile")" 2>/dev/null; then
            log "$name exited during start-up; last log lines:"
            tail -n 30 "$logfile" >&2 || true
            rm -f "$pidfile"
            die "$name failed to start"
        fi
        if ((SECONDS - start >= STARTUP_TIMEOUT)); then
            log "$name not healthy after ${STARTUP_TIMEOUT}s; last log lines:"
            tail -n 30 "$logfile" >&2 || true
            kill -TERM "$(<"$pidfile")" 2>/dev/null || true
            sleep 1
            kill -KILL "$(<"$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
            die "$name failed to become healthy within ${STARTUP_TIMEOUT}s (stopped it)"
        fi
        sleep 0.2
    done
    log "$name healthy after $((SECONDS - start))s"
}

# ---------------------------------------------------------------- moto
start_moto() {
    local pidfile="$STATE_DIR/moto.pid" logfile="$STATE_DIR/moto.log"
    if aws_healthy; then
        if pid_alive "$pidfile" moto_server; then
            log "moto already running (pid $(<"$pidfile")) on $HOST:$MOTO_PORT"
        else
            log "an AWS endpoint already answers on $HOST:$MOTO_PORT (not started by us); leaving it alone"
        fi
        return
    fi
    if pid_alive "$pidfile" moto_server; then
        # Ours, but not answering yet (e.g. a concurrent up.sh): just wait.
        wait_healthy moto "$pidfile" "$logfile" aws_healthy
        return
    fi
    rm -f "$pidfile"
    port_open "$MOTO_PORT" && die "port $MOTO_PORT is taken by something that is not an AWS endpoint"

    if [[ ! -x $VENV/bin/moto_server ]] ||
        ! "$VENV/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
        log "installing moto[server]==$MOTO_VERSION into $VENV (~30-60 s)"
        [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
    fi
    spawn moto "$logfile" "$pidfile" "$VENV/bin/moto_server" -H "$HOST" -p "$MOTO_PORT"
    wait_healthy moto "$pidfile" "$logfile" aws_healthy
}

# ---------------------------------------------------------------- tansu
# tansu_installed: the binary exists and is the wanted version.
tansu_installed() {
    [[ -x $TANSU_BIN ]] && grep -qF "\"tansu $TANSU_VERSION " "$TANSU_ROOT/.crates.toml" 2>/dev/null
}

install_tansu() {
    if ! command -v cargo >/dev/null; then
        [[ -n ${KAFKA_BOOTSTRAP:-} ]] || die "tansu is not installed and cargo is missing (or set KAFKA_BOOTSTRAP to use your own broker)"
        log "WARNING: cargo is missing, so tansu is not installed: tests that start brokers of their own will fail"
        return
    fi
    local buildlog="$TANSU_ROOT.build.log"
    mkdir -p "$TANSU_ROOT"
    # Serialise concurrent up.sh runs: only one of them builds.
    if command -v flock >/dev/null; then
        exec 9>"$TANSU_ROOT.install.lock"
        if ! flock -n 9; then
            log "another tansu build is running (log: $buildlog); waiting for it"
            flock 9
        fi
    fi
    if ! tansu_installed; then
        log "NOTE: building tansu $TANSU_VERSION (features $TANSU_FEATURES) with cargo install;"
        log "      this takes 15-35 minutes on 2 cores, once (log: $buildlog)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" \
            --root "$TANSU_ROOT" >"$buildlog" 2>&1 ||
            { tail -n 30 "$buildlog" >&2; die "cargo install tansu failed"; }
    fi
    if command -v flock >/dev/null; then
        exec 9>&-
    fi
}

start_tansu() {
    local pidfile="$STATE_DIR/tansu.pid" logfile="$STATE_DIR/tansu.log"
    if [[ -n ${KAFKA_BOOTSTRAP:-} ]]; then
        log "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP is set; not starting tansu"
        return
    fi
    if kafka_healthy; then
        if pid_alive "$pidfile" tansu; then
            log "tansu already running (pid $(<"$pidfile")) on $HOST:$KAFKA_PORT"
        else
            log "a Kafka broker already answers on $HOST:$KAFKA_PORT (not started by us); leaving it alone"
        fi
        return
    fi
    if pid_alive "$pidfile" tansu; then
        wait_healthy tansu "$pidfile" "$logfile" kafka_healthy
        return
    fi
    rm -f "$pidfile"
    port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by something that does not speak Kafka"

    # tansu reads CLUSTER_ID, LISTENER_URL, ... from the environment too; the
    # explicit flags below take precedence.
    spawn tansu "$logfile" "$pidfile" "$TANSU_BIN" broker \
        --cluster-id dynamodb-cdc-local \
        --listener-url "tcp://$HOST:$KAFKA_PORT" \
        --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
        --storage-engine memory://tansu/
    wait_healthy tansu "$pidfile" "$logfile" kafka_healthy
}

start_moto
# Installed even when a broker already answers or KAFKA_BOOTSTRAP is set: tests start
# brokers of their own (SCRAM, broker restarts) from this binary.
tansu_installed || install_tansu
start_tansu

bootstrap="${KAFKA_BOOTSTRAP:-$HOST:$KAFKA_PORT}"
cat <<EOF

Local stack is up.
  AWS (moto):  http://$HOST:$MOTO_PORT   (DynamoDB, DynamoDB Streams, STS, IAM; account 123456789012)
  Kafka:       $bootstrap
  State/logs:  $STATE_DIR

Export hints:
  export AWS_ENDPOINT_URL=http://$HOST:$MOTO_PORT
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
  export KAFKA_BOOTSTRAP=$bootstrap

Next: $HERE/seed.sh   (demo tables + IAM role)   |   stop: $HERE/down.sh
EOF
