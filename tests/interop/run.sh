#!/usr/bin/env bash
# Interop test: the real macp-sdk-python client (from PyPI, unchanged) against
# the macp-runtime server built from this tree.
#
#   bash tests/interop/run.sh
#
# Creates (or reuses) a virtualenv in target/interop-venv with the pinned SDK
# (with its `receipts` extra, which brings `cryptography` for Ed25519
# signatures) and pytest, builds the server (debug), then runs
# tests/interop/ against a fresh `macp-runtime --dev` on a free loopback
# port, once with --memory-only and once with a data directory in a
# temporary directory (the "fs" pass: the file backend).
# Needs only the Rust toolchain, python3 (with venv) and network access to
# PyPI the first time. Exits non-zero if anything fails.
#
# A third pass ("readonly") starts the server with --memory-only and
# --policies-dir tests/interop/policies and runs only the tests marked
# `readonly` (the read-only policy registry); the other passes run all others.
# A fourth ("postgres") runs the server with --storage postgres on a
# throwaway PostgreSQL server (macp-pg-test, Debian's postgresql package,
# installed when missing and run as root).
# A fifth ("cluster") runs two cluster nodes (--node-id, a shared
# --cluster-secret, 1 s leases) on another throwaway PostgreSQL, and hands
# the tests both addresses: each agent's client connects to the other node
# than the previous one, so requests are forwarded between the nodes and a
# policy registered through one node is used through the other. It runs
# the same tests as the memory pass.
#
# Environment: PYTHON (default python3), MACP_INTEROP_BACKENDS (default
# "memory fs readonly postgres cluster"), MACP_INTEROP_TIMEOUT (seconds per RPC/read, default
# 10), extra pytest arguments are passed through ("$@").
set -euo pipefail

SDK_VERSION=0.22.0
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
VENV="$TARGET_DIR/interop-venv"
PYTHON="${PYTHON:-python3}"
BACKENDS="${MACP_INTEROP_BACKENDS:-memory fs readonly postgres cluster}"

log() { printf '== interop: %s\n' "$*"; }

# ---- Python side: a venv with exactly the pinned SDK ------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" - "$SDK_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import pytest  # noqa: F401
import cryptography  # noqa: F401  (the SDK's receipts extra: verify_receipt)
sys.exit(0 if version("macp-sdk-python") == sys.argv[1] else 1)
EOF
}
if venv_ok; then
    log "reusing $VENV (macp-sdk-python $SDK_VERSION)"
else
    log "creating $VENV with macp-sdk-python==$SDK_VERSION"
    rm -rf "$VENV"
    mkdir -p "$TARGET_DIR"
    pip_args=(install --quiet --disable-pip-version-check --no-input "macp-sdk-python[receipts]==$SDK_VERSION" "pytest>=7")
    if "$PYTHON" -m venv "$VENV"; then
        "$VENV/bin/python" -m pip "${pip_args[@]}"
    else
        # Debian-style python3 without ensurepip (no python3-venv package):
        # a venv without pip, filled by the system pip.
        rm -rf "$VENV"
        "$PYTHON" -m venv --without-pip "$VENV"
        "$PYTHON" -m pip --python "$VENV/bin/python" "${pip_args[@]}"
    fi
    venv_ok || { echo "interop: the venv does not have macp-sdk-python $SDK_VERSION" >&2; exit 1; }
fi

# ---- Rust side: the server binary -------------------------------------------
log "building macp-runtime"
cargo build --quiet -p macp-transport-grpc --bin macp-runtime
BIN="$TARGET_DIR/debug/macp-runtime"
[ -x "$BIN" ] || { echo "interop: $BIN was not built" >&2; exit 1; }
case " $BACKENDS " in
    *" postgres "* | *" cluster "*) cargo build --quiet -p macp-pg-test --bin macp-pg-test ;;
esac

# ---- One server per backend ---------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/macp-interop.XXXXXX")"
SERVER_PID=""
SERVER_PIDS=()
stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    # Graceful shutdown drains and checkpoints; don't wait forever.
    for _ in $(seq 1 50); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_server() {
    for pid in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"} $SERVER_PID; do
        stop_pid "$pid"
    done
    SERVER_PID=""
    SERVER_PIDS=()
}
PG_PIDS=()
PG_FDS=()
cleanup() {
    stop_server
    # macp-pg-test stops its server and deletes its directory when its
    # stdin closes.
    for fd in ${PG_FDS[@]+"${PG_FDS[@]}"}; do
        exec {fd}>&- || true
    done
    for pid in ${PG_PIDS[@]+"${PG_PIDS[@]}"}; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}

# start_postgres <name>: a throwaway PostgreSQL (macp-pg-test) of its own;
# sets DATABASE_URL.
start_postgres() {
    local name="$1" fd pid
    mkfifo "$WORK/$name-in"
    "$TARGET_DIR/debug/macp-pg-test" <"$WORK/$name-in" >"$WORK/$name-url" 2>"$WORK/$name.log" &
    pid=$!
    PG_PIDS+=("$pid")
    exec {fd}>"$WORK/$name-in"
    PG_FDS+=("$fd")
    for _ in $(seq 1 600); do
        DATABASE_URL="$(head -n1 "$WORK/$name-url" 2>/dev/null || true)"
        [ -n "$DATABASE_URL" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "interop: the throwaway PostgreSQL did not start:" >&2
    cat "$WORK/$name.log" >&2
    return 1
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_server <log> <storage flags...>: sets SERVER_PID and PORT once the
# server accepts connections (retries on a port lost to a race). "@PORT@" in
# a flag becomes the port.
start_server() {
    local logf="$1"
    shift
    for _attempt in 1 2 3; do
        PORT="$(free_port)"
        local args=("${@//@PORT@/$PORT}")
        RUST_LOG="${RUST_LOG:-info}" "$BIN" --dev --bind-addr "127.0.0.1:$PORT" "${args[@]}" >"$logf" 2>&1 &
        SERVER_PID=$!
        for _ in $(seq 1 300); do
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then
                break
            fi
            if "$VENV/bin/python" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()' "$PORT" 2>/dev/null; then
                return 0
            fi
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "interop: macp-runtime did not listen on 127.0.0.1:$PORT within 30 s" >&2
            cat "$logf" >&2
            stop_server
            return 1
        fi
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        if ! grep -q "cannot listen" "$logf"; then
            echo "interop: macp-runtime exited during startup:" >&2
            cat "$logf" >&2
            return 1
        fi
    done
    echo "interop: no free port after 3 attempts" >&2
    return 1
}

failed=0
for backend in $BACKENDS; do
    case "$backend" in
        memory) flags=(--memory-only); select=(-m "not readonly") ;;
        fs) mkdir -p "$WORK/data"; flags=(--data-dir "$WORK/data"); select=(-m "not readonly") ;;
        readonly) flags=(--memory-only --policies-dir "$ROOT/tests/interop/policies"); select=(-m readonly) ;;
        postgres)
            start_postgres pg
            flags=(--storage postgres --database-url "$DATABASE_URL"); select=(-m "not readonly") ;;
        cluster)
            start_postgres pg-cluster
            # One receipt signing key for both nodes, as a cluster shares
            # MACP_RECEIPT_KEYS_FILE (--dev alone would give each node its own).
            "$VENV/bin/python" - >"$WORK/receipt-key.pem" <<'PY'
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
print(Ed25519PrivateKey.generate().private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()).decode())
PY
            flags=(--storage postgres --database-url "$DATABASE_URL"
                --receipt-keys-file "$WORK/receipt-key.pem"
                --cluster-secret "interop cluster secret, 32 bytes" --lease-ttl-ms 1000
                --advertise-addr "127.0.0.1:@PORT@")
            select=(-m "not readonly") ;;
        *) echo "interop: unknown backend '$backend' (memory, fs, readonly, postgres, cluster)" >&2; exit 2 ;;
    esac
    logf="$WORK/server-$backend.log"
    if [ "$backend" = cluster ]; then
        targets=""
        for node in n1 n2; do
            start_server "$WORK/server-cluster-$node.log" "${flags[@]}" --node-id "$node"
            SERVER_PIDS+=("$SERVER_PID")
            SERVER_PID=""
            targets="${targets:+$targets,}127.0.0.1:$PORT"
        done
        # The second node's share of the shards moves to it within a few
        # 250 ms membership rounds; let that settle before the tests.
        sleep 3
        cat "$WORK"/server-cluster-n*.log >"$logf"
    else
        start_server "$logf" "${flags[@]}"
        targets="127.0.0.1:$PORT"
    fi
    log "backend $backend: macp-runtime on $targets; macp-sdk-python $SDK_VERSION"
    start=$(date +%s)
    if MACP_INTEROP_TARGET="$targets" PYTHONDONTWRITEBYTECODE=1 \
        "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfExX "${select[@]}" "$ROOT/tests/interop" "$@"; then
        log "backend $backend: passed in $(($(date +%s) - start)) s"
    else
        failed=1
        log "backend $backend: FAILED; server log follows"
        [ "$backend" = cluster ] && cat "$WORK"/server-cluster-n*.log >"$logf"
        tail -n 50 "$logf" >&2
    fi
    stop_server
done
exit "$failed"
