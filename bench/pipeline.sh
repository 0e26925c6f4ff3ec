#!/usr/bin/env bash
# End-to-end pipeline benchmark: HTTP POST /api/chat/conversations (202) -> conversation row
# committed, convoq (embedded SQLite) side by side with the Node reference
# (Express + BullMQ/Redis + Postgres, /work/shared/bench/node-reference) IN THE SAME RUN.
#
# Usage:  bench/pipeline.sh            (from anywhere; see bench/README.md)
#         MODE=open bench/pipeline.sh  (open loop: oha at fixed offered rates)
#
# Environment (all optional):
#   MODE=closed             closed: wrk's closed loop (throughput); open: oha at each rate of
#                           OPEN_RATES in turn, on the same server process and database
#   WRK_THREADS=1 WRK_CONNS=32 WRK_DURATION=15s   the wrk load (defaults = the reference's)
#   OPEN_RATES="1000 2000 5000"  POST/s offered, one oha run each (MODE=open)
#   OPEN_DURATION=15s OPEN_CONNS=64   oha -z / -c (MODE=open)
#   DRAIN_TIMEOUT=30        seconds to wait after the load for the backlog to drain (60 in MODE=open)
#   SAMPLE_INTERVAL=0.2     seconds between row-count samples
#   NODE_PORT=3100 CONVOQ_PORT=3200
#   RUN_NODE=1 RUN_CONVOQ=1 set to 0 to skip a stack
#   CONVOQ_VARIANTS="default"   space-separated convoq passes, each on a fresh SQLite file:
#                           "default" (no --concurrency flag), a number N (--concurrency
#                           database=N), "log=info" (default concurrency, --log info), or
#                           "N,log=info"; add ",pg" (or "pg" alone) to run convoq on a fresh
#                           Postgres database (store and queue) instead of SQLite, or ",redis"
#                           for the reference's topology: the queue on Redis (BullMQ, key
#                           prefix cvbench, cleared first), the store on a fresh Postgres database
#   CONVOQ_LOG=warn         log filter for passes that do not say log=...
#   PERF=0                  1: perf record -g the convoq process during the wrk window
#   SHARED=/work/shared     where bench/ of the spec lives
#   OUT_DIR                 where logs/metrics go (default: a new /tmp/convoq-pipeline.XXXX)
#   NODE_REF_DIR            where the npm-installed copy of node-reference lives
#                           (default /tmp/convoq-bench-node-ref, reused when package.json matches)
#   UNKNOWN_PCT=0           MODE=open: this percentage of the bodies name a user that does not
#                           exist (ghost-N): their jobs fail and make no row (rows < accepted
#                           by that share), to see whether they slow the others down
#   SKIP_BUILD=0            1: do not run cargo build (use the existing target/release/convoq)
#   CONVOQ_BIN              run this convoq binary instead (no build): A/B runs of two builds
#
# Definitions (printed with the results):
#   HTTP req/s      wrk's Requests/sec (every response; non-2xx are counted and shown apart)
#   accepted        POSTs the server answered 202 (server-side counter: Node /internal/stats
#                   .accepted, convoq convoq_http_requests_total{status="202"})
#   rows@wrk        rows committed between wrk start and wrk exit (counted right at wrk exit)
#   rows/s window   rows@wrk / wrk wall time
#   drain           seconds from wrk start until the row count reached `accepted`
#                   (sampled every SAMPLE_INTERVAL; ">" when DRAIN_TIMEOUT hit first)
#   e2e rows/s      accepted rows / drain  (end-to-end throughput: every accepted job is a row)
# Open loop (MODE=open), per stack and rate (bench/README.md has the long form):
#   achieved/s      2xx responses oha received / oha's wall time
#   errors          oha's errors (connection, timeout, "aborted due to deadline": requests in
#                   flight when -z ran out; the server may have accepted them)
#   p50/p99/p99.9   oha's latencyPercentiles (every response, errors excluded), corrected for
#                   coordinated omission (--latency-correction: from the request's scheduled time)
#   accepted/rows   server-side 202s and rows created during this rate (deltas); flagged when
#                   rows != accepted after the drain
#   CPU ms/conv     utime+stime (threads included) summed over the stack's processes
#                   (Node: node + redis-server + every postgres process; convoq: its process,
#                   + every postgres process for a pg variant), from oha start to the drain,
#                   ÷ accepted
#   202->row        lag between the accepted-count and row-count curves sampled every
#                   SAMPLE_INTERVAL (FIFO assumed); for convoq also job wait p99 + job
#                   duration p99 of create_conversation from /metrics (an upper-bound estimate)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-/work/shared}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-32}
WRK_DURATION=${WRK_DURATION:-15s}
MODE=${MODE:-closed}
OPEN_RATES=${OPEN_RATES:-1000 2000 5000}
OPEN_DURATION=${OPEN_DURATION:-15s}
OPEN_CONNS=${OPEN_CONNS:-64}
case $MODE in
  closed) DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30} ;;
  open) DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60} ;;
  *) echo "MODE must be closed or open, not '$MODE'" >&2; exit 2 ;;
esac
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-0.2}
NODE_PORT=${NODE_PORT:-3100}
CONVOQ_PORT=${CONVOQ_PORT:-3200}
RUN_NODE=${RUN_NODE:-1}
RUN_CONVOQ=${RUN_CONVOQ:-1}
CONVOQ_VARIANTS=${CONVOQ_VARIANTS:-default}
CONVOQ_LOG=${CONVOQ_LOG:-warn}
PERF=${PERF:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
NODE_REF_DIR=${NODE_REF_DIR:-/tmp/convoq-bench-node-ref}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/convoq-pipeline.XXXX)}
mkdir -p "$OUT_DIR"
PG=(psql -X -q -h 127.0.0.1 -p 5432 -U "${PGUSER:-root}")
LUA="$SHARED/bench/node-reference/post.lua"
MODES=helpful,concise,creative,professional,playful,friendly

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }

# ---------------------------------------------------------------- cleanup
PIDS=()
TMPDIRS=()   # per-pass SQLite directories, removed on exit
cleanup() {
  local p
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    kill -TERM "$p" 2>/dev/null
  done
  for _ in $(seq 50); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for d in "${TMPDIRS[@]}"; do rm -rf "$d"; done
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_pid() { # pid: TERM, wait up to 15 s, then KILL
  local p=$1
  kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  log "pid $p did not stop in 15 s: KILL"
  kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null
  return 0
}

wait_http() { # url timeout_s
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    curl -fsS -m 1 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

cpu_ticks() { # pid -> utime+stime (clock ticks) of the process (threads included)
  awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
sys_busy() { # -> "busy total" jiffies over all CPUs
  awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat
}
cpu_snapshot() { # pid... -> "pid comm ticks" (utime+stime, threads included) of each live one
  local p line comm f
  for p in "$@"; do
    read -r line 2>/dev/null <"/proc/$p/stat" || continue
    comm=${line#*(}; comm=${comm%%)*}
    read -ra f <<<"${line##*) }"          # f[0] is field 3 (state): utime = f[11], stime = f[12]
    printf '%s %s %s\n' "$p" "$comm" $(( f[11] + f[12] ))
  done
}
dur_s() { # 15s / 2m / 15 -> seconds
  case $1 in *m) echo $(( ${1%m} * 60 )) ;; *s) echo "${1%s}" ;; *) echo "$1" ;; esac
}
us() { # epoch "s.fraction" -> microseconds
  local f=${1#*.}000000
  echo $(( ${1%.*} * 1000000 + 10#${f:0:6} ))
}

# ---------------------------------------------------------------- prerequisites
ensure_tools() {
  if [ "$MODE" = open ]; then
    [ -x "$HOME/.cargo/bin/oha" ] && PATH="$PATH:$HOME/.cargo/bin"
    if ! command -v oha >/dev/null; then
      log "installing oha (cargo install oha --locked)"
      timeout 1800 cargo install oha --locked >"$OUT_DIR/oha-install.log" 2>&1 \
        || die "cannot install oha (see $OUT_DIR/oha-install.log)"
      PATH="$PATH:$HOME/.cargo/bin"
    fi
  fi
  if [ "$MODE" = closed ] && ! command -v wrk >/dev/null; then
    log "installing wrk"
    apt-get install -y wrk >"$OUT_DIR/apt.log" 2>&1 \
      || { apt-get update >>"$OUT_DIR/apt.log" 2>&1 && apt-get install -y wrk >>"$OUT_DIR/apt.log" 2>&1; } \
      || die "cannot install wrk (see $OUT_DIR/apt.log)"
  fi
  for t in curl python3; do command -v $t >/dev/null || die "$t is required"; done
  if [ "$RUN_NODE" = 1 ]; then
    for t in node npm psql redis-cli; do command -v $t >/dev/null || die "$t is required for the Node reference"; done
  fi
  if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then
    apt-get install -y linux-perf >>"$OUT_DIR/apt.log" 2>&1 || { log "perf unavailable: PERF=0"; PERF=0; }
  fi
}

prepare_node() {
  local src="$SHARED/bench/node-reference"
  if [ -d "$NODE_REF_DIR/node_modules/bullmq" ] && cmp -s "$src/package.json" "$NODE_REF_DIR/package.json"; then
    cp -f "$src"/*.js "$src"/*.lua "$NODE_REF_DIR/"
  else
    log "npm install of a copy of node-reference in $NODE_REF_DIR"
    rm -rf "$NODE_REF_DIR"; mkdir -p "$NODE_REF_DIR"
    cp -r "$src"/. "$NODE_REF_DIR/"; chmod -R u+w "$NODE_REF_DIR"
    (cd "$NODE_REF_DIR" && timeout 300 npm install --no-package-lock --no-audit --no-fund) \
      >"$OUT_DIR/npm.log" 2>&1 || die "npm install failed (see $OUT_DIR/npm.log)"
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || die "Redis is not answering on 127.0.0.1:6379"
  "${PG[@]}" -d postgres -tAc 'select 1' >/dev/null || die "psql -h 127.0.0.1 -U ${PGUSER:-root} -d postgres fails"
  if [ -z "$("${PG[@]}" -d postgres -tAc "select 1 from pg_database where datname='bench'")" ]; then
    log "creating Postgres database bench"
    "${PG[@]}" -d postgres -c 'CREATE DATABASE bench' >/dev/null || die "CREATE DATABASE bench failed"
  fi
  "${PG[@]}" -d bench -f "$SHARED/bench/sql/schema.sql" >/dev/null 2>&1 || die "schema.sql failed"
}

build_convoq() {
  if [ -n "${CONVOQ_BIN:-}" ]; then   # a given binary (A/B runs of two builds): no build
    [ -x "$CONVOQ_BIN" ] || die "$CONVOQ_BIN missing"
    return 0
  fi
  if [ "$SKIP_BUILD" != 1 ]; then
    log "cargo build --release -p convoq"
    (cd "$ROOT" && cargo build --release -p convoq) >"$OUT_DIR/build.log" 2>&1 \
      || die "cargo build failed (see $OUT_DIR/build.log)"
  fi
  CONVOQ_BIN="$ROOT/target/release/convoq"
  [ -x "$CONVOQ_BIN" ] || die "$CONVOQ_BIN missing"
}

# ---------------------------------------------------------------- measurement core
# sampler COUNT_FN [ACCEPTED_FN]: until killed, writes "epoch rows" lines, or with ACCEPTED_FN
# "r0 r1 rows a0 a1 accepted [pre start total]" (each read between epochs r0..r1 / a0..a1).
# When COUNT_FN_ts exists (it prints "rows epoch", the epoch of the database's own snapshot),
# r0 = r1 = that epoch; when ACCEPTED_FN_ts exists (it prints "accepted pre start total", curl's
# time_pretransfer/starttransfer/total), the report places the read inside the curl call.
sampler() {
  local count_fn=$1 acc_fn=${2:-} c a r0 r1 a0 ts="" ats=""
  declare -F "${count_fn}_ts" >/dev/null && ts=${count_fn}_ts
  declare -F "${acc_fn}_ts" >/dev/null && ats=${acc_fn}_ts
  while :; do
    if [ -z "$acc_fn" ]; then
      c=$("$count_fn" 2>/dev/null | tr -dc 0-9)
      printf '%s %s\n' "$(now)" "${c:-NA}"
    else
      if [ -n "$ts" ]; then
        read -r c r0 < <("$ts" 2>/dev/null); r1=$r0
        [[ $c =~ ^[0-9]+$ && $r0 =~ ^[0-9]+\.?[0-9]*$ ]] || { c=NA r0=$EPOCHREALTIME r1=$r0; }
      else
        r0=$EPOCHREALTIME; c=$("$count_fn" 2>/dev/null | tr -dc 0-9); r1=$EPOCHREALTIME
      fi
      a0=$EPOCHREALTIME
      if [ -n "$ats" ]; then a=$("$ats" 2>/dev/null); else a=$("$acc_fn" 2>/dev/null | tr -dc 0-9); fi
      printf '%s %s %s %s %s %s\n' "$r0" "$r1" "${c:-NA}" "$a0" "$EPOCHREALTIME" "${a:-NA}"
    fi
    sleep "$SAMPLE_INTERVAL"
  done
}

# wait_drain COUNT_FN ACCEPTED_FN T_LOAD_END: polls every SAMPLE_INTERVAL until rows >= accepted,
# at most DRAIN_TIMEOUT s after T_LOAD_END. Sets DRAIN_ROWS, DRAIN_ACCEPTED and DRAIN_T (epoch;
# empty when the timeout came first).
wait_drain() {
  local count_fn=$1 accepted_fn=$2 deadline
  deadline=$(( $(us "$3") + DRAIN_TIMEOUT * 1000000 ))
  DRAIN_T="" DRAIN_ACCEPTED=$($accepted_fn) DRAIN_ROWS=""
  while :; do
    DRAIN_ROWS=$($count_fn)
    if [ -n "$DRAIN_ROWS" ] && [ -n "$DRAIN_ACCEPTED" ] && [ "$DRAIN_ROWS" -ge "$DRAIN_ACCEPTED" ]; then
      # requests in flight when the load generator exited may have been accepted since: re-read
      DRAIN_ACCEPTED=$($accepted_fn)
      if [ "$DRAIN_ROWS" -ge "$DRAIN_ACCEPTED" ]; then DRAIN_T=$(now); break; fi
    fi
    [ "$(us "$EPOCHREALTIME")" -lt "$deadline" ] || break
    sleep "$SAMPLE_INTERVAL"
  done
  [ -z "$DRAIN_T" ] && DRAIN_ROWS=$($count_fn)
  return 0
}

# wait_idle BACKLOG_FN TIMEOUT_S: until the stack's queues hold no waiting/active/delayed job
# (so that the next load does not start on work left by this one); echoes the seconds waited
wait_idle() {
  local t0=$EPOCHREALTIME deadline b
  deadline=$(( $(us "$t0") + $2 * 1000000 ))
  while :; do
    b=$($1 2>/dev/null)
    [ "${b:-1}" = 0 ] && break
    [ "$(us "$EPOCHREALTIME")" -lt "$deadline" ] || { log "queues not idle after $2 s (backlog ${b:-?})"; break; }
    sleep "$SAMPLE_INTERVAL"
  done
  python3 -c "print(round($EPOCHREALTIME - $t0, 2))"
}

PERF_PID=""
perf_start() { # name pid dir: perf record -g of a convoq process while the load runs (PERF=1)
  PERF_PID=""
  [ "$PERF" = 1 ] && [ "$1" != node ] || return 0
  perf record -F 499 -g -p "$2" -o "$3/perf.data" >"$3/perf.log" 2>&1 & PERF_PID=$!; PIDS+=("$PERF_PID")
}
perf_stop() { [ -n "$PERF_PID" ] && { kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null; }; PERF_PID=""; }

# Python helpers shared by the reports: Prometheus histograms of a /metrics text
PYLIB='
import re, collections
def parse_hist(path, fams):
    """(family, labels without le) -> {"b": {le: cumulative count}, "sum": s, "count": n}"""
    h = collections.defaultdict(lambda: {"b": {}, "sum": 0.0, "count": 0.0})
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return h
    for line in lines:
        m = re.match(r"^(\w+?)(_bucket|_sum|_count)\{?(.*?)\}? ([\d.eE+-]+|\+Inf|NaN)$", line.strip())
        if not m or m.group(1) not in fams: continue
        fam, kind, labels, v = m.groups()
        le = re.search(r"le=\"([^\"]+)\"", labels)
        key = (fam, re.sub(r",?le=\"[^\"]+\"", "", labels))
        if kind == "_bucket": h[key]["b"][float(le.group(1))] = float(v)
        elif kind == "_sum": h[key]["sum"] = float(v)
        else: h[key]["count"] = float(v)
    return h
def hist_delta(after, before):
    return {"b": {le: c - before["b"].get(le, 0.0) for le, c in after["b"].items()},
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}
def hist_q(b, n, p):
    """quantile p of a cumulative histogram (linear within a bucket)"""
    t = p * n; prev_le, prev_c = 0.0, 0.0
    for le, c in sorted(b.items()):
        if c >= t:
            if le == float("inf"): return prev_le
            return prev_le + (le - prev_le) * ((t - prev_c) / max(1e-9, c - prev_c))
        prev_le, prev_c = le, c
    return float("nan")
'
pyrun() { # args...: python3 with PYLIB, the program on stdin
  python3 -c "$PYLIB
import sys
exec(sys.stdin.read())" "$@"
}

# measure NAME URL PID COUNT_FN ACCEPTED_FN
# Runs wrk, samples row counts, waits for the drain, writes $OUT_DIR/NAME.result (key=value).
measure() {
  local name=$1 url=$2 pid=$3 count_fn=$4 accepted_fn=$5
  local dir="$OUT_DIR/$name"; mkdir -p "$dir"
  local samples="$dir/samples.txt"
  local c0; c0=$($count_fn)
  [ "$c0" = 0 ] || log "$name: $c0 rows before the run (expected 0)"
  uptime >"$dir/uptime.txt"

  local cpu0 sys0
  cpu0=$(cpu_ticks "$pid"); sys0=$(sys_busy)
  local t0; t0=$(now)
  sampler "$count_fn" >"$samples" & local spid=$!; PIDS+=("$spid")
  perf_start "$name" "$pid" "$dir"
  # mid-run snapshot of the queue (convoq) / stats (node) — one request, negligible load
  ( sleep "$(( $(dur_s "$WRK_DURATION") / 2 ))"; curl -s -m 2 "$url$([ "$name" = node ] && echo /internal/stats || echo /api/queues)" >"$dir/queues-mid.json" ) &
  local midpid=$!
  timeout $(( $(dur_s "$WRK_DURATION") + 30 )) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$LUA" "$url" >"$dir/wrk.txt" 2>&1
  local t1; t1=$(now)
  local rows_wrk; rows_wrk=$($count_fn)
  local cpu1 sys1; cpu1=$(cpu_ticks "$pid"); sys1=$(sys_busy)
  perf_stop
  wait "$midpid" 2>/dev/null
  [ "$name" != node ] && curl -s -m 2 "$url/api/queues" >"$dir/queues-end.json"
  wait_drain "$count_fn" "$accepted_fn" "$t1"
  local accepted=$DRAIN_ACCEPTED last=$DRAIN_ROWS tdrain=$DRAIN_T
  local t2; t2=$(now)
  kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  [ "$name" = node ] && curl -s -m 2 "$url/internal/stats" >"$dir/stats-end.json"
  [ "$name" != node ] && curl -s -m 5 "$url/metrics" >"$dir/metrics.txt"
  local hz; hz=$(getconf CLK_TCK)
  python3 - "$dir" "$name" "$t0" "$t1" "$t2" "${tdrain:-}" "$rows_wrk" "$last" "${accepted:-0}" \
            "$cpu0" "$cpu1" "$hz" $sys0 $sys1 <<'PY' >"$OUT_DIR/$name.result"
import re, sys
d, name, t0, t1, t2, td, rows_wrk, rows_end, acc, cpu0, cpu1, hz, sb0, st0, sb1, st1 = sys.argv[1:]
t0, t1, t2 = float(t0), float(t1), float(t2)
w = open(f"{d}/wrk.txt").read()
def g(p, s=w, f=float, default=None):
    m = re.search(p, s, re.M)
    return f(m.group(1)) if m else default
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
def lat(q):
    m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", w, re.M)
    return ms(*m.groups()) if m else float("nan")
rps = g(r"^Requests/sec:\s+([\d.]+)")
reqs = g(r"^\s+(\d+) requests in", f=int, default=0)
non2xx = g(r"Non-2xx or 3xx responses: (\d+)", f=int, default=0)
sockerr = re.search(r"Socket errors:.*", w)
acc = int(acc or 0); rows_wrk = int(rows_wrk or 0); rows_end = int(rows_end or 0)
window = t1 - t0
drained = bool(td)
drain = (float(td) - t0) if drained else (t2 - t0)
cpu = (int(cpu1) - int(cpu0)) / int(hz) / window
sys_util = (int(sb1) - int(sb0)) / max(1, (int(st1) - int(st0)))
out = dict(
    name=name, rps=rps, requests=reqs, non2xx=non2xx,
    sockerr=(sockerr.group(0) if sockerr else ""),
    p50=lat(50), p90=lat(90), p99=lat(99), accepted=acc,
    rows_wrk=rows_wrk, window=round(window, 2), rows_wrk_per_s=round(rows_wrk / window, 1),
    rows_end=rows_end, drained=int(drained), drain=round(drain, 2),
    e2e_per_s=round(rows_end / drain, 1), server_cpu=round(cpu, 2), machine_cpu=round(sys_util, 2),
)
for k, v in out.items():
    print(f"{k}={v}")
PY
  log "$name: $(tr '\n' ' ' <"$OUT_DIR/$name.result")"
}

# measure_open NAME URL PID COUNT_FN ACCEPTED_FN CPU_PIDS_FN BACKLOG_FN
# For each rate of OPEN_RATES, on the same server and database: oha at that rate, row and
# accepted counts sampled, drain, the queues idle before the next rate. Writes
# $OUT_DIR/NAME/open-RATE/result (key=value). CPU_PIDS_FN PID lists the stack's processes.
measure_open() {
  local name=$1 url=$2 pid=$3 count_fn=$4 accepted_fn=$5 cpu_fn=$6 backlog_fn=$7
  local secs hz rate; secs=$(dur_s "$OPEN_DURATION"); hz=$(getconf CLK_TCK)
  for rate in $OPEN_RATES; do
    local dir="$OUT_DIR/$name/open-$rate"; mkdir -p "$dir"
    local rows0 acc0; rows0=$($count_fn); acc0=$($accepted_fn)
    uptime >"$dir/uptime.txt"
    [ "$name" != node ] && curl -s -m 5 "$url/metrics" >"$dir/metrics-before.txt"
    # shellcheck disable=SC2046
    cpu_snapshot $($cpu_fn "$pid") >"$dir/cpu-before.txt"
    local sys0; sys0=$(sys_busy)
    local t0; t0=$(now)
    sampler "$count_fn" "$accepted_fn" >"$dir/samples.txt" & local spid=$!; PIDS+=("$spid")
    perf_start "$name" "$pid" "$dir"
    log "$name: oha -q $rate -z $OPEN_DURATION -c $OPEN_CONNS"
    timeout $(( secs + 30 )) oha -z "$OPEN_DURATION" -q "$rate" -c "$OPEN_CONNS" --latency-correction --no-tui \
      --output-format json -m POST -H 'Content-Type: application/json' -Z "$BODIES" \
      "$url/api/chat/conversations" >"$dir/oha.json" 2>"$dir/oha.err"
    local t1; t1=$(now)
    local rows_load; rows_load=$($count_fn)
    perf_stop
    wait_drain "$count_fn" "$accepted_fn" "$t1"
    # shellcheck disable=SC2046
    cpu_snapshot $($cpu_fn "$pid") >"$dir/cpu-after.txt"
    local sys1; sys1=$(sys_busy)
    local t2; t2=$(now)
    kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
    local idle; idle=$(wait_idle "$backlog_fn" 15)
    [ "$name" != node ] && curl -s -m 5 "$url/metrics" >"$dir/metrics.txt"
    [ "$name" = node ] && curl -s -m 2 "$url/internal/stats" >"$dir/stats-end.json"
    pyrun "$dir" "$name" "$rate" "$t0" "$t1" "$t2" "$DRAIN_T" "$rows0" "$acc0" "$rows_load" \
          "${DRAIN_ROWS:-0}" "${DRAIN_ACCEPTED:-0}" "$hz" "$idle" $sys0 $sys1 <<'PY' >"$dir/result"
import json, math
(d, name, rate, t0, t1, t2, td, rows0, acc0, rows_load, rows_end, acc_end, hz, idle,
 sb0, st0, sb1, st1) = sys.argv[1:]
t0, t1, t2 = float(t0), float(t1), float(t2)
rows0, acc0, rows_load = int(rows0 or 0), int(acc0 or 0), int(rows_load or 0)
rows_end, acc_end, hz = int(rows_end or 0), int(acc_end or 0), int(hz)
nan = float("nan")
try:
    o = json.load(open(f"{d}/oha.json"))
except (OSError, ValueError):
    o = {}
codes = {int(k): v for k, v in (o.get("statusCodeDistribution") or {}).items()}
errs = o.get("errorDistribution") or {}
n2xx = sum(v for k, v in codes.items() if 200 <= k < 300)
non2xx = sum(v for k, v in codes.items() if not 200 <= k < 300)
aborted = sum(v for k, v in errs.items() if "deadline" in k)
errors = sum(errs.values())
wall = (o.get("summary") or {}).get("total") or (t1 - t0)
pct = o.get("latencyPercentiles") or {}
ms = lambda k: (pct.get(k) * 1000) if pct.get(k) is not None else nan

# CPU of every process of the stack: per pid, after - before (a pid born in the window counts
# whole; one that died in it is lost: short-lived psql backends of the sampler, mostly)
def snap(f):
    r = {}
    for line in open(f):
        p, comm, t = line.split()
        r[p] = (comm, int(t))
    return r
b, a = snap(f"{d}/cpu-before.txt"), snap(f"{d}/cpu-after.txt")
by = {}
for p, (comm, t) in a.items():
    by[comm] = by.get(comm, 0) + t - (b[p][1] if p in b and b[p][0] == comm else 0)
accepted, rows = acc_end - acc0, rows_end - rows0
cpu_ms = 1000 * sum(by.values()) / hz
per = lambda v: v / accepted if accepted else nan
drained = bool(td)
drain = (float(td) if drained else t2) - t0

# 202 -> row lag from the sampled curves: time at which the accepted count reached k vs the row
# count reached k (FIFO assumed). A row count is stamped with the database's statement time when
# the COUNT_FN_ts variant exists (else the middle of its read), a 202 count inside its curl call.
ts_r, rs, ts_a, acs = [t0], [0], [t0], [0]
for line in open(f"{d}/samples.txt"):
    x = line.split()
    if len(x) not in (6, 9) or "NA" in x: continue
    ts_r.append((float(x[0]) + float(x[1])) / 2); rs.append(int(x[2]) - rows0)
    if len(x) == 9:  # the server answered between curl's pretransfer and starttransfer
        pre, st, tot = map(float, x[6:])
        ts_a.append(float(x[4]) - tot + (pre + st) / 2)
    else:
        ts_a.append((float(x[3]) + float(x[4])) / 2)
    acs.append(int(x[5]) - acc0)
def inv(ts, vs, k):  # first time the (monotone, linearly interpolated) curve reaches k
    for i in range(1, len(vs)):
        if vs[i] >= k:
            if vs[i] == vs[i - 1]: return ts[i]
            return ts[i - 1] + (ts[i] - ts[i - 1]) * (k - vs[i - 1]) / (vs[i] - vs[i - 1])
    return None
lags = []
if accepted > 0 and len(rs) > 2:
    step = max(1, accepted // 4000)
    for k in range(1, accepted + 1, step):
        ta, tr = inv(ts_a, acs, k), inv(ts_r, rs, k)
        if ta is not None and tr is not None: lags.append(max(0.0, tr - ta))
lags.sort()
lq = lambda q: 1000 * lags[min(len(lags) - 1, int(q * len(lags)))] if lags else nan

# convoq: job wait p99 + job duration p99 of create_conversation during this rate (deltas)
wait99 = dur99 = nan
if name != "node":
    fams = ("convoq_job_wait_seconds", "convoq_job_duration_seconds")
    hb, ha = parse_hist(f"{d}/metrics-before.txt", fams), parse_hist(f"{d}/metrics.txt", fams)
    for (fam, labels), x in ha.items():
        if 'name="create_conversation"' not in labels: continue
        dx = hist_delta(x, hb[(fam, labels)]) if (fam, labels) in hb else x
        if dx["count"] <= 0: continue
        v = 1000 * hist_q(dx["b"], dx["count"], 0.99)
        if fam == "convoq_job_wait_seconds": wait99 = v
        else: dur99 = v
out = dict(
    name=name, rate=rate, wall=round(wall, 2), achieved=round(n2xx / wall, 1) if wall else nan,
    n2xx=n2xx, non2xx=non2xx, errors=errors, aborted=aborted,
    errkinds=";".join(f"{k}:{v}" for k, v in errs.items()),
    p50=ms("p50"), p99=ms("p99"), p999=ms("p99.9"),
    accepted=accepted, rows_load=rows_load - rows0, rows=rows, rows_diff=rows - accepted,
    drained=int(drained), drain=round(drain, 2), tail=round(drain - (t1 - t0), 2), idle_wait=idle,
    cpu_ms=round(cpu_ms, 1), cpu_per_conv=per(cpu_ms),
    cpu_by=";".join(f"{c}:{1000 * v / hz / accepted if accepted else nan:.3f}" for c, v in sorted(by.items())),
    machine_cpu=round((int(sb1) - int(sb0)) / max(1, int(st1) - int(st0)), 2),
    lag_p50=lq(0.50), lag_p99=lq(0.99), lag_max=(1000 * lags[-1] if lags else nan),
    wait_p99=wait99, dur_p99=dur99, e2e_ub_p99=wait99 + dur99,
)
for k, v in out.items():
    print(f"{k}={round(v, 3) if isinstance(v, float) else v}")
PY
    log "$name @ $rate/s: $(tr '\n' ' ' <"$dir/result")"
    if [ "$(sed -n 's/^rows_diff=//p' "$dir/result")" != 0 ]; then
      log "WARNING $name @ $rate/s: rows created != accepted ($(grep -E '^(accepted|rows|drained|aborted)=' "$dir/result" | tr '\n' ' '))"
    fi
  done
  [ "$name" != node ] && cp -f "$dir/metrics.txt" "$OUT_DIR/$name/metrics.txt"
  return 0
}

# run_load NAME URL PID COUNT_FN ACCEPTED_FN CPU_PIDS_FN BACKLOG_FN: the load of MODE
run_load() {
  if [ "$MODE" = open ]; then measure_open "$@"; else measure "$1" "$2" "$3" "$4" "$5"; fi
}

# ---------------------------------------------------------------- Node reference
pg_count() { "${PG[@]}" -d bench -tAc 'SELECT count(*) FROM conversations'; }
# "rows epoch": the count and the start of its statement (= its snapshot), for the lag curves
pg_count_ts() { "${PG[@]}" -d "${1:-bench}" -tAF' ' -c 'SELECT count(*), extract(epoch from statement_timestamp()) FROM conversations'; }
CURL_TIMING='\n@timing %{time_pretransfer} %{time_starttransfer} %{time_total}\n'
node_accepted_ts() { # "accepted pre start total" (curl's timings, for the lag curves)
  curl -s -m 2 -w "$CURL_TIMING" "http://127.0.0.1:$NODE_PORT/internal/stats" \
    | awk 'match($0, /"accepted":[0-9]+/) {s = substr($0, RSTART + 11, RLENGTH - 11)}
           /^@timing / {t = $2 " " $3 " " $4; ok = $3 > 0} END {if (ok) printf "%d %s\n", s, t}'
}
node_accepted() { node_accepted_ts | cut -d' ' -f1; }
node_backlog() { # waiting + active + delayed jobs of the queue `database`
  curl -s -m 2 "http://127.0.0.1:$NODE_PORT/internal/stats" \
    | python3 -c 'import json,sys; q=json.load(sys.stdin)["queue"]; print(sum(q.get(k, 0) for k in ("waiting", "active", "delayed", "prioritized")))'
}
node_cpu_pids() { echo "$1"; pgrep -x redis-server; pgrep -x postgres; }   # node + Redis + Postgres

run_node() {
  log "Node reference on 127.0.0.1:$NODE_PORT"
  # a clean queue: drop BullMQ's keys of the queue `database` left by earlier runs
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'bull:database:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
  "${PG[@]}" -d bench -c 'TRUNCATE conversations' >/dev/null
  (cd "$NODE_REF_DIR" && PORT=$NODE_PORT WORKER_CONCURRENCY=10 exec node server.js) >"$OUT_DIR/node.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$NODE_PORT/healthz" 20 || die "Node reference did not start (see $OUT_DIR/node.log)"
  run_load node "http://127.0.0.1:$NODE_PORT" "$pid" pg_count node_accepted node_cpu_pids node_backlog
  stop_pid "$pid"
}

# ---------------------------------------------------------------- convoq
CONVOQ_DB=""
sqlite_count() {
  python3 -c 'import sqlite3,sys; c=sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True, timeout=5); print(c.execute("SELECT COUNT(*) FROM conversations").fetchone()[0])' "$CONVOQ_DB"
}
if command -v sqlite3 >/dev/null; then
  sqlite_count() { sqlite3 -readonly -cmd '.timeout 5000' "$CONVOQ_DB" 'SELECT COUNT(*) FROM conversations'; }
  sqlite_count_ts() { # "rows epoch" ('now' in ms, fixed for the statement)
    sqlite3 -readonly -cmd '.timeout 5000' -separator ' ' "$CONVOQ_DB" \
      "SELECT COUNT(*), printf('%.3f', (julianday('now') - 2440587.5) * 86400.0) FROM conversations"
  }
fi
convoq_pg_count() { "${PG[@]}" -d convoq_bench -tAc 'SELECT count(*) FROM conversations'; }
convoq_pg_count_ts() { pg_count_ts convoq_bench; }
convoq_accepted_ts() { # "accepted pre start total" (curl's timings, for the lag curves)
  curl -s -m 3 -w "$CURL_TIMING" "http://127.0.0.1:$CONVOQ_PORT/metrics" \
    | awk '/^convoq_http_requests_total\{/ && /route="\/api\/chat\/conversations"/ && /status="202"/ && /method="POST"/ {s+=$NF}
           /^@timing / {t = $2 " " $3 " " $4; ok = $3 > 0} END {if (ok) printf "%d %s\n", s, t}'
}
convoq_accepted() { convoq_accepted_ts | cut -d' ' -f1; }

convoq_backlog() { # waiting + active + delayed jobs over every queue
  curl -s -m 2 "http://127.0.0.1:$CONVOQ_PORT/api/queues" \
    | python3 -c 'import json,sys; print(sum(q["counts"].get(k, 0) for q in json.load(sys.stdin)["queues"] for k in ("waiting", "active", "delayed")))'
}
convoq_cpu_pids() { echo "$1"; }                          # the one process, threads included
convoq_pg_cpu_pids() { echo "$1"; pgrep -x postgres; }    # + the Postgres server it runs on
convoq_redis_cpu_pids() { echo "$1"; pgrep -x postgres; pgrep -x redis-server; } # + Postgres and Redis

create_users() { # 1000 users, user-0..user-999, over one keep-alive connection
  python3 - "$CONVOQ_PORT" <<'PY'
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
bad = 0
for n in range(1000):
    body = json.dumps({"discordId": str(n + 1), "username": f"user-{n}"})
    c.request("PUT", f"/api/users/user-{n}", body, {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    if r.status not in (200, 201):
        bad += 1
        if bad < 3: print(f"PUT user-{n}: {r.status}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

run_convoq() { # variant
  local variant=$1 conc="" level="$CONVOQ_LOG" part backend=sqlite
  for part in ${variant//,/ }; do
    case $part in
      default) ;;
      log=*) level=${part#log=} ;;
      [0-9]*) conc=$part ;;
      pg) backend=pg ;;
      redis) backend=redis ;;
      *) die "unknown CONVOQ_VARIANTS entry: $part" ;;
    esac
  done
  local tag="convoq-${conc:-dflt}-$level"
  local dbdir; dbdir=$(mktemp -d /tmp/convoq-pipeline-db.XXXX); TMPDIRS+=("$dbdir")
  CONVOQ_DB="$dbdir/convoq.db"
  local url="sqlite://$CONVOQ_DB" count=sqlite_count cpu_pids=convoq_cpu_pids
  if [ "$backend" != sqlite ]; then
    tag="$tag-$backend"
    "${PG[@]}" -d postgres -c 'DROP DATABASE IF EXISTS convoq_bench' -c 'CREATE DATABASE convoq_bench' >/dev/null \
      || die "cannot create the Postgres database convoq_bench"
    url="postgres://${PGUSER:-root}@127.0.0.1:5432/convoq_bench" count=convoq_pg_count cpu_pids=convoq_pg_cpu_pids
  fi
  local args=(--listen "127.0.0.1:$CONVOQ_PORT" --database-url "$url"
              --personality-modes "$MODES" --log "$level")
  if [ "$backend" = redis ]; then
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'cvbench:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
    args+=(--queue-url "redis://127.0.0.1:6379" --queue-prefix cvbench)
    cpu_pids=convoq_redis_cpu_pids
  fi
  [ -n "$conc" ] && args+=(--concurrency "database=$conc")
  log "$tag: convoq ${args[*]}"
  (cd "$dbdir" && CONVOQ_LOG_FORMAT=json exec "$CONVOQ_BIN" "${args[@]}") >"$OUT_DIR/$tag.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$CONVOQ_PORT/healthz" 20 || die "convoq did not start (see $OUT_DIR/$tag.log)"
  create_users || die "creating users failed"
  run_load "$tag" "http://127.0.0.1:$CONVOQ_PORT" "$pid" "$count" convoq_accepted "$cpu_pids" convoq_backlog
  [ "$MODE" = closed ] && echo "args=${args[*]}" >>"$OUT_DIR/$tag.result"
  echo "args=${args[*]}" >"$OUT_DIR/$tag/args.txt"
  stop_pid "$pid"
  ls -l "$dbdir" >"$OUT_DIR/$tag/dbfiles.txt" 2>&1
  rm -rf "$dbdir"
  TAGS+=("$tag")
}

# ---------------------------------------------------------------- metrics digest
digest_metrics() { # metrics.txt -> mean/p50/p99 of the histograms that explain the figure
  pyrun "$1" <<'PY'
fams = ("convoq_http_request_duration_seconds", "convoq_job_duration_seconds",
        "convoq_job_wait_seconds", "convoq_db_query_duration_seconds")
h = parse_hist(sys.argv[1], fams)
print("| histogram | labels | count | mean ms | ~p50 ms | ~p99 ms |\n|---|---|---:|---:|---:|---:|")
for (fam, labels), x in sorted(h.items()):
    if x["count"] < 10: continue
    print(f"| {fam} | {labels} | {int(x['count'])} | {1000*x['sum']/x['count']:.3f} | "
          f"{1000*hist_q(x['b'], x['count'], .5):.3f} | {1000*hist_q(x['b'], x['count'], .99):.3f} |")
PY
}

# ---------------------------------------------------------------- main
ensure_tools
log "output in $OUT_DIR"
{
  echo "date: $(date -Is)"; echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "uptime before: $(uptime)"
  if [ "$MODE" = open ]; then
    echo "open loop: $(oha --version), rates $OPEN_RATES POST/s in turn:" \
         "oha -z $OPEN_DURATION -q RATE -c $OPEN_CONNS --latency-correction --no-tui --output-format json" \
         "-m POST -H 'Content-Type: application/json' -Z bodies.txt URL/api/chat/conversations"
  else
    echo "wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION --latency -s post.lua"
  fi
} >"$OUT_DIR/env.txt"
if [ "$MODE" = open ]; then # the bodies of shared/bench/README.md (users user-0..user-999)
  BODIES="$OUT_DIR/bodies.txt"
  python3 -c 'import json, sys
pct = int(sys.argv[1])
for i in range(20000):
    user = f"ghost-{i % 1000}" if (i * 37) % 100 < pct else f"user-{i % 1000}"
    print(json.dumps({"userId": user, "title": f"Bench conversation {i}", "personalityMode": "helpful"}))' "${UNKNOWN_PCT:-0}" >"$BODIES"
  echo "unknown-user bodies: ${UNKNOWN_PCT:-0} %" >>"$OUT_DIR/env.txt"
fi
TAGS=()
[ "$RUN_CONVOQ" = 1 ] && build_convoq
if [ "$RUN_NODE" = 1 ]; then prepare_node; log "load: $(uptime)"; run_node; fi
if [ "$RUN_CONVOQ" = 1 ]; then
  for v in $CONVOQ_VARIANTS; do log "load: $(uptime)"; run_convoq "$v"; done
fi

# report
if [ "$MODE" = closed ]; then
python3 - "$OUT_DIR" "$RUN_NODE" "${TAGS[@]}" <<'PY'
import sys, math
out, run_node, tags = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
def load(n):
    r = {}
    for line in open(f"{out}/{n}.result"):
        k, _, v = line.rstrip("\n").partition("=")
        r[k] = v
    return r
rows = ([load("node")] if run_node else []) + [load(t) for t in tags]
node = rows[0] if run_node else None
f = lambda k, r: float(r[k])
print()
print(open(f"{out}/env.txt").read().rstrip())
print()
print("| stack | HTTP req/s | POST p50 ms | POST p99 ms | non-2xx | accepted | rows@wrk (rows/s in window) | drain s | e2e rows/s | server CPU (cores) | machine CPU | HTTP × Node | e2e × Node |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    hx = ex = "—"
    if node and r is not node:
        hx = f"{f('rps', r) / f('rps', node):.1f}×"
        ex = f"{f('e2e_per_s', r) / f('e2e_per_s', node):.1f}×"
    drain = ("" if r["drained"] == "1" else ">") + r["drain"]
    print(f"| {r['name']} | {f('rps', r):,.0f} | {f('p50', r):.2f} | {f('p99', r):.2f} | {r['non2xx']} | "
          f"{int(r['accepted']):,} | {int(r['rows_wrk']):,} ({f('rows_wrk_per_s', r):,.0f}) | {drain} | "
          f"{f('e2e_per_s', r):,.0f} | {r['server_cpu']} | {int(100*f('machine_cpu', r))}% | {hx} | {ex} |")
print()
print("rows@wrk = rows committed from wrk start to wrk exit; drain = s from wrk start until rows = accepted "
      "('>' = not drained within DRAIN_TIMEOUT, rows counted then); e2e rows/s = rows / drain. "
      "server CPU = the server process's user+sys time / wrk window (Node: node only, not Redis/Postgres).")
PY
else
python3 - "$OUT_DIR" "$RUN_NODE" "$OPEN_RATES" "${TAGS[@]}" <<'PY'
import sys, math
out, run_node, rates, tags = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(), sys.argv[4:]
names = (["node"] if run_node else []) + tags
def load(n, rate):
    r = {}
    try:
        for line in open(f"{out}/{n}/open-{rate}/result"):
            k, _, v = line.rstrip("\n").partition("=")
            r[k] = v
    except OSError:
        return None
    return r
def f(r, k):
    try: return float(r[k])
    except (KeyError, ValueError): return math.nan
def num(v, fmt="{:,.2f}"):
    return "—" if v is None or math.isnan(v) else fmt.format(v)
def ratio(n, c):
    return "—" if math.isnan(n) or math.isnan(c) or c <= 0 else f"{n / c:.1f}×"
print()
print(open(f"{out}/env.txt").read().rstrip())
print()
print("| offered/s | stack | achieved 2xx/s | non-2xx | errors (aborted at -z) | POST p50 ms | p99 ms | p99.9 ms "
      "| accepted | rows | drain s (after load) | CPU ms/conv | 202→row lag p50 / p99 ms | job wait p99 + run p99 ms "
      "| p50 × lower | p99 × lower | CPU/conv × less |")
print("|---:|---|" + "---:|" * 15)
breakdown = []
for rate in rates:
    node = load("node", rate) if run_node else None
    for n in names:
        r = load(n, rate)
        if r is None:
            print(f"| {int(rate):,} | {n} | (no result) |" + " |" * 14); continue
        diff = int(r["rows_diff"])
        rows = f"{int(r['rows']):,}" + ("" if diff == 0 else f" **≠ ({diff:+,})**")
        if 0 < diff <= int(r["aborted"]):
            rows += f" (≤ the {r['aborted']} aborted at -z: POSTs cut by the client after their enqueue)"
        drain = ("" if r["drained"] == "1" else ">") + f"{f(r, 'drain'):.2f} (+{f(r, 'tail'):.2f})"
        ub = f(r, "e2e_ub_p99")
        hist = "—" if n == "node" or math.isnan(ub) else f"≤ {num(f(r, 'wait_p99'), '{:.1f}')} + {num(f(r, 'dur_p99'), '{:.2f}')} = {ub:.1f}"
        rx = [ratio(f(node, k), f(r, k)) if node and r is not node and n != "node" else "—"
              for k in ("p50", "p99", "cpu_per_conv")]
        print(f"| {int(rate):,} | {n} | {num(f(r, 'achieved'), '{:,.0f}')} | {r['non2xx']} | {r['errors']} ({r['aborted']}) | "
              f"{num(f(r, 'p50'))} | {num(f(r, 'p99'))} | {num(f(r, 'p999'))} | {int(r['accepted']):,} | {rows} | {drain} | "
              f"{num(f(r, 'cpu_per_conv'), '{:.3f}')} | {num(f(r, 'lag_p50'), '{:,.1f}')} / {num(f(r, 'lag_p99'), '{:,.1f}')} | {hist} | "
              + " | ".join(rx) + " |")
        breakdown.append((rate, n, r))
print()
print("Ratios are Node's figure ÷ the row's (>1× = convoq better). achieved = 2xx responses ÷ oha's wall time; "
      "errors = oha's errors, of which (n) requests aborted in flight when -z ran out; p50/p99/p99.9 = oha's, "
      "corrected for coordinated omission (from each request's scheduled send time); accepted / rows = server-side "
      "202s / rows created during this rate, rows flagged **≠** when they differ from accepted after the drain; "
      "drain = s from oha start until rows = accepted (after load: beyond the oha window; '>' = DRAIN_TIMEOUT hit); "
      "CPU ms/conv = user+sys ms of every process of the stack (Node: node + redis-server + all postgres; convoq: "
      "its process) from oha start to the drain ÷ accepted; 202→row lag = horizontal distance between the sampled "
      "accepted and row-count curves sampled every SAMPLE_INTERVAL (FIFO assumed; row counts stamped with the "
      "database's statement time, the 202 counter inside the curl call: resolution a few ms, negative lags "
      "clipped to 0); "
      "job wait p99 + run p99 = convoq's create_conversation convoq_job_wait_seconds p99 + "
      "convoq_job_duration_seconds p99 over this rate, an UPPER-BOUND ESTIMATE of the 202→completed p99 "
      "(histogram buckets: wait 1/5/10/50/100/500 ms…, interpolated).")
print()
print("| offered/s | stack | CPU ms/conv by process | machine CPU | ms waited for idle queues |")
print("|---:|---|---|---:|---:|")
for rate, n, r in breakdown:
    by = ", ".join(f"{c} {float(v):.3f}" for c, v in (x.split(":") for x in r["cpu_by"].split(";") if x))
    print(f"| {int(rate):,} | {n} | {by} | {int(100 * f(r, 'machine_cpu'))}% | {1000 * f(r, 'idle_wait'):.0f} |")
PY
fi
for t in "${TAGS[@]}"; do
  [ -s "$OUT_DIR/$t/metrics.txt" ] || continue
  echo; echo "convoq /metrics after the run ($t):"; digest_metrics "$OUT_DIR/$t/metrics.txt"
done
echo; echo "logs, wrk output, samples, metrics: $OUT_DIR"
