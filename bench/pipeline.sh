#!/usr/bin/env bash
# End-to-end pipeline benchmark: HTTP POST /api/chat/conversations (202) -> conversation row
# committed, convoq (embedded SQLite) side by side with the Node reference
# (Express + BullMQ/Redis + Postgres, /work/shared/bench/node-reference) IN THE SAME RUN.
#
# Usage:  bench/pipeline.sh            (from anywhere; see bench/README.md)
#
# Environment (all optional):
#   WRK_THREADS=1 WRK_CONNS=32 WRK_DURATION=15s   the wrk load (defaults = the reference's)
#   DRAIN_TIMEOUT=30        seconds to wait after wrk for the backlog to drain
#   SAMPLE_INTERVAL=0.2     seconds between row-count samples
#   NODE_PORT=3100 CONVOQ_PORT=3200
#   RUN_NODE=1 RUN_CONVOQ=1 set to 0 to skip a stack
#   CONVOQ_VARIANTS="default"   space-separated convoq passes, each on a fresh SQLite file:
#                           "default" (no --concurrency flag), a number N (--concurrency
#                           database=N), "log=info" (default concurrency, --log info), or
#                           "N,log=info"; add ",pg" (or "pg" alone) to run convoq on a fresh
#                           Postgres database (store and queue) instead of SQLite
#   CONVOQ_LOG=warn         log filter for passes that do not say log=...
#   PERF=0                  1: perf record -g the convoq process during the wrk window
#   SHARED=/work/shared     where bench/ of the spec lives
#   OUT_DIR                 where logs/metrics go (default: a new /tmp/convoq-pipeline.XXXX)
#   NODE_REF_DIR            where the npm-installed copy of node-reference lives
#                           (default /tmp/convoq-bench-node-ref, reused when package.json matches)
#   SKIP_BUILD=0            1: do not run cargo build (use the existing target/release/convoq)
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
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-/work/shared}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-32}
WRK_DURATION=${WRK_DURATION:-15s}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30}
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

# ---------------------------------------------------------------- prerequisites
ensure_tools() {
  if ! command -v wrk >/dev/null; then
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
  if [ "$SKIP_BUILD" != 1 ]; then
    log "cargo build --release -p convoq"
    (cd "$ROOT" && cargo build --release -p convoq) >"$OUT_DIR/build.log" 2>&1 \
      || die "cargo build failed (see $OUT_DIR/build.log)"
  fi
  CONVOQ_BIN="$ROOT/target/release/convoq"
  [ -x "$CONVOQ_BIN" ] || die "$CONVOQ_BIN missing"
}

# ---------------------------------------------------------------- measurement core
# sampler <count-command...>: writes "epoch count" lines to $SAMPLES until killed
sampler() {
  while :; do
    local c; c=$("$@" 2>/dev/null | tr -dc 0-9)
    printf '%s %s\n' "$(now)" "${c:-NA}"
    sleep "$SAMPLE_INTERVAL"
  done
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

  local cpu0 sys0 perf_pid=""
  cpu0=$(cpu_ticks "$pid"); sys0=$(sys_busy)
  local t0; t0=$(now)
  sampler "$count_fn" >"$samples" & local spid=$!; PIDS+=("$spid")
  if [ "$PERF" = 1 ] && [ "$name" != node ]; then
    perf record -F 499 -g -p "$pid" -o "$dir/perf.data" >"$dir/perf.log" 2>&1 & perf_pid=$!; PIDS+=("$perf_pid")
  fi
  # mid-run snapshot of the queue (convoq) / stats (node) — one request, negligible load
  ( sleep "$(( ${WRK_DURATION%s} / 2 ))"; curl -s -m 2 "$url$([ "$name" = node ] && echo /internal/stats || echo /api/queues)" >"$dir/queues-mid.json" ) &
  local midpid=$!
  timeout $(( ${WRK_DURATION%s} + 30 )) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$LUA" "$url" >"$dir/wrk.txt" 2>&1
  local t1; t1=$(now)
  local rows_wrk; rows_wrk=$($count_fn)
  local cpu1 sys1; cpu1=$(cpu_ticks "$pid"); sys1=$(sys_busy)
  [ -n "$perf_pid" ] && { kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null; }
  wait "$midpid" 2>/dev/null
  [ "$name" != node ] && curl -s -m 2 "$url/api/queues" >"$dir/queues-end.json"
  local accepted; accepted=$($accepted_fn)
  # drain
  local deadline; deadline=$(python3 -c "print($t1 + $DRAIN_TIMEOUT)")
  local last="$rows_wrk" tdrain=""
  while :; do
    last=$($count_fn)
    if [ -n "$last" ] && [ -n "$accepted" ] && [ "$last" -ge "$accepted" ]; then
      # requests in flight when wrk exited may have been accepted since: re-read, then decide
      accepted=$($accepted_fn)
      if [ "$last" -ge "$accepted" ]; then tdrain=$(now); break; fi
    fi
    python3 -c "import sys,time; sys.exit(0 if time.time() < $deadline else 1)" || break
    sleep "$SAMPLE_INTERVAL"
  done
  local t2; t2=$(now)
  kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  [ -z "$tdrain" ] && last=$($count_fn)
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

# ---------------------------------------------------------------- Node reference
pg_count() { "${PG[@]}" -d bench -tAc 'SELECT count(*) FROM conversations'; }
node_accepted() { curl -s -m 2 "http://127.0.0.1:$NODE_PORT/internal/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accepted"])'; }

run_node() {
  log "Node reference on 127.0.0.1:$NODE_PORT"
  # a clean queue: drop BullMQ's keys of the queue `database` left by earlier runs
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'bull:database:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
  "${PG[@]}" -d bench -c 'TRUNCATE conversations' >/dev/null
  (cd "$NODE_REF_DIR" && PORT=$NODE_PORT WORKER_CONCURRENCY=10 exec node server.js) >"$OUT_DIR/node.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$NODE_PORT/healthz" 20 || die "Node reference did not start (see $OUT_DIR/node.log)"
  measure node "http://127.0.0.1:$NODE_PORT" "$pid" pg_count node_accepted
  stop_pid "$pid"
}

# ---------------------------------------------------------------- convoq
CONVOQ_DB=""
sqlite_count() {
  python3 -c 'import sqlite3,sys; c=sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True, timeout=5); print(c.execute("SELECT COUNT(*) FROM conversations").fetchone()[0])' "$CONVOQ_DB"
}
if command -v sqlite3 >/dev/null; then
  sqlite_count() { sqlite3 -readonly -cmd '.timeout 5000' "$CONVOQ_DB" 'SELECT COUNT(*) FROM conversations'; }
fi
convoq_pg_count() { "${PG[@]}" -d convoq_bench -tAc 'SELECT count(*) FROM conversations'; }
convoq_accepted() {
  curl -s -m 3 "http://127.0.0.1:$CONVOQ_PORT/metrics" \
    | awk '/^convoq_http_requests_total\{/ && /route="\/api\/chat\/conversations"/ && /status="202"/ && /method="POST"/ {s+=$NF} END {printf "%d\n", s}'
}

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
      *) die "unknown CONVOQ_VARIANTS entry: $part" ;;
    esac
  done
  local tag="convoq-${conc:-dflt}-$level"
  local dbdir; dbdir=$(mktemp -d /tmp/convoq-pipeline-db.XXXX); TMPDIRS+=("$dbdir")
  CONVOQ_DB="$dbdir/convoq.db"
  local url="sqlite://$CONVOQ_DB" count=sqlite_count
  if [ "$backend" = pg ]; then
    tag="$tag-pg"
    "${PG[@]}" -d postgres -c 'DROP DATABASE IF EXISTS convoq_bench' -c 'CREATE DATABASE convoq_bench' >/dev/null \
      || die "cannot create the Postgres database convoq_bench"
    url="postgres://${PGUSER:-root}@127.0.0.1:5432/convoq_bench" count=convoq_pg_count
  fi
  local args=(--listen "127.0.0.1:$CONVOQ_PORT" --database-url "$url"
              --personality-modes "$MODES" --log "$level")
  [ -n "$conc" ] && args+=(--concurrency "database=$conc")
  log "$tag: convoq ${args[*]}"
  (cd "$dbdir" && CONVOQ_LOG_FORMAT=json exec "$CONVOQ_BIN" "${args[@]}") >"$OUT_DIR/$tag.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$CONVOQ_PORT/healthz" 20 || die "convoq did not start (see $OUT_DIR/$tag.log)"
  create_users || die "creating users failed"
  measure "$tag" "http://127.0.0.1:$CONVOQ_PORT" "$pid" "$count" convoq_accepted
  echo "args=${args[*]}" >>"$OUT_DIR/$tag.result"
  stop_pid "$pid"
  ls -l "$dbdir" >"$OUT_DIR/$tag/dbfiles.txt" 2>&1
  rm -rf "$dbdir"
  TAGS+=("$tag")
}

# ---------------------------------------------------------------- metrics digest
digest_metrics() { # metrics.txt -> mean/p50/p99 of the histograms that explain the figure
  python3 - "$1" <<'PY'
import re, sys, collections
fams = ("convoq_http_request_duration_seconds", "convoq_job_duration_seconds",
        "convoq_job_wait_seconds", "convoq_db_query_duration_seconds")
h = collections.defaultdict(lambda: {"b": [], "sum": 0, "count": 0})
for line in open(sys.argv[1]):
    m = re.match(r'^(\w+?)(_bucket|_sum|_count)\{?(.*?)\}? ([\d.eE+-]+|\+Inf|NaN)$', line.strip())
    if not m or m.group(1) not in fams: continue
    fam, kind, labels, v = m.groups()
    le = re.search(r'le="([^"]+)"', labels)
    key = (fam, re.sub(r',?le="[^"]+"', "", labels))
    if kind == "_bucket": h[key]["b"].append((float(le.group(1)), float(v)))
    elif kind == "_sum": h[key]["sum"] = float(v)
    else: h[key]["count"] = float(v)
def q(b, n, p):
    t = p * n; prev_le, prev_c = 0.0, 0.0
    for le, c in sorted(b):
        if c >= t:
            if le == float("inf"): return prev_le
            return prev_le + (le - prev_le) * ((t - prev_c) / max(1e-9, c - prev_c))
        prev_le, prev_c = le, c
    return float("nan")
print("| histogram | labels | count | mean ms | ~p50 ms | ~p99 ms |\n|---|---|---:|---:|---:|---:|")
for (fam, labels), x in sorted(h.items()):
    if x["count"] < 10: continue
    print(f"| {fam} | {labels} | {int(x['count'])} | {1000*x['sum']/x['count']:.3f} | "
          f"{1000*q(x['b'], x['count'], .5):.3f} | {1000*q(x['b'], x['count'], .99):.3f} |")
PY
}

# ---------------------------------------------------------------- main
ensure_tools
log "output in $OUT_DIR"
{
  echo "date: $(date -Is)"; echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "uptime before: $(uptime)"; echo "wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION --latency -s post.lua"
} >"$OUT_DIR/env.txt"
TAGS=()
[ "$RUN_CONVOQ" = 1 ] && build_convoq
if [ "$RUN_NODE" = 1 ]; then prepare_node; log "load: $(uptime)"; run_node; fi
if [ "$RUN_CONVOQ" = 1 ]; then
  for v in $CONVOQ_VARIANTS; do log "load: $(uptime)"; run_convoq "$v"; done
fi

# report
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
for t in "${TAGS[@]}"; do
  [ -s "$OUT_DIR/$t/metrics.txt" ] || continue
  echo; echo "convoq /metrics after the run ($t):"; digest_metrics "$OUT_DIR/$t/metrics.txt"
done
echo; echo "logs, wrk output, samples, metrics: $OUT_DIR"
