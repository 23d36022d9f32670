#!/usr/bin/env bash
# Side-by-side benchmark of two MACP runtimes on this machine, in one run:
# ours (macp-rs) and the reference runtime (multiagentcoordinationprotocol/
# macp-runtime). Both are driven by the same load generator (macp-bench) with
# the same flags; a fresh server (and a fresh data directory) for every item.
# macp-bench runs on one thread (its default --client-threads 1), so that it
# takes as little as it can of the CPU the server under test needs.
#
# Usage: bench/compare.sh [OURS_BINARY] [REFERENCE_BINARY]
#   defaults: target/release/macp-runtime
#             /work/ref/macp-runtime/target/release/macp-runtime
#
# Items (run in this order; for each item ours first, then the reference):
#   decision-mem-c1 decision-mem-c16 decision-mem-c64     decision, memory-only
#   decision-file-c1 decision-file-c16 decision-file-c64  decision, file-backed
#   signals-mem-c16                                       ambient Signals, memory-only
#   decision-pg-c1 decision-pg-c16 decision-pg-c64        decision, ours on PostgreSQL
#                   (--storage postgres; the reference has no such backend)
#   decision-cluster1-c1 … -c64   decision, ours as a one-node cluster on PostgreSQL
#                   (--node-id: a driver per shard, no forwarding)
#   decision-cluster3-c1 … -c64   decision, ours as a three-node cluster on one
#                   PostgreSQL, the load sent to node 1 (which forwards the
#                   sessions of the other nodes' shards: about two thirds)
#   takeover-cluster    two nodes, one shard: open $TAKEOVER_SESSIONS sessions,
#                   SIGKILL the node serving the shard, time until the other one
#                   serves them (lease TTL $TAKEOVER_TTL_MS ms + loading)
#   sessions-file   open $SESSIONS sessions file-backed, read RSS, stop the server
#                   (SIGTERM, SIGKILL after $STOP_TIMEOUT s), restart it on the same
#                   data dir and time it until those sessions are readable again
#   sessions-mem    open $SESSIONS sessions memory-only, read RSS
#   sessions-pg     as sessions-file, ours on PostgreSQL (restart on the same database)
#   (sessions-file-kill replaces sessions-file when RESTART_SIGNAL=KILL)
#
# Environment (all optional):
#   DURATION=10s WARMUP=2s     measured time and warm-up of the timed items
#   SESSIONS=100000            sessions opened by the sessions-* items
#   TAKEOVER_SESSIONS=10000 TAKEOVER_TTL_MS=2000   the takeover-cluster item
#   OPEN_CONCURRENCY=64        workers opening them
#   ONLY="a b"  SKIP="a b"     item-name prefixes to run / leave out
#                              (e.g. ONLY=decision-file, SKIP="sessions-mem")
#   SERVERS="ours ref"         which servers to run
#   PORT_OURS=30071 PORT_REF=30072   (below Linux's ephemeral range 32768-60999, so
#                              no client socket can be holding them; see bench::probe)
#   RESTART_TIMEOUT=600s       how long a restart may take before it counts as failed
#   STOP_TIMEOUT=60            seconds between SIGTERM and SIGKILL
#   RESTART_SIGNAL=TERM        how sessions-file stops the server before the
#                              restart: TERM (clean stop) or KILL (a crash)
#   WORKDIR=<mktemp -d>        data dirs and server logs (data dirs are deleted
#                              after each item unless KEEP_DATA=1)
#   RESULTS=$WORKDIR/results.jsonl   raw JSON lines, one per measurement
#   BENCH=target/release/macp-bench
#   PG_TEST=target/release/macp-pg-test   starts the throwaway PostgreSQL (a fresh
#                              one per PostgreSQL item; Debian's postgresql package)
#   OURS_ENV="" REF_ENV=""     extra VAR=value settings for one server's
#                              environment (e.g. REF_ENV="RUST_LOG=warn")
#
# Authentication: both servers run in their dev mode and the load generator
# sends `Authorization: Bearer <agent-id>` (--auth bearer), the only dev
# identity the reference accepts. Rate limits: both servers keep their default
# per-sender limits (60 SessionStarts and 600 messages per minute); macp-bench
# uses fresh agent ids for every session and moves Signals to a new sender
# every 500, so no sender comes near a limit. (The reference cannot switch its
# limiter off: a limit of 0 refuses everything.)
#
# Server CPU: macp-bench reads the server process's CPU time (user + system,
# /proc/PID/stat) at the start and the end of the measured window
# (--server-pid); the tables give it per successful Send (µs/op), the figure
# that carries over to a bigger machine.
#
# Output: each measurement's raw JSON line is appended to $RESULTS, and the
# markdown tables are printed at the end (and can be rebuilt from a results
# file with `bench/compare.sh --table FILE`).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

table() {
    local results=$1
    if jq -se 'any(.[]; .kind == "load")' "$results" >/dev/null; then
        load_table "$results"
    fi
    if jq -se 'any(.[]; .kind == "open")' "$results" >/dev/null; then
        sessions_table "$results"
    fi
}

load_table() {
    local results=$1
    echo
    echo "| workload | concurrency | storage | ours ops/s | ours p50 / p99 µs | reference ops/s | reference p50 / p99 µs | ours / reference | ours CPU µs/op | reference CPU µs/op | CPU ours / reference |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    jq -rs '
      def cpu($r): if $r == null or $r.server_cpu_us_per_op == null then "—" else ($r.server_cpu_us_per_op | tostring) end;
      def cell($r): if $r == null then ["—", "—"]
        else [ ($r.ops_per_s | round | tostring) + (if $r.errors > 0 then " (\($r.errors) errors)" else "" end),
               "\($r.latency_us.p50) / \($r.latency_us.p99)" ] end;
      map(select(.kind == "load")) as $l
      | reduce ($l[] | .item) as $i ([]; if any(.[]; . == $i) then . else . + [$i] end)
      | .[] as $item
      | ($l | map(select(.item == $item and .server == "ours")) | last | .result) as $o
      | ($l | map(select(.item == $item and .server == "ref")) | last | .result) as $r
      | ($l | map(select(.item == $item)) | first) as $any
      | "| \($any.result.workload) | \($any.result.concurrency) | \($any.storage) | \(cell($o)[0]) | \(cell($o)[1]) | \(cell($r)[0]) | \(cell($r)[1]) | "
        + (if $o != null and $r != null and $r.ops_per_s > 0
           then ((($o.ops_per_s / $r.ops_per_s) * 10 | round) / 10 | tostring) + "×" else "—" end)
        + " | \(cpu($o)) | \(cpu($r)) | "
        + (if ($o.server_cpu_us_per_op? // null) != null and ($r.server_cpu_us_per_op? // 0) > 0
           then ((($o.server_cpu_us_per_op / $r.server_cpu_us_per_op) * 100 | round) / 100 | tostring) + "×" else "—" end) + " |"
    ' "$results"
}

sessions_table() {
    local results=$1
    echo
    echo "| $(jq -rs 'map(select(.kind=="open")) | first | .result.requested // "N"' "$results") open sessions | storage | ours | reference | ours / reference |"
    echo "|---|---|---:|---:|---:|"
    jq -rs '
      def ratio: if . >= 10 then (round | tostring) + "×" elif . >= 0.095 then ((. * 100 | round) / 100 | tostring) + "×"
        elif . > 0 then "1/" + (1 / . | round | tostring) else "0" end;
      def get($s; $item; $k): map(select(.server == $s and .item == $item and .kind == $k)) | last;
      def row($name; $item; $k; f; $unit):
        (get("ours"; $item; $k) | if . == null then null else f end) as $o
        | (get("ref"; $item; $k) | if . == null then null else f end) as $r
        | select($o != null or $r != null)
        | "| \($name) | \($item | sub("sessions-"; "")) | \($o // "—")\(if $o != null then $unit else "" end) | \($r // "—")\(if $r != null then $unit else "" end) | "
          + (if ($o | type) == "number" and ($r | type) == "number" and $r != 0 then ($o / $r | ratio) else "—" end) + " |";
      . as $all
      | (reduce ($all[] | select(.kind == "open") | .item) as $i ([]; if any(.[]; . == $i) then . else . + [$i] end))[] as $item
      | ($all | row("sessions opened per second"; $item; "open"; .result.sessions_per_s | round; "")),
        ($all | row("RSS after opening (MiB)"; $item; "rss"; (.rss_kb / 1024 | round); "")),
        ($all | row("data directory (MiB)"; $item; "disk"; (.bytes / 1048576 | round); "")),
        ($all | row("stop until exit (s), SIG" + ($all | get("ours"; $item; "stop") // get("ref"; $item; "stop") | .signal // "TERM"); $item; "stop"; .stop_s; "")),
        ($all | row("restart until sessions readable (s)"; $item; "restart"; (if .result.ready then .result.ready_s else "FAILED" end); "")),
        ($all | row("RSS after restart (MiB)"; $item; "rss-restart"; (.rss_kb / 1024 | round); ""))
    ' "$results"
}

if [[ ${1:-} == --table ]]; then
    table "${2:?usage: bench/compare.sh --table RESULTS.jsonl}"
    exit 0
fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi

OURS=$(realpath "${1:-$ROOT/target/release/macp-runtime}")
REF=$(realpath "${2:-/work/ref/macp-runtime/target/release/macp-runtime}")
BENCH=$(realpath "${BENCH:-$ROOT/target/release/macp-bench}")
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
SESSIONS=${SESSIONS:-100000}
OPEN_CONCURRENCY=${OPEN_CONCURRENCY:-64}
TAKEOVER_SESSIONS=${TAKEOVER_SESSIONS:-10000}
TAKEOVER_TTL_MS=${TAKEOVER_TTL_MS:-2000}
ONLY=${ONLY:-}
SKIP=${SKIP:-}
SERVERS=${SERVERS:-ours ref}
PORT_OURS=${PORT_OURS:-30071}
PORT_REF=${PORT_REF:-30072}
RESTART_TIMEOUT=${RESTART_TIMEOUT:-600s}
STOP_TIMEOUT=${STOP_TIMEOUT:-60}
RESTART_SIGNAL=${RESTART_SIGNAL:-TERM}
[[ $RESTART_SIGNAL == TERM || $RESTART_SIGNAL == KILL ]] || { echo "compare.sh: RESTART_SIGNAL must be TERM or KILL" >&2; exit 2; }
WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/macp-compare.XXXXXX")}
RESULTS=${RESULTS:-$WORKDIR/results.jsonl}
KEEP_DATA=${KEEP_DATA:-0}
OURS_ENV=${OURS_ENV:-}
REF_ENV=${REF_ENV:-}

for bin in "$OURS" "$REF" "$BENCH"; do
    [[ -x $bin ]] || { echo "compare.sh: $bin is not an executable" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "compare.sh: needs jq" >&2; exit 2; }
mkdir -p "$WORKDIR/logs" "$(dirname "$RESULTS")"
# No inherited MACP_* setting may change either server (or macp-bench's --addr).
for v in $(compgen -e | grep '^MACP_' || true); do unset "$v"; done

PG_TEST=${PG_TEST:-$ROOT/target/release/macp-pg-test}
SERVER_PID=
PG_PID=
PG_URL=
# A fresh throwaway PostgreSQL (macp-pg-test prints its URL and stops when
# its stdin closes); sets PG_URL.
start_pg() {
    [[ -x $PG_TEST ]] || { echo "compare.sh: $PG_TEST is not built (cargo build --release -p macp-pg-test)" >&2; exit 2; }
    rm -f "$WORKDIR/pg-in" "$WORKDIR/pg-url"
    mkfifo "$WORKDIR/pg-in"
    "$PG_TEST" <"$WORKDIR/pg-in" >"$WORKDIR/pg-url" 2>>"$WORKDIR/logs/pg.log" &
    PG_PID=$!
    exec {PG_IN}>"$WORKDIR/pg-in"
    PG_URL=
    for _ in $(seq 600); do
        PG_URL=$(head -n1 "$WORKDIR/pg-url" 2>/dev/null || true)
        [[ -n $PG_URL ]] && return 0
        alive "$PG_PID" || break
        sleep 0.1
    done
    echo "compare.sh: the throwaway PostgreSQL did not start; $WORKDIR/logs/pg.log:" >&2
    tail -5 "$WORKDIR/logs/pg.log" >&2
    exit 1
}
stop_pg() {
    if [[ -n $PG_PID ]]; then
        exec {PG_IN}>&-
        wait "$PG_PID" 2>/dev/null || true
        PG_PID=
    fi
}
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do alive "$SERVER_PID" || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    stop_pg
    if [[ $KEEP_DATA != 1 ]]; then rm -rf "$WORKDIR"/data-*; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Running and not a zombie.
alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

now() { date +%s.%N; }
secs_since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

wanted() {
    local item=$1 p
    for p in $SKIP; do [[ $item == "$p"* ]] && return 1; done
    [[ -z $ONLY ]] && return 0
    for p in $ONLY; do [[ $item == "$p"* ]] && return 0; done
    return 1
}

port_of() { if [[ $1 == ours ]]; then echo "$PORT_OURS"; else echo "$PORT_REF"; fi; }

# The command line that starts server $1 with storage $2 (memory|file) and data dir $3.
server_cmd() {
    local server=$1 storage=$2 dir=$3 port
    port=$(port_of "$server")
    if [[ $server == ours ]]; then
        local prefix=
        [[ -n $OURS_ENV ]] && prefix="env $OURS_ENV "
        if [[ $storage == memory ]]; then
            echo "$prefix$OURS --dev --memory-only --bind-addr 127.0.0.1:$port"
        elif [[ $storage == postgres ]]; then
            echo "$prefix$OURS --dev --storage postgres --database-url $PG_URL --bind-addr 127.0.0.1:$port"
        else
            echo "$prefix$OURS --dev --data-dir $dir --bind-addr 127.0.0.1:$port"
        fi
    else
        local extra=
        [[ -n $REF_ENV ]] && extra="$REF_ENV "
        if [[ $storage == memory ]]; then
            echo "env MACP_ALLOW_INSECURE=1 MACP_MEMORY_ONLY=1 MACP_BIND_ADDR=127.0.0.1:$port $extra$REF"
        else
            echo "env MACP_ALLOW_INSECURE=1 MACP_DATA_DIR=$dir MACP_BIND_ADDR=127.0.0.1:$port $extra$REF"
        fi
    fi
}

# Starts a server in the background (cwd $WORKDIR, so a default data dir can
# never land in the repository); sets SERVER_PID and SERVER_LOG.
start_server() {
    local cmd=$1 log=$2 port=$3
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "compare.sh: port $port is already in use" >&2
        exit 1
    fi
    SERVER_LOG=$log
    # shellcheck disable=SC2086 # the command is a word list by construction
    (cd "$WORKDIR" && exec $cmd) >>"$log" 2>&1 &
    SERVER_PID=$!
}

# Waits (up to 60 s) until the fresh server answers Initialize.
wait_ready() {
    local port=$1
    if ! "$BENCH" probe --addr "127.0.0.1:$port" --timeout 60s --auth bearer >/dev/null; then
        echo "compare.sh: server did not come up; log $SERVER_LOG:" >&2
        tail -20 "$SERVER_LOG" >&2
        exit 1
    fi
}

# SIGTERM (or $1), SIGKILL after STOP_TIMEOUT s; sets STOP_S (seconds until
# the process was gone) and STOP_SIG (the last signal sent).
stop_server() {
    local pid=$SERVER_PID t0 i
    t0=$(now)
    STOP_SIG=${1:-TERM}
    kill "-$STOP_SIG" "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 20; i++)); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
        STOP_SIG=KILL
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    SERVER_PID=
    STOP_S=$(secs_since "$t0")
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Appends one result line: common fields plus the given jq object.
record() {
    local server=$1 item=$2 storage=$3 kind=$4 extra=$5
    jq -nc --arg server "$server" --arg item "$item" --arg storage "$storage" --arg kind "$kind" \
        --arg load "$(loadavg)" --arg at "$(date -u +%FT%TZ)" --argjson extra "$extra" \
        '{server: $server, item: $item, storage: $storage, kind: $kind, at: $at, loadavg: $load} + $extra' \
        >>"$RESULTS"
}

last_json() { grep '^{' | tail -1; }

# A timed macp-bench run against a fresh server.
# CPU seconds (user + system) a process has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# The command line of cluster node $1 on port $2 (ours, PostgreSQL at $PG_URL).
node_cmd() {
    local prefix=
    [[ -n $OURS_ENV ]] && prefix="env $OURS_ENV "
    echo "$prefix$OURS --dev --storage postgres --database-url $PG_URL --bind-addr 127.0.0.1:$2 --node-id $1 --advertise-addr 127.0.0.1:$2 --cluster-secret compare.sh-cluster-secret ${3:-}"
}

# A timed macp-bench run against node 1 of a fresh cluster of $3 nodes; the
# bench reports node 1's CPU, and the whole cluster's CPU over the run
# (warm-up included) is recorded beside it.
cluster_item() {
    local item=$1 conc=$2 nodes=$3 n pids=() ports=() cmd bench_cmd out before after
    start_pg
    for ((n = 1; n <= nodes; n++)); do
        ports+=($((PORT_OURS + 100 + n)))
        cmd=$(node_cmd "n$n" "${ports[-1]}")
        start_server "$cmd" "$WORKDIR/logs/ours-$item-n$n.log" "${ports[-1]}"
        pids+=("$SERVER_PID")
        wait_ready "${ports[-1]}"
    done
    # Let the shards settle on their preferred nodes (1 s rounds at the default TTL).
    sleep $((nodes > 1 ? 6 : 1))
    bench_cmd="$BENCH --addr 127.0.0.1:${ports[0]} --auth bearer --workload decision --concurrency $conc --duration $DURATION --warmup $WARMUP --server-pid ${pids[0]}"
    echo "== $item [ours]: $bench_cmd"
    before=0
    for p in "${pids[@]}"; do before=$(awk -v a="$before" -v b="$(cpu_s "$p")" 'BEGIN { print a + b }'); done
    local t0
    t0=$(now)
    out=$($bench_cmd) || { echo "$out"; echo "compare.sh: macp-bench failed" >&2; exit 1; }
    local wall
    wall=$(secs_since "$t0")
    after=0
    for p in "${pids[@]}"; do after=$(awk -v a="$after" -v b="$(cpu_s "$p")" 'BEGIN { print a + b }'); done
    echo "$out" | grep -v '^{'
    echo "   cluster CPU over the run: $(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a - b }') s in $wall s"
    for p in "${pids[@]}"; do SERVER_PID=$p; stop_server; done
    stop_pg
    record ours "$item" postgres load "$(jq -nc --arg cmd "$(node_cmd n1 "${ports[0]}")" --arg bench "$bench_cmd"         --argjson r "$(echo "$out" | last_json)" --argjson nodes "$nodes"         --argjson cpu "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.3f", a - b }')" --argjson wall "$wall"         '{server_cmd: $cmd, cmd: $bench, result: $r, nodes: $nodes, cluster_cpu_s: $cpu, run_wall_s: $wall}')"
}

# Two nodes, one shard: open TAKEOVER_SESSIONS sessions, kill the node that
# serves the shard, time until the other serves them.
takeover_item() {
    local item=takeover-cluster ports=() pids=() n cmd out checks expect=() holder survivor t0
    start_pg
    for n in 1 2; do
        ports+=($((PORT_OURS + 100 + n)))
        cmd=$(node_cmd "n$n" "${ports[-1]}" "--shards 1 --lease-ttl-ms $TAKEOVER_TTL_MS")
        start_server "$cmd" "$WORKDIR/logs/ours-$item-n$n.log" "${ports[-1]}"
        pids+=("$SERVER_PID")
        wait_ready "${ports[-1]}"
    done
    sleep 3
    holder=0
    grep -q "shard 0: loaded" "$WORKDIR/logs/ours-$item-n2.log" && ! grep -q "handing over" "$WORKDIR/logs/ours-$item-n2.log" && holder=1
    survivor=$((1 - holder))
    out=$($BENCH --addr "127.0.0.1:${ports[$holder]}" --auth bearer --workload open-sessions --sessions "$TAKEOVER_SESSIONS" --concurrency "$OPEN_CONCURRENCY") \
        || { echo "$out"; echo "compare.sh: opening sessions failed" >&2; exit 1; }
    echo "$out" | grep -v '^{'
    checks=$(echo "$out" | last_json | jq -r '.check_sessions[]')
    for s in $checks; do expect+=(--expect-session "$s"); done
    echo "== $item [ours]: SIGKILL node n$((holder + 1)) (serves the shard, $TAKEOVER_SESSIONS open sessions); probing n$((survivor + 1))"
    t0=$(now)
    kill -KILL "${pids[$holder]}"
    out=$($BENCH probe --addr "127.0.0.1:${ports[$survivor]}" --auth bearer --timeout 120s "${expect[@]}")
    local took loaded
    took=$(secs_since "$t0")
    loaded=$(grep -o "shard 0: loaded in [^:]*" "$WORKDIR/logs/ours-$item-n$((survivor + 1)).log" | tail -1 | sed 's/shard 0: loaded in //')
    echo "   $(echo "$out" | grep -v '^{'); kill to served: $took s (lease TTL $TAKEOVER_TTL_MS ms; the shard loaded in $loaded)"
    SERVER_PID=${pids[$survivor]}
    stop_server
    wait "${pids[$holder]}" 2>/dev/null || true
    stop_pg
    record ours "$item" postgres takeover "$(jq -nc --argjson n "$TAKEOVER_SESSIONS" --argjson ttl "$TAKEOVER_TTL_MS" \
        --argjson took "$took" --arg loaded "$loaded" --argjson r "$(echo "$out" | last_json)" \
        '{sessions: $n, lease_ttl_ms: $ttl, kill_to_served_s: $took, load: $loaded, result: $r}')"
}

load_item() {
    local server=$1 item=$2 storage=$3 workload=$4 conc=$5 port dir cmd bench_cmd out
    [[ $storage == postgres && $server == ref ]] && return 0
    [[ $storage == postgres ]] && start_pg
    port=$(port_of "$server")
    dir="$WORKDIR/data-$server-$item"
    rm -rf "$dir"
    cmd=$(server_cmd "$server" "$storage" "$dir")
    start_server "$cmd" "$WORKDIR/logs/$server-$item.log" "$port"
    wait_ready "$port"
    bench_cmd="$BENCH --addr 127.0.0.1:$port --auth bearer --workload $workload --concurrency $conc --duration $DURATION --warmup $WARMUP --server-pid $SERVER_PID"
    echo "== $item [$server]: $bench_cmd"
    out=$($bench_cmd) || { echo "$out"; echo "compare.sh: macp-bench failed" >&2; exit 1; }
    echo "$out" | grep -v '^{'
    stop_server
    stop_pg
    record "$server" "$item" "$storage" load "$(jq -nc --arg cmd "$cmd" --arg bench "$bench_cmd" \
        --argjson r "$(echo "$out" | last_json)" '{server_cmd: $cmd, cmd: $bench, result: $r}')"
    rm -rf "$dir"
}

# Open $SESSIONS sessions; RSS; for file storage also stop + timed restart.
sessions_item() {
    local server=$1 item=$2 storage=$3 port dir cmd open_cmd out checks rss probe_cmd expect=()
    [[ $storage == postgres && $server == ref ]] && return 0
    [[ $storage == postgres ]] && start_pg
    port=$(port_of "$server")
    dir="$WORKDIR/data-$server-$item"
    rm -rf "$dir"
    cmd=$(server_cmd "$server" "$storage" "$dir")
    open_cmd="$BENCH --addr 127.0.0.1:$port --auth bearer --workload open-sessions --sessions $SESSIONS --concurrency $OPEN_CONCURRENCY"
    echo "== $item [$server]: $open_cmd"
    start_server "$cmd" "$WORKDIR/logs/$server-$item.log" "$port"
    wait_ready "$port"
    out=$($open_cmd) || { echo "$out"; echo "compare.sh: opening sessions failed" >&2; exit 1; }
    echo "$out" | grep -v '^{'
    record "$server" "$item" "$storage" open "$(jq -nc --arg cmd "$cmd" --arg bench "$open_cmd" \
        --argjson r "$(echo "$out" | last_json)" '{server_cmd: $cmd, cmd: $bench, result: $r}')"
    sleep 2 # let allocations settle after the last Ack
    rss=$(rss_kb "$SERVER_PID")
    echo "   RSS with $SESSIONS open sessions: $((rss / 1024)) MB"
    record "$server" "$item" "$storage" rss "$(jq -nc --argjson kb "$rss" --argjson n "$SESSIONS" \
        '{after: "open", rss_kb: $kb, sessions: $n, how: "VmRSS from /proc/PID/status, 2 s after the last Ack"}')"
    if [[ $storage == memory ]]; then
        stop_server
        return
    fi
    stop_server "$RESTART_SIGNAL"
    echo "   stopped after $STOP_S s (SIG$STOP_SIG)"
    record "$server" "$item" "$storage" stop "$(jq -nc --argjson s "$STOP_S" --arg sig "$STOP_SIG" '{stop_s: $s, signal: $sig}')"
    if [[ $storage == file ]]; then
        record "$server" "$item" "$storage" disk "$(jq -nc --argjson b "$(du -sb "$dir" | cut -f1)" '{bytes: $b}')"
    fi
    checks=$(echo "$out" | last_json | jq -r '.check_sessions[]')
    for s in $checks; do expect+=(--expect-session "$s"); done
    probe_cmd="$BENCH probe --addr 127.0.0.1:$port --auth bearer --timeout $RESTART_TIMEOUT ${expect[*]}"
    echo "   restart: $probe_cmd"
    start_server "$cmd" "$WORKDIR/logs/$server-$item-restart.log" "$port"
    # The probe runs in the background so that a server which dies during
    # recovery ends the wait at once instead of after RESTART_TIMEOUT.
    $probe_cmd >"$WORKDIR/probe.out" &
    local probe_pid=$!
    while alive "$probe_pid"; do
        if ! alive "$SERVER_PID"; then
            kill "$probe_pid" 2>/dev/null || true
            echo "   the server exited during the restart; log $SERVER_LOG:" >&2
            tail -5 "$SERVER_LOG" >&2
            break
        fi
        sleep 0.2
    done
    wait "$probe_pid" 2>/dev/null || true
    out=$(cat "$WORKDIR/probe.out")
    [[ -n $out ]] || out='{"ready": false, "last_error": "the server exited"}'
    echo "   $(echo "$out" | grep -v '^{')"
    record "$server" "$item" "$storage" restart "$(jq -nc --arg cmd "$cmd" --arg probe "$probe_cmd" \
        --argjson r "$(echo "$out" | last_json)" '{server_cmd: $cmd, cmd: $probe, result: $r}')"
    if alive "$SERVER_PID"; then
        rss=$(rss_kb "$SERVER_PID")
        record "$server" "$item" "$storage" rss-restart "$(jq -nc --argjson kb "$rss" '{rss_kb: $kb}')"
    fi
    stop_server
    stop_pg
    [[ $KEEP_DATA == 1 ]] || rm -rf "$dir"
}

echo "ours:      $OURS"
echo "reference: $REF"
echo "bench:     $BENCH"
echo "results:   $RESULTS   (logs in $WORKDIR/logs)"
echo "load average at start: $(loadavg)"
echo "repository HEAD $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown); $OURS built $(date -r "$OURS" '+%F %T')"
echo "  (the binaries are measured as they are: rebuild them first if HEAD moved)"
record meta run - start "$(jq -nc --arg ours "$OURS" --arg ref "$REF" --arg d "$DURATION" --arg w "$WARMUP" \
    --argjson n "$SESSIONS" --arg head "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg oe "$OURS_ENV" --arg re "$REF_ENV" \
    --arg obuilt "$(date -u -r "$OURS" +%FT%TZ)" --arg rbuilt "$(date -u -r "$REF" +%FT%TZ)" \
    --arg osum "$(sha256sum "$OURS" | cut -c1-16)" --arg rsum "$(sha256sum "$REF" | cut -c1-16)" \
    '{ours: $ours, ref: $ref, duration: $d, warmup: $w, sessions: $n, ours_env: $oe, ref_env: $re,
      repo_head: $head, ours_built: $obuilt, ours_sha256: $osum, ref_built: $rbuilt, ref_sha256: $rsum}')"

for storage in memory file postgres; do
    short=mem
    [[ $storage == file ]] && short=file
    [[ $storage == postgres ]] && short=pg
    for c in 1 16 64; do
        item="decision-$short-c$c"
        wanted "$item" || continue
        for s in $SERVERS; do load_item "$s" "$item" "$storage" decision "$c"; done
    done
done
if wanted signals-mem-c16; then
    for s in $SERVERS; do load_item "$s" signals-mem-c16 memory signals 16; done
fi
if [[ " $SERVERS " == *" ours "* ]]; then
    for nodes in 1 3; do
        for c in 1 16 64; do
            wanted "decision-cluster$nodes-c$c" && cluster_item "decision-cluster$nodes-c$c" "$c" "$nodes"
        done
    done
    if wanted takeover-cluster; then takeover_item; fi
fi
for storage in file memory postgres; do
    item=sessions-mem
    if [[ $storage == file ]]; then
        item=sessions-file
        [[ $RESTART_SIGNAL == KILL ]] && item=sessions-file-kill
    fi
    [[ $storage == postgres ]] && item=sessions-pg
    wanted "$item" || continue
    for s in $SERVERS; do sessions_item "$s" "$item" "$storage"; done
done

echo "load average at end: $(loadavg)"
table "$RESULTS"
echo "raw results: $RESULTS"
