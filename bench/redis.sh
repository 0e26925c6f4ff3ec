#!/usr/bin/env bash
# Queue processing throughput on Redis: convoq's BullMQ engine vs Node BullMQ, on the same Redis
# in the same run. Each measurement preloads N jobs on a fresh queue and times draining them
# with a worker pool at the same concurrency:
#   Node:   node bench-queue.js drain --c C --proc noop|db --n N   (shared/bench/node-reference)
#   convoq: cargo bench -p convoq-queue --features redis --bench redis -- --c C --proc ... --n N
#
# Usage:  bench/redis.sh                (from anywhere; see bench/README.md)
#
# Environment (all optional):
#   RUNS=3                  rounds; each round measures every workload for both stacks,
#                           alternating which stack goes first
#   N=20000 CONC=10         jobs per measurement, worker concurrency (both stacks)
#   WORKLOADS="noop db"     noop: the processor returns at once; db: it inserts one row into
#                           Postgres (table conversations of shared/bench/sql/schema.sql)
#   REDIS_PORT=6391         a private redis-server started here (no persistence, like the
#                           reference's); REDIS_EXTERNAL=1 uses one already on that port
#   PGDATABASE=convoq_bench_redis   created if missing, schema applied; both stacks insert there
#   CONVOQ_ARGS=""          extra flags for convoq's bench (e.g. "--listen-events false")
#   SHARED=/work/shared     where bench/ of the spec lives
#   NODE_REF_DIR            npm-installed copy of node-reference
#                           (default /tmp/convoq-redis-bench-node-ref, reused while package.json
#                           is unchanged)
#   OUT_DIR                 where the JSON lines and logs go (default: a new /tmp dir)
#   SKIP_BUILD=0            1: reuse the bench binary built last time
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-/work/shared}
RUNS=${RUNS:-3}
N=${N:-20000}
CONC=${CONC:-10}
WORKLOADS=${WORKLOADS:-"noop db"}
REDIS_PORT=${REDIS_PORT:-6391}
REDIS_EXTERNAL=${REDIS_EXTERNAL:-0}
export PGDATABASE=${PGDATABASE:-convoq_bench_redis}
export PGUSER=${PGUSER:-root}
CONVOQ_ARGS=${CONVOQ_ARGS:-}
SKIP_BUILD=${SKIP_BUILD:-0}
NODE_REF_DIR=${NODE_REF_DIR:-/tmp/convoq-redis-bench-node-ref}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/convoq-redis-bench.XXXX)}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
PG=(psql -X -q -h 127.0.0.1 -p 5432 -U "$PGUSER")

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

REDIS_PID=
cleanup() {
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill -TERM "$REDIS_PID"
    wait "$REDIS_PID" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for t in node npm psql redis-server redis-cli python3 cargo; do
  command -v $t >/dev/null || die "$t is required"
done

# ---------------------------------------------------------------- Redis, Postgres, Node
if [ "$REDIS_EXTERNAL" = 1 ]; then
  redis-cli -p "$REDIS_PORT" ping >/dev/null || die "no Redis on port $REDIS_PORT"
else
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && die "port $REDIS_PORT is taken (set REDIS_PORT)"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$OUT_DIR/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null || die "redis-server did not start (see $OUT_DIR/redis.log)"
fi

if [ -z "$("${PG[@]}" -d postgres -tAc "select 1 from pg_database where datname='$PGDATABASE'")" ]; then
  log "creating Postgres database $PGDATABASE"
  "${PG[@]}" -d postgres -c "CREATE DATABASE $PGDATABASE" >/dev/null || die "CREATE DATABASE failed"
fi
"${PG[@]}" -d "$PGDATABASE" -f "$SHARED/bench/sql/schema.sql" >/dev/null 2>&1 || die "schema.sql failed"

src="$SHARED/bench/node-reference"
if [ -d "$NODE_REF_DIR/node_modules/bullmq" ] && cmp -s "$src/package.json" "$NODE_REF_DIR/package.json"; then
  cp -f "$src"/*.js "$NODE_REF_DIR/"
else
  log "npm install of a copy of node-reference in $NODE_REF_DIR"
  rm -rf "$NODE_REF_DIR"; mkdir -p "$NODE_REF_DIR"
  cp -r "$src"/. "$NODE_REF_DIR/"; chmod -R u+w "$NODE_REF_DIR"
  (cd "$NODE_REF_DIR" && timeout 300 npm install --no-package-lock --no-audit --no-fund) \
    >"$OUT_DIR/npm.log" 2>&1 || die "npm install failed (see $OUT_DIR/npm.log)"
fi

# ---------------------------------------------------------------- convoq's bench binary
BIN_FILE="$ROOT/target/release/convoq-redis-bench.path"
if [ "$SKIP_BUILD" != 1 ] || [ ! -s "$BIN_FILE" ]; then
  log "building convoq's bench (release)"
  (cd "$ROOT" && cargo bench -p convoq-queue --features redis --bench redis --no-run) \
    >"$OUT_DIR/build.log" 2>&1 || die "build failed (see $OUT_DIR/build.log)"
  sed -n 's/.*Executable benches\/redis.rs (\(.*\))/\1/p' "$OUT_DIR/build.log" | tail -1 >"$BIN_FILE"
fi
BIN=$(cat "$BIN_FILE"); case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
[ -x "$BIN" ] || die "no bench binary ($BIN)"

# ---------------------------------------------------------------- measure
run_node() { # workload
  (cd "$NODE_REF_DIR" && REDIS_PORT=$REDIS_PORT timeout 400 node bench-queue.js drain \
    --c "$CONC" --proc "$1" --n "$N") 2>>"$OUT_DIR/node.err" | tail -1
}
run_convoq() { # workload
  # shellcheck disable=SC2086
  REDIS_PORT=$REDIS_PORT timeout 400 "$BIN" --c "$CONC" --proc "$1" --n "$N" $CONVOQ_ARGS \
    2>>"$OUT_DIR/convoq.err" | tail -1
}
record() { # run stack workload json
  python3 - "$@" >>"$RESULTS" <<'EOF'
import json, os, sys
run, stack, workload, line = sys.argv[1:5]
try:
    r = json.loads(line)
except ValueError:
    r = {"error": line or "no output"}
r.update(run=int(run), stack=stack, workload=workload, loadavg=os.getloadavg()[0])
print(json.dumps(r))
EOF
}

log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(uptime)"
log "results: $RESULTS"
for run in $(seq "$RUNS"); do
  for w in $WORKLOADS; do
    if [ $((run % 2)) = 1 ]; then order="node convoq"; else order="convoq node"; fi
    for stack in $order; do
      log "run $run, $w, $stack (load average $(cut -d' ' -f1 /proc/loadavg))"
      if [ "$stack" = node ]; then out=$(run_node "$w"); else out=$(run_convoq "$w"); fi
      record "$run" "$stack" "$w" "$out"
      printf '%s\n' "$out" | cut -c1-240 >&2
    done
  done
done

# ---------------------------------------------------------------- report
python3 - "$RESULTS" "$CONC" "$N" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
conc, n = sys.argv[2], sys.argv[3]
print(f"\nconcurrency {conc}, {n} jobs per measurement\n")
print("| run | workload | Node BullMQ jobs/s | convoq jobs/s | convoq ÷ Node | Node CPU (node / redis, % of a core) | convoq CPU (bench / redis, cores) | load avg |")
print("|---|---|---:|---:|---:|---|---|---:|")
by = {}
for r in rows:
    by.setdefault((r["run"], r["workload"]), {})[r["stack"]] = r
for (run, w), s in sorted(by.items()):
    nd, cq = s.get("node", {}), s.get("convoq", {})
    nj, cj = nd.get("jobs_per_s"), cq.get("jobs_per_s")
    ratio = f"{cj / nj:.2f}×" if nj and cj else "—"
    ncpu = nd.get("cpu", {}).get("per_proc_pct_of_one_core", {})
    ncpu = f"{ncpu.get('node', '?')} / {ncpu.get('redis-server', '?')}" if ncpu else "—"
    ccpu = f"{cq.get('cpu_cores', '?')} / {cq.get('redis_cpu_cores', '?')}" if cq else "—"
    la = max(nd.get("loadavg", 0), cq.get("loadavg", 0))
    ok = lambda r: "" if r.get("completed") == int(n) else " (incomplete: %s)" % (r.get("error") or r.get("completed"))
    print(f"| {run} | {w} | {nj or '—'}{ok(nd)} | {int(cj) if cj else '—'}{ok(cq)} | {ratio} | {ncpu} | {ccpu} | {la:.1f} |")
EOF
log "raw results: $RESULTS"
