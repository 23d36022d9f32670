#!/usr/bin/env bash
# Soak: one server under the decision workload for a long time, sampling its
# memory, data directory and CPU, then checking what ended sessions still
# answer and how fast a restart is ready. Memory must follow open sessions
# and disk must follow retention (issue "bounded state"); this is how we
# show it.
#
# Usage: bench/soak.sh [SERVER_BINARY]      (default target/release/macp-runtime)
#
# Environment (all optional):
#   STORAGE=file|memory     file-backed (default) or MACP_MEMORY_ONLY=1
#   RETENTION=30s           MACP_HISTORY_RETENTION (`forever` skips the
#                           past-retention check)
#   DURATION=10m            measured load time (macp-bench --duration)
#   CONCURRENCY=16          closed-loop workers
#   SAMPLE=10               seconds between samples
#   PORT=30081              server port (below the ephemeral range)
#   SERVER_ENV=""           extra VAR=value settings for the server
#   WORKDIR=<mktemp -d>     data dir, server log, samples.csv, bench.json
#   BENCH=target/release/macp-bench
#
# Output: samples.csv (t_s, rss_kib, data_bytes, server_cpu_s) in WORKDIR,
# and a summary: RSS at minute 2 and at the end, data dir at minute 3 and at
# the end (with ratios), Sends per second, Send latency p99.9 and max,
# server CPU per message, the retention check, and (file-backed) the time a
# restart takes to be ready plus its RSS. Exit status non-zero if the load,
# the retention check or the restart failed. The pass/fail of the ratios is
# for the reader (BENCHMARKS.md records them), not a timed assertion.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVER=${1:-$ROOT/target/release/macp-runtime}
BENCH=${BENCH:-$ROOT/target/release/macp-bench}
STORAGE=${STORAGE:-file}
RETENTION=${RETENTION:-30s}
DURATION=${DURATION:-10m}
CONCURRENCY=${CONCURRENCY:-16}
SAMPLE=${SAMPLE:-10}
PORT=${PORT:-30081}
WORKDIR=${WORKDIR:-$(mktemp -d)}
ADDR=127.0.0.1:$PORT
export MACP_ADDR=$ADDR

for f in "$SERVER" "$BENCH"; do
    [ -x "$f" ] || { echo "soak: $f not found (cargo build --release --workspace)"; exit 2; }
done
mkdir -p "$WORKDIR"
DATA=$WORKDIR/data
SAMPLES=$WORKDIR/samples.csv

server_env() {
    echo "MACP_BIND_ADDR=$ADDR" "MACP_HISTORY_RETENTION=$RETENTION" "RUST_LOG=${RUST_LOG:-warn}"
    if [ "$STORAGE" = memory ]; then echo MACP_MEMORY_ONLY=1; else echo "MACP_DATA_DIR=$DATA"; fi
    echo ${SERVER_ENV:-}
}

start_server() {
    # shellcheck disable=SC2046
    env $(server_env) "$SERVER" --dev >>"$WORKDIR/server.log" 2>&1 &
    PID=$!
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_s() {
    # utime + stime (fields 14 and 15 of /proc/PID/stat, after the comm field)
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
data_bytes() { if [ -d "$DATA" ]; then du -sb "$DATA" | cut -f1; else echo 0; fi; }

cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

echo "soak: $STORAGE storage, retention $RETENTION, $DURATION at $CONCURRENCY workers; workdir $WORKDIR"
start_server
"$BENCH" probe --timeout 60s >/dev/null
cpu0=$(cpu_s "$PID")
"$BENCH" --workload decision --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup 0s >"$WORKDIR/bench.out" 2>&1 &
LOAD=$!
t0=$(date +%s)
echo "t_s,rss_kib,data_bytes,server_cpu_s" >"$SAMPLES"
while kill -0 "$LOAD" 2>/dev/null; do
    echo "$(( $(date +%s) - t0 )),$(rss_kib "$PID"),$(data_bytes),$(cpu_s "$PID")" >>"$SAMPLES"
    sleep "$SAMPLE"
done
load_rc=0
wait "$LOAD" || load_rc=$?
echo "$(( $(date +%s) - t0 )),$(rss_kib "$PID"),$(data_bytes),$(cpu_s "$PID")" >>"$SAMPLES"
cpu1=$(cpu_s "$PID")
tail -n 1 "$WORKDIR/bench.out" >"$WORKDIR/bench.json"

# The value of a column at the first sample at or after T seconds.
at() { awk -F, -v t="$1" -v c="$2" 'NR > 1 && $1 >= t { print $c; exit }' "$SAMPLES"; }
last() { tail -n 1 "$SAMPLES" | cut -d, -f"$1"; }
rss2=$(at 120 2); rss_end=$(last 2)
data3=$(at 180 3); data_end=$(last 3)
ops=$(jq -r .ops "$WORKDIR/bench.json")
echo
echo "== load"
cat "$WORKDIR/bench.out"
echo
echo "== memory and disk (samples in $SAMPLES)"
awk -v a="${rss2:-0}" -v b="$rss_end" 'BEGIN { printf "RSS       minute 2: %.1f MiB   end: %.1f MiB   end/minute 2: %.3f\n", a/1024, b/1024, (a > 0 ? b/a : 0) }'
awk -v a="${data3:-0}" -v b="$data_end" 'BEGIN { printf "data dir  minute 3: %.1f MiB   end: %.1f MiB   end/minute 3: %.3f\n", a/1048576, b/1048576, (a > 0 ? b/a : 0) }'
awk -v c="$(echo "$cpu1 - $cpu0" | bc)" -v n="$ops" 'BEGIN { printf "server CPU %.1f s for %d Sends: %.1f µs per Send\n", c, n, (n > 0 ? c * 1e6 / n : 0) }'

echo
echo "== ended sessions (macp-bench retention-check)"
check_rc=0
if [ "$RETENTION" = forever ]; then
    "$BENCH" retention-check >"$WORKDIR/retention.out" 2>&1 || check_rc=$?
else
    "$BENCH" retention-check --retention "$RETENTION" --grace 60s >"$WORKDIR/retention.out" 2>&1 || check_rc=$?
fi
cat "$WORKDIR/retention.out"
open_id=$(tail -n 1 "$WORKDIR/retention.out" | jq -r '.open_session // empty')

restart_rc=0
if [ "$STORAGE" = file ] && [ -n "$open_id" ]; then
    echo
    echo "== restart on the soaked data dir"
    kill -TERM "$PID"
    wait "$PID" || true
    echo "data dir after stop: $(( $(data_bytes) / 1048576 )) MiB"
    start_server
    "$BENCH" probe --timeout 120s --expect-session "$open_id" >"$WORKDIR/probe.out" 2>&1 || restart_rc=$?
    cat "$WORKDIR/probe.out"
    sleep 1
    echo "RSS after restart: $(( $(rss_kib "$PID") / 1024 )) MiB"
fi
[ "$load_rc" -eq 0 ] && [ "$check_rc" -eq 0 ] && [ "$restart_rc" -eq 0 ]
