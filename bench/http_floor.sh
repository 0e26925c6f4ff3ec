#!/usr/bin/env bash
# The HTTP floor of the embedded default: the conversation route answering without touching
# storage, under the pipeline bench's closed loop (wrk -t1 -c32 -d15s, the reference's load).
#
# Usage:  bench/http_floor.sh            (after `cargo build --release -p convoq`)
#
# Every request is the pipeline bench's POST /api/chat/conversations with a personalityMode
# the server does not offer, so it goes through everything a POST goes through before the
# queue (the connection, the request id, the auth and limit layers, reading and parsing the
# JSON body, validating each field) and is answered 400 `invalid_field`: no backlog read, no
# job, no row. Its rate is what the service's HTTP path alone can do on this machine with wrk
# beside it; `bench/sqlite_floor.py` is the storage's floor; BENCHMARKS.md compares the two with
# the end-to-end figure.
#
# Environment (all optional): CONVOQ_BIN (default target/release/convoq), PORT=3300,
# WRK_THREADS=1 WRK_CONNS=32 WRK_DURATION=15s; OPEN_RATES="1000 2000" (after wrk, one oha run
# of 15 s at each rate, if oha is installed: the open loop's CPU per request; "" for none).
# Bounded: one wrk run and one oha run per rate; the server is stopped
# and its temporary directory removed at exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CONVOQ_BIN:-$ROOT/target/release/convoq}
PORT=${PORT:-3300}
WRK_THREADS=${WRK_THREADS:-1} WRK_CONNS=${WRK_CONNS:-32} WRK_DURATION=${WRK_DURATION:-15s}
OPEN_RATES=${OPEN_RATES-1000 2000}
[ -x "$BIN" ] || { echo "no convoq binary at $BIN: cargo build --release -p convoq" >&2; exit 2; }
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
DIR=$(mktemp -d /tmp/convoq-http-floor.XXXX)
"$BIN" --listen "127.0.0.1:$PORT" --database-url "sqlite://$DIR/convoq.db" --log warn \
  >"$DIR/convoq.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
cat >"$DIR/floor.lua" <<'LUA'
-- The pipeline bench's POST, with a personalityMode that is not offered: answered 400.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local body = string.format(
    '{"userId":"user-%d","title":"Bench conversation %d","personalityMode":"no-such-mode"}',
    counter % 1000, counter)
  return wrk.format("POST", "/api/chat/conversations", nil, body)
end
LUA
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)
before=$(ticks)
wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$DIR/floor.lua" \
  "http://127.0.0.1:$PORT" >"$DIR/wrk.txt"
after=$(ticks)
requests=$(awk '/requests in/ {print $1}' "$DIR/wrk.txt")
rps=$(awk '/Requests\/sec/ {print $2}' "$DIR/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $5}' "$DIR/wrk.txt")
p50=$(awk '$1 == "50%" {print $2}' "$DIR/wrk.txt")
p99=$(awk '$1 == "99%" {print $2}' "$DIR/wrk.txt")
rows=$(curl -fs "http://127.0.0.1:$PORT/metrics" | awk -F' ' '/^convoq_jobs_queued_total/ {s += $2} END {print s + 0}')
[ "${non2xx:-0}" = "$requests" ] || { echo "expected every answer 400, got $non2xx non-2xx of $requests" >&2; exit 1; }
[ "$rows" = 0 ] || { echo "a job was queued ($rows): the floor must not touch storage" >&2; exit 1; }
cpu_ms=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN {printf "%.3f", t * 1000 / hz / n}')
echo "HTTP floor (the route answering 400 before the queue, wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION):"
echo "  $rps requests/s, p50 $p50 p99 $p99, CPU $cpu_ms ms per request (convoq's process), $requests requests, none queued"
# The same route under the open loop's offered rates (oha, as `MODE=open bench/pipeline.sh`):
# at a low rate every request wakes the runtime from its sleep, which a closed loop hides.
[ -x "$HOME/.cargo/bin/oha" ] && PATH="$PATH:$HOME/.cargo/bin"
if [ -n "$OPEN_RATES" ] && command -v oha >/dev/null; then
  for rate in $OPEN_RATES; do
    for n in $(seq 1000); do
      printf '{"userId":"user-%d","title":"Bench conversation %d","personalityMode":"no-such-mode"}\n' \
        $((n % 1000)) "$n"
    done >"$DIR/bodies.txt"
    before=$(ticks)
    timeout 60 oha -z 15s -q "$rate" -c 64 --latency-correction --no-tui --output-format json \
      -m POST -H 'Content-Type: application/json' -Z "$DIR/bodies.txt" \
      "http://127.0.0.1:$PORT/api/chat/conversations" >"$DIR/oha.json"
    after=$(ticks)
    python3 - "$DIR/oha.json" $((after - before)) "$HZ" "$rate" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))
ticks, hz, rate = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
codes = o.get("statusCodeDistribution", {})
n = sum(codes.values())
assert set(codes) <= {"400"}, "expected every answer 400, got %s" % codes
p = o["latencyPercentiles"]
print("  open loop at %s/s (oha -z 15s -c 64): %d requests, p50 %.2f p99 %.2f ms, CPU %.3f ms per request"
      % (rate, n, p["p50"] * 1000, p["p99"] * 1000, ticks * 1000 / hz / n))
PY
  done
fi
