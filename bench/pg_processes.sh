#!/usr/bin/env bash
# Two API processes and two worker processes on one Postgres database, under an open-loop load
# split over both APIs: POST latency per API, every accepted POST a row, and each process's CPU.
#
# Usage:  bench/pg_processes.sh [BINARY]     (default target/release/convoq)
#         RATES="1000 2000" DURATION=15s bench/pg_processes.sh
#
# Environment (all optional):
#   RATES="1000 2000"   total POST/s offered, half to each API (oha -q RATE/2 on each), in turn
#   DURATION=15s        oha -z per rate
#   CONNS=32            oha -c per API
#   PGURL_BASE=postgres://root@127.0.0.1:5432   the server; a fresh database `cvprocesses`
# Loopback only; bounded by the rates' durations plus a drain of at most 60 s each.
set -euo pipefail

BIN=${1:-target/release/convoq}
RATES=${RATES:-1000 2000}
DURATION=${DURATION:-15s}
CONNS=${CONNS:-32}
PGURL_BASE=${PGURL_BASE:-postgres://root@127.0.0.1:5432}
DB=cvprocesses
URL="$PGURL_BASE/$DB"
export PATH="$PATH:$HOME/.cargo/bin"
command -v oha >/dev/null || cargo install oha --locked
OUT=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for n in $(seq 0 999); do
  printf '{"userId": "user-%d", "title": "Processes %d", "personalityMode": "helpful"}\n' "$n" "$n"
done >"$OUT/bodies.txt"

sql() { psql -X -q -At "$1" -c "$2"; }
sql "$PGURL_BASE/postgres" "DROP DATABASE IF EXISTS $DB" 2>/dev/null
sql "$PGURL_BASE/postgres" "CREATE DATABASE $DB"

common=(--database-url "$URL" --personality-modes helpful --log warn)
"$BIN" serve --no-workers --listen 127.0.0.1:3210 "${common[@]}" >"$OUT/api1.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -sf 127.0.0.1:3210/readyz >/dev/null && break; sleep 0.1; done
"$BIN" serve --no-workers --listen 127.0.0.1:3211 "${common[@]}" >"$OUT/api2.log" 2>&1 & PIDS+=($!)
"$BIN" worker --worker-listen 127.0.0.1:9191 "${common[@]}" >"$OUT/worker1.log" 2>&1 & PIDS+=($!)
"$BIN" worker --worker-listen 127.0.0.1:9192 "${common[@]}" >"$OUT/worker2.log" 2>&1 & PIDS+=($!)
for port in 3211 9191 9192; do
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
python3 - <<'PY'
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", 3210, timeout=10)
for n in range(1000):
    body = json.dumps({"discordId": str(n + 1), "username": f"user-{n}"})
    c.request("PUT", f"/api/users/user-{n}", body, {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status in (200, 201), r.status
PY

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
names=(api1 api2 worker1 worker2)
echo "# $(date -Is) $(nproc) cores; $BIN; DURATION=$DURATION CONNS=$CONNS per API"
for rate in $RATES; do
  before=$(sql "$URL" "SELECT count(*) FROM conversations")
  declare -a t0=()
  for p in "${PIDS[@]}"; do t0+=("$(ticks "$p")"); done
  pg0=0; for p in $(pgrep -x postgres); do pg0=$((pg0 + $(ticks "$p" 2>/dev/null || echo 0))); done
  for port in 3210 3211; do
    oha -q $((rate / 2)) -z "$DURATION" -c "$CONNS" --latency-correction --no-tui \
      --output-format json -m POST -H 'Content-Type: application/json' -Z "$OUT/bodies.txt" \
      "http://127.0.0.1:$port/api/chat/conversations" >"$OUT/oha-$rate-$port.json" 2>/dev/null &
  done
  wait %oha 2>/dev/null || true
  while pgrep -x oha >/dev/null; do sleep 0.2; done
  accepted=0
  for port in 3210 3211; do
    accepted=$((accepted + $(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(v for k, v in d["statusCodeDistribution"].items() if k.startswith("2")))' "$OUT/oha-$rate-$port.json")))
  done
  rows=0
  for _ in $(seq 300); do
    rows=$(( $(sql "$URL" "SELECT count(*) FROM conversations") - before ))
    [ "$rows" -ge "$accepted" ] && break
    sleep 0.2
  done
  cpu=""
  for i in "${!PIDS[@]}"; do cpu+="${names[$i]}=$(( $(ticks "${PIDS[$i]}") - ${t0[$i]} )) "; done
  pg1=0; for p in $(pgrep -x postgres); do pg1=$((pg1 + $(ticks "$p" 2>/dev/null || echo 0))); done
  for port in 3210 3211; do
    python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]; s = d["summary"]
print("rate=%s api=%s achieved=%.0f/s p50=%.2f p99=%.2f p999=%.2f ms" % (sys.argv[2], sys.argv[3],
      s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, p["p99.9"] * 1000))' \
      "$OUT/oha-$rate-$port.json" "$rate" "$port"
  done
  echo "rate=$rate accepted=$accepted rows=$rows cpu_ticks: ${cpu}postgres=$((pg1 - pg0))"
done
