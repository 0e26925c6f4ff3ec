#!/usr/bin/env bash
# What one convoq process asks of Postgres per conversation, at a fixed offered load: the
# server's CPU, its transactions, cq_jobs' row writes and sequential scans, and the POST
# latency, for one or more convoq binaries in turn (A/B of two builds: alternate them).
#
# Usage:  bench/pg_counters.sh BINARY [BINARY…]
#         RATE=2000 ROUNDS=2 bench/pg_counters.sh target/release/convoq /tmp/convoq-old
#
# Environment (all optional):
#   RATE=1000        POST/s offered (oha -q), for DURATION
#   DURATION=10s     oha -z
#   CONNS=32         oha -c
#   ROUNDS=1         how many times each binary runs (in turn: A B A B …)
#   PGURL_BASE=postgres://root@127.0.0.1:5432   the server; a fresh database `cvcounters` per run
#   PORT=3300
#
# Each run: a fresh database, convoq queue and store on it (`--database-url`), users user-0 ..
# user-999 created first, then `oha -q RATE -z DURATION -c CONNS --latency-correction` POSTs
# conversations for them; 3 s after oha ends the counters are read. CPU is utime+stime of
# every postgres process of the machine and of the convoq process, in clock ticks (1/100 s),
# from oha's start to the reading. Loopback only; each run is bounded by DURATION + ~20 s.
set -euo pipefail

[ $# -ge 1 ] || { sed -n 2,8p "$0"; exit 2; }
RATE=${RATE:-1000}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-1}
PGURL_BASE=${PGURL_BASE:-postgres://root@127.0.0.1:5432}
PORT=${PORT:-3300}
DB=cvcounters
export PATH="$PATH:$HOME/.cargo/bin"
command -v oha >/dev/null || cargo install oha --locked
BODIES=$(mktemp)
trap 'rm -f "$BODIES"' EXIT
for n in $(seq 0 999); do
  printf '{"userId": "user-%d", "title": "Counters %d", "personalityMode": "helpful"}\n' "$n" "$n"
done >"$BODIES"

ticks() { # utime+stime of the given pids, in clock ticks
  local t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}

sql() { psql -X -q -At "$PGURL_BASE/$1" -c "$2"; }

run() {
  local bin=$1
  sql postgres "DROP DATABASE IF EXISTS $DB" 2>/dev/null
  sql postgres "CREATE DATABASE $DB"
  "$bin" --listen "127.0.0.1:$PORT" --database-url "$PGURL_BASE/$DB" \
    --personality-modes helpful --log warn >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
  python3 - "$PORT" <<'PY'
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
for n in range(1000):
    body = json.dumps({"discordId": str(n + 1), "username": f"user-{n}"})
    c.request("PUT", f"/api/users/user-{n}", body, {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status in (200, 201), r.status
PY
  local pg0 cv0 pg1 cv1 lat
  pg0=$(ticks $(pgrep -x postgres)); cv0=$(ticks "$pid")
  lat=$(oha -q "$RATE" -z "$DURATION" -c "$CONNS" --latency-correction --no-tui \
      --output-format json -m POST -H 'Content-Type: application/json' -Z "$BODIES" \
      "http://127.0.0.1:$PORT/api/chat/conversations" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
ok = sum(v for k, v in d["statusCodeDistribution"].items() if k.startswith("2"))
print("2xx=%d p50=%.2f p99=%.2f" % (ok, p["p50"] * 1000, p["p99"] * 1000))')
  sleep 3
  pg1=$(ticks $(pgrep -x postgres)); cv1=$(ticks "$pid")
  local convs jobs xacts
  convs=$(sql "$DB" "SELECT count(*) FROM conversations")
  jobs=$(sql "$DB" "SELECT n_tup_ins || ' ' || n_tup_upd || ' ' || n_tup_del || ' ' || seq_scan || ' ' || coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'cq_jobs'")
  xacts=$(sql "$DB" "SELECT xact_commit FROM pg_stat_database WHERE datname = '$DB'")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  read -r ins upd del seqs seqrows <<<"$jobs"
  echo "bin=$(basename "$bin") rate=$RATE $lat conversations=$convs postgres_ticks=$((pg1 - pg0)) convoq_ticks=$((cv1 - cv0)) commits=$xacts cq_jobs_inserts=$ins cq_jobs_updates=$upd cq_jobs_deletes=$del cq_jobs_seq_scans=$seqs cq_jobs_seq_rows=$seqrows"
}

echo "# $(date -Is) $(nproc) cores; RATE=$RATE DURATION=$DURATION CONNS=$CONNS; pg_stat counters are flushed lazily (approximate)"
for _ in $(seq "$ROUNDS"); do
  for bin in "$@"; do run "$bin"; done
done
