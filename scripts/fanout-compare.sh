#!/bin/bash
# One channel, 1,000 subscribers, in-process broker: wsrelay (--threads 1) beside the
# fanout-floor yardstick, server on CPU 0, load generator on CPU 1, interleaved rounds (best of
# two is what tuning.md reports). Before every round it waits for a quiet machine (quiet.sh).
#
#   B=target/release Y=/work/yardstick-target/release scripts/fanout-compare.sh
#
# Environment: RATES ("100 2000"), SUBS (1000), SECS (10), ROUNDS (2), EXTRA (wsrelay flags).
set -euo pipefail
B=${B:-target/release}
Y=${Y:-/work/yardstick-target/release}
RATES=${RATES:-"100 2000"}
SUBS=${SUBS:-1000}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/fanout-compare}
mkdir -p "$OUT"
. "$(dirname "$0")/quiet.sh"

run_one() { # mode rate
  local mode=$1 rate=$2 sp pid
  sp=$(free_port)
  case $mode in
    wsrelay) taskset -c 0 "$B/wsrelay" --listen "127.0.0.1:$sp" --threads 1 $EXTRA 2>"$OUT/server.log" & ;;
    floor) taskset -c 0 "$Y/fanout-floor" "127.0.0.1:$sp" 2>"$OUT/server.log" & ;;
  esac
  pid=$!
  until (exec 3<>/dev/tcp/127.0.0.1/"$sp") 2>/dev/null; do sleep 0.05; done
  taskset -c 1 "$B/wsrelay-load" --url "ws://127.0.0.1:$sp/" -n "$SUBS" --rate "$rate" --size 64 \
    --warmup 2s --duration "${SECS}s" --server-pid "$pid" --json > "$OUT/run.json" 2>"$OUT/load.log" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$OUT/run.json" "$mode" "$rate" <<'PY'
import json, sys
f, mode, rate = sys.argv[1:]
r = json.load(open(f))
l = r["latency"]
print(f"{mode:8} {float(rate):6.0f} msg/s x {r['established']}: p50 {l['p50_us']/1e3:.1f} ms "
      f"p99 {l['p99_us']/1e3:.1f} ms p999 {l['p999_us']/1e3:.1f} ms "
      f"deliveries/CPU-s {r['deliveries_per_server_cpu_sec']:.0f} lost {r['counts']['lost']} "
      f"warnings {len(r['warnings'])}: {' | '.join(r['warnings'])[:160]}")
PY
}

for rate in $RATES; do
  for round in $(seq "$ROUNDS"); do
    wait_quiet
    for mode in wsrelay floor; do
      echo -n "round $round: "
      run_one "$mode" "$rate"
    done
  done
done
