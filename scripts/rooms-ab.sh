#!/bin/bash
# Server CPU per message in the rooms workload for several server binaries, interleaved: the
# A/B figure for a change on the Redis path (tuning.md). Each binary in turn, ROUNDS times:
# 1,000 rooms of 2 connections through one Redis, history on, server --threads 1 on CPU 0,
# Redis and the niced load generator on CPU 1; one line per run. A binary whose name ends in
# "roomfloor" is run as the yardstick.
#
#   scripts/rooms-ab.sh /path/to/old/wsrelay target/release/wsrelay
#
# Environment: RATE (60000 msg/s), ROUNDS (3), EXTRA (wsrelay flags), LOAD (the generator,
# target/release/wsrelay-load).
set -euo pipefail
RATE=${RATE:-60000}
ROUNDS=${ROUNDS:-3}
EXTRA=${EXTRA:-}
LOAD=${LOAD:-target/release/wsrelay-load}
OUT=${OUT:-/tmp/rooms-ab}
mkdir -p "$OUT"
. "$(dirname "$0")/quiet.sh"

RP=$(free_port)
taskset -c 1 redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log"
trap 'kill $(cat "$OUT/redis.pid") 2>/dev/null || true' EXIT
until redis-cli -p "$RP" PING >/dev/null 2>&1; do sleep 0.1; done
for _ in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    redis-cli -p "$RP" FLUSHALL >/dev/null
    sp=$(free_port)
    if [[ $bin == *roomfloor ]]; then
      taskset -c 0 "$bin" --listen "127.0.0.1:$sp" --redis "redis://127.0.0.1:$RP" 2>"$OUT/server.log" &
    else
      taskset -c 0 "$bin" --listen "127.0.0.1:$sp" --threads 1 --redis "redis://127.0.0.1:$RP" $EXTRA \
        2>"$OUT/server.log" &
    fi
    pid=$!
    until (exec 3<>/dev/tcp/127.0.0.1/"$sp") 2>/dev/null; do sleep 0.05; done
    nice -n 10 taskset -c 1 "$LOAD" --url "ws://127.0.0.1:$sp/r" -n 2000 -k 1000 --rate "$RATE" \
      --size 64 --warmup 2s --duration 5s --drain 10s --server-pid "$pid" --json \
      > "$OUT/run.json" 2>"$OUT/load.log" || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$bin" "$OUT/run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
s = r["servers"][0]
msgs = r["measured"] / 2
l = r["latency"]
c = r["counts"]
print(f"{sys.argv[1]:45} cpu {s['cpu_busy']*100:4.0f}% {s['cpu_secs']*1e6/msgs:5.2f} us/msg "
      f"p50 {l['p50_us']/1e3:6.1f} p99 {l['p99_us']/1e3:6.1f} ms lost {c['lost']} "
      f"reordered {c['reordered']} closed {r['dropped']}")
PY
  done
done
