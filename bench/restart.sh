#!/usr/bin/env bash
# Restart cost with a long history: does a restart follow open sessions, not
# every session ever ended? Opens OPEN sessions on a data dir that already
# holds many ended ones (retention forever), restarts the server and times
# it until those sessions answer, and compares its RSS with a restart of a
# data dir that holds the same open sessions and nothing else.
#
# Usage: bench/restart.sh [SERVER_BINARY]     (default target/release/macp-runtime)
#
# Environment (all optional):
#   HISTORY_DATA=DIR     a data dir full of ended sessions to copy (e.g. the one
#                        `STORAGE=file RETENTION=forever bench/soak.sh` leaves in
#                        its WORKDIR/data); without it, FILL of decision load is
#                        run first to make one
#   FILL=8m              decision load (16 workers) that fills a new history
#   OPEN=100000          sessions opened and left open
#   PORT=30082  WORKDIR=<mktemp -d>  BENCH=target/release/macp-bench
#
# Output: per data dir, the ended sessions it holds (from the fill's report
# when it made one), restart time until the sampled open sessions answer
# (macp-bench probe), RSS after the restart, and the RSS ratio.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVER=${1:-$ROOT/target/release/macp-runtime}
BENCH=${BENCH:-$ROOT/target/release/macp-bench}
OPEN=${OPEN:-100000}
FILL=${FILL:-8m}
PORT=${PORT:-30082}
WORKDIR=${WORKDIR:-$(mktemp -d)}
export MACP_ADDR=127.0.0.1:$PORT

for f in "$SERVER" "$BENCH"; do
    [ -x "$f" ] || { echo "restart: $f not found (cargo build --release --workspace)"; exit 2; }
done
mkdir -p "$WORKDIR"

start_server() {
    MACP_BIND_ADDR=$MACP_ADDR MACP_DATA_DIR=$1 MACP_HISTORY_RETENTION=forever RUST_LOG=${RUST_LOG:-warn} \
        "$SERVER" --dev >>"$WORKDIR/server.log" 2>&1 &
    PID=$!
}
stop_server() { kill -TERM "$PID"; wait "$PID" || true; PID=; }
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$PID/status"; }
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

# measure NAME DIR: open $OPEN sessions on DIR, restart, time it, read RSS.
measure() {
    local name=$1 dir=$2
    start_server "$dir"
    "$BENCH" probe --timeout 600s >/dev/null
    "$BENCH" --workload open-sessions --sessions "$OPEN" --concurrency 64 >"$WORKDIR/$name-open.out"
    local ids
    ids=$(tail -n 1 "$WORKDIR/$name-open.out" | jq -r '.check_sessions[] | "--expect-session=" + .')
    sleep 1
    local rss_before
    rss_before=$(rss_mib)
    stop_server
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    start_server "$dir"
    # shellcheck disable=SC2086
    "$BENCH" probe --timeout 600s $ids >"$WORKDIR/$name-probe.out"
    local ready
    ready=$(tail -n 1 "$WORKDIR/$name-probe.out" | jq -r .ready_s)
    sleep 2
    local rss_after
    rss_after=$(rss_mib)
    stop_server
    echo "$name: data dir $((bytes / 1048576)) MiB; RSS with $OPEN open before restart $rss_before MiB; restart ready in $ready s; RSS after restart $rss_after MiB"
    eval "RSS_$name=$rss_after"
}

history=$WORKDIR/history
if [ -n "${HISTORY_DATA:-}" ]; then
    echo "copying $HISTORY_DATA"
    cp -r "$HISTORY_DATA" "$history"
else
    start_server "$history"
    "$BENCH" probe --timeout 60s >/dev/null
    "$BENCH" --workload decision --concurrency 16 --duration "$FILL" --warmup 0s >"$WORKDIR/fill.out"
    echo "fill: $(tail -n 1 "$WORKDIR/fill.out" | jq -r '.sessions') sessions resolved"
    stop_server
fi
measure history "$history"
measure only_open "$WORKDIR/only-open"
# shellcheck disable=SC2154
awk -v a="$RSS_history" -v b="$RSS_only_open" 'BEGIN { printf "RSS after restart, with history / open sessions only: %.2f\n", a / b }'
