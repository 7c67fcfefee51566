#!/bin/bash
# The rooms workload (ROOMS rooms of 2 connections, 64-byte messages, history on) through one
# Redis and through a Redis Cluster of three primaries (no replicas), on a 2-core box: wsrelay
# (--threads 1) on CPU 0, every redis-server and the (niced) load generator on CPU 1. For each
# run: publishes sent and received, latency, Redis CPU per publish of each Redis (INFO cpu over
# the publish script's calls on that Redis, INFO commandstats), and how evenly the channels'
# publishes spread over the primaries (max/min calls per primary).
#
#   B=target/release scripts/rooms-cluster.sh
#
# Environment: ROOMS (1000), SECS (5), RATES (publishes/s, "10000 20000"), DRAIN (10s),
# ROUNDS (2), OUT (/tmp/rooms-cluster).
set -euo pipefail
B=${B:-target/release}
ROOMS=${ROOMS:-1000}
SECS=${SECS:-5}
RATES=${RATES:-"10000 20000"}
DRAIN=${DRAIN:-10s}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-/tmp/rooms-cluster}
rm -rf "$OUT"; mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_of() { redis-cli -p "$1" INFO cpu | awk -F: '/used_cpu_(user|sys):/{s+=$2} END{printf "%.3f", s}'; }
calls_of() { redis-cli -p "$1" INFO commandstats | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_evalsha:/{print $3; f=1} END{if(!f) print 0}'; }

PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
start_redis() { # port [cluster]
  local extra=()
  [ "${2:-}" = cluster ] && extra=(--cluster-enabled yes --cluster-config-file "$OUT/nodes-$1.conf" --cluster-port "$(free_port)")
  taskset -c 1 redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT" \
    "${extra[@]}" --logfile "$OUT/redis-$1.log" &
  PIDS+=($!)
  until redis-cli -p "$1" PING >/dev/null 2>&1; do sleep 0.1; done
}

ONE=$(free_port); start_redis "$ONE"
C=(); for i in 1 2 3; do p=$(free_port); start_redis "$p" cluster; C+=("$p"); done
redis-cli --cluster create 127.0.0.1:"${C[0]}" 127.0.0.1:"${C[1]}" 127.0.0.1:"${C[2]}" \
  --cluster-replicas 0 --cluster-yes >"$OUT/create.log"
until [ "$(redis-cli -p "${C[0]}" CLUSTER INFO | tr -d '\r' | grep -c cluster_state:ok)" = 1 ]; do sleep 0.1; done

run_one() { # mode rate
  local mode=$1 rate=$2 sp pid ports flags
  sp=$(free_port)
  case $mode in
    one) ports=("$ONE"); flags=(--redis "redis://127.0.0.1:$ONE"); redis-cli -p "$ONE" FLUSHALL >/dev/null ;;
    cluster)
      ports=("${C[@]}"); flags=(--redis-cluster "redis://127.0.0.1:${C[0]},redis://127.0.0.1:${C[1]}")
      for p in "${C[@]}"; do redis-cli -p "$p" FLUSHALL >/dev/null; done ;;
  esac
  local c0=() n0=()
  for p in "${ports[@]}"; do redis-cli -p "$p" CONFIG RESETSTAT >/dev/null; c0+=("$(cpu_of "$p")"); n0+=(0); done
  taskset -c 0 "$B/wsrelay" --listen "127.0.0.1:$sp" --threads 1 "${flags[@]}" 2>"$OUT/server.log" &
  pid=$!
  until (exec 3<>/dev/tcp/127.0.0.1/"$sp") 2>/dev/null; do sleep 0.05; done
  nice -n 10 taskset -c 1 "$B/wsrelay-load" --url "ws://127.0.0.1:$sp/r" -n $((2 * ROOMS)) -k "$ROOMS" \
    --rate "$rate" --size 64 --warmup 2s --duration "${SECS}s" --drain "$DRAIN" --server-pid "$pid" \
    --json > "$OUT/run.json" 2>"$OUT/load.log" || true
  # Threads of the server (CPU seconds), and reads paused by a full publish queue.
  local threads
  threads=$(for t in /proc/"$pid"/task/*; do echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done |
    awk -v hz="$(getconf CLK_TCK)" '$2 > 0 {s[$1] += $2} END {for (k in s) printf "%s=%.2fs ", k, s[k] / hz}')
  local pauses
  pauses=$( (exec 3<>/dev/tcp/127.0.0.1/"$sp" && printf 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' >&3 && cat <&3) |
    awk '/^wsrelay_publish_pauses_total/ {s += $2} END {print s + 0}')
  local per=""
  for i in "${!ports[@]}"; do
    local p=${ports[$i]} c1 n1
    c1=$(cpu_of "$p"); n1=$(calls_of "$p")
    per+="$p:$(echo "${c0[$i]} $c1 $n1" | awk '{printf "%d calls %.2f us/call", $3, ($2-$1)*1e6/($3>0?$3:1)}') "
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "  server threads: $threads publish pauses: $pauses" >&2
  python3 - "$OUT/run.json" "$mode" "$rate" "$per" <<'PY'
import json, re, sys
f, mode, rate, per = sys.argv[1:]
r = json.load(open(f))
p = r.get("publisher") or {}
l = r["latency"]
calls = [int(c) for c in re.findall(r":(\d+) calls", per)]
spread = f"{max(calls)/max(min(calls),1):.2f}" if calls else "-"
print(f"{mode:7} rate {int(rate):6} sent {p.get('sent',0)}/{p.get('scheduled',0)} received {r['counts']['received']}/{r['expected']} "
      f"lost {r['counts']['lost']} reordered {r['counts']['reordered']} dup {r['counts']['duplicates']} "
      f"p50 {l['p50_us']/1e3:.1f} ms p99 {l['p99_us']/1e3:.1f} ms | per Redis: {per}| max/min calls {spread}")
PY
}

for rate in $RATES; do
  for round in $(seq "$ROUNDS"); do
    echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
    for mode in one cluster; do
      echo -n "round $round: "
      run_one "$mode" "$rate"
    done
  done
done
