#!/bin/bash
# The rooms workload through Redis, wsrelay beside the roomfloor yardstick in one run, and the
# redis-benchmark ceiling of the publish script (today's and the one before it), on a 2-core box:
# server on CPU 0, Redis and the (niced) load generator on CPU 1. Best of two interleaved rounds.
# Before every round it waits (up to QUIET_MAX seconds) for the 1-minute load average to stay
# below 0.3 for 30 s, and prints how quiet it was. Output: a line per run, for tuning.md.
#
#   B=target/release Y=/work/yardstick-target/release scripts/rooms-compare.sh
#
# Environment: ROOMS (1000), SECS (5), RATES (fractions of the ceiling, "0.5 0.8"), MODES
# ("wsrelay roomfloor"), HISTORY (on; off runs wsrelay with --history-size 0), CEILING (skip the
# redis-benchmark measurement and use this many calls/s), DRAIN (10s), EXTRA (wsrelay flags).
set -euo pipefail
B=${B:-target/release}
Y=${Y:-/work/yardstick-target/release}
ROOMS=${ROOMS:-1000}
SECS=${SECS:-5}
RATES=${RATES:-"0.5 0.8"}
MODES=${MODES:-"wsrelay roomfloor"}
HISTORY=${HISTORY:-on}
DRAIN=${DRAIN:-10s}
QUIET_MAX=${QUIET_MAX:-1200}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/rooms-compare}
mkdir -p "$OUT"

. "$(dirname "$0")/quiet.sh"

redis_cpu() { redis-cli -p "$RP" INFO cpu | awk -F: '/used_cpu_(user|sys):/{s+=$2} END{printf "%.3f", s}'; }
# CPU ticks of the thread named $2 of process $1 (names are cut to 15 bytes: wsrelay-redis-s is wsrelay-redis-sub).
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    if [ "$(cat "$t/comm")" = "$2" ]; then awk '{print $14 + $15}' "$t/stat"; return; fi
  done
  echo 0
}

RP=$(free_port)
taskset -c 1 redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log"
trap 'kill $(cat "$OUT/redis.pid") 2>/dev/null || true' EXIT
until redis-cli -p "$RP" PING >/dev/null 2>&1; do sleep 0.1; done

# The ceiling: the publish script with its keys derived from one random argument, 64-byte
# payloads, over ROOMS channels, pipelined (-P 64), after a fill that makes trimming happen.
# The byte caps are the defaults'; the room name is the tag argument. Today's script takes 16
# publishes per call (as the server sends them), the one before it one.
# redis-benchmark runs on Redis's core, as the load generator does in the rooms runs; Redis CPU
# per publish (INFO cpu) is the figure that compares the scripts.
bench_script() { # file [publishes] -> "publishes/s redis-us/publish"
  local f=$1 body sha c0 c1 rps n=${2:-1000000} k=1 args=()
  if grep -q 'pcall(one, KEYS' "$f"; then
    # Several publishes per call (KEYS and ARGV of each publish, after ARGV 1-8): CALL publishes
    # per call (16, as the server sends them), -P 64/CALL so as many publishes are in flight.
    k=${CALL:-16}
    body=$(sed "s/pcall(one, KEYS\[2 \* i - 1\], KEYS\[2 \* i\], ARGV\[a + 1\],/pcall(one, 'wsrelay:{' .. ARGV[a + 5] .. '}:meta', 'wsrelay:{' .. ARGV[a + 5] .. '}:stream', ARGV[a + 5],/; s/local n = math.floor(#KEYS \/ 2)/local n = (#ARGV - 8) \/ 5/" "$f")
    args=(1000 600 EP0 8388608 7206 PUBLISH '' '')
    for ((j = 0; j < k; j++)); do
      args+=(x t 0123456789012345678901234567890123456789012345678901234567890123 0 'r-__rand_int__')
    done
  else
    body=$(sed "s/local meta, stream = KEYS\[1\], KEYS\[2\]/local meta, stream = 'wsrelay:{' .. ARGV[10] .. '}:meta', 'wsrelay:{' .. ARGV[10] .. '}:stream'/; s/ARGV\[3\]/ARGV[10]/" "$f")
    args=(1000 600 x t 0123456789012345678901234567890123456789012345678901234567890123 EP0 0 8388608 7206 'r-__rand_int__')
  fi
  sha=$(redis-cli -p "$RP" SCRIPT LOAD "$body")
  c0=$(redis_cpu)
  rps=$(taskset -c 1 redis-benchmark -p "$RP" -P $((64 / k)) -r "$ROOMS" -n $((n / k)) -c 4 -q EVALSHA "$sha" 0 \
        "${args[@]}" 2>&1 | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1)
  c1=$(redis_cpu)
  echo "$(echo "$rps * $k" | bc) $(echo "($c1 - $c0) * 1000000 / $n" | bc -l | cut -c1-5)"
}
if [ -z "${CEILING:-}" ]; then
  git show f2a2322:src/broker/redis/publish.lua > "$OUT/publish-before.lua"
  cp src/broker/redis/publish.lua "$OUT/publish-now.lua"
  best_before=0; best_now=0
  for round in 1 2; do
    wait_quiet
    # Fill every stream past its max length (keys expire while waiting for quiet), so both
    # scripts are measured trimming, as they do in steady state.
    redis-cli -p "$RP" FLUSHALL >/dev/null
    bench_script "$OUT/publish-before.lua" 1500000 >/dev/null
    b=$(bench_script "$OUT/publish-before.lua"); n=$(bench_script "$OUT/publish-now.lua")
    echo "ceiling round $round: publish.lua before: ${b% *} calls/s, ${b#* } us Redis CPU/call; now: ${n% *} publishes/s, ${n#* } us/publish"
    best_before=$(echo "${b% *} $best_before" | awk '{print ($1 > $2) ? $1 : $2}')
    best_now=$(echo "${n% *} $best_now" | awk '{print ($1 > $2) ? $1 : $2}')
  done
  CEILING=${best_before%.*}
  echo "ceiling (publish.lua before this change, best of 2): $CEILING calls/s; now: ${best_now%.*} publishes/s"
fi

run_one() { # mode rate
  local mode=$1 rate=$2 sp pid r0 r1 s0 s1 hz json
  redis-cli -p "$RP" FLUSHALL >/dev/null
  sp=$(free_port)
  case $mode in
    wsrelay)
      local hist=()
      [ "$HISTORY" = off ] && hist=(--history-size 0)
      taskset -c 0 "$B/wsrelay" --listen "127.0.0.1:$sp" --threads 1 --redis "redis://127.0.0.1:$RP" \
        "${hist[@]}" $EXTRA 2>"$OUT/server.log" &
      ;;
    roomfloor)
      taskset -c 0 "$Y/roomfloor" --listen "127.0.0.1:$sp" --redis "redis://127.0.0.1:$RP" 2>"$OUT/server.log" &
      ;;
  esac
  pid=$!
  until (exec 3<>/dev/tcp/127.0.0.1/"$sp") 2>/dev/null; do sleep 0.05; done
  r0=$(redis_cpu); s0=$(thread_ticks "$pid" wsrelay-redis-s)
  nice -n 10 taskset -c 1 "$B/wsrelay-load" --url "ws://127.0.0.1:$sp/r" -n $((2 * ROOMS)) -k "$ROOMS" \
    --rate "$rate" --size 64 --warmup 2s --duration "${SECS}s" --drain "$DRAIN" --server-pid "$pid" \
    --json > "$OUT/run.json" 2>"$OUT/load.log" || true
  r1=$(redis_cpu); s1=$(thread_ticks "$pid" wsrelay-redis-s)
  if [ "$mode" = wsrelay ]; then
    # Reads paused by a full publish queue, and anything closed or dropped, from /metrics.
    (exec 3<>/dev/tcp/127.0.0.1/"$sp" && printf 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' >&3 && cat <&3) |
      grep -E '^wsrelay_(publish_pauses|publish_dropped|publish_failed|slow_consumer_closes|deliveries_dropped)_total' |
      awk '{s[$1]+=$2} END{for (k in s) printf "%s=%d ", k, s[k]; print ""}' | sed 's/wsrelay_//g; s/_total//g'
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  hz=$(getconf CLK_TCK)
  python3 - "$OUT/run.json" "$mode" "$rate" "$r0" "$r1" "$s0" "$s1" "$hz" "$HISTORY" <<'PY'
import json, sys
f, mode, rate, r0, r1, s0, s1, hz, hist = sys.argv[1:]
r = json.load(open(f))
p = r.get("publisher") or {}
sent = p.get("sent", 0)
secs = r["window_secs"]
l = r["latency"]
srv = r["servers"][0] if r["servers"] else {}
msgs = r["measured"] / max(r["connections"] / r["channels"], 1)
redis_cpu = float(r1) - float(r0)
sub = (int(s1) - int(s0)) / int(hz)
print(f"{mode:9} hist {hist:3} rate {float(rate):8.0f} sent {sent}/{p.get('scheduled',0)} "
      f"expected {r['expected']} received {r['counts']['received']} lost {r['counts']['lost']} "
      f"reordered {r['counts']['reordered']} dup {r['counts']['duplicates']} closed {r['dropped']} "
      f"p50 {l['p50_us']/1e3:.1f} ms p99 {l['p99_us']/1e3:.1f} ms "
      f"server CPU {srv.get('cpu_busy',0)*100:.0f}% ({srv.get('cpu_secs',0)*1e6/max(msgs,1):.1f} us/msg in window) "
      f"redis CPU {redis_cpu:.2f} s ({redis_cpu*1e6/max(sent,1):.1f} us/msg, whole run) "
      f"sub thread {sub:.2f} s ({sub/max(secs,1e-9)*100:.0f}% of window) "
      f"warnings {len(r['warnings'])}: {' | '.join(r['warnings'])[:200]}")
PY
}

for frac in $RATES; do
  rate=$(echo "$CEILING * $frac" | bc -l | cut -d. -f1)
  for round in 1 2; do
    wait_quiet
    for mode in $MODES; do
      echo -n "x$frac round $round: "
      run_one "$mode" "$rate"
    done
  done
done
