#!/usr/bin/env bash
# Side by side: the same load, from the same generator, against wsrelay and against the Node
# `ws` + `redis` baseline (shared/baseline/node-ws-redis), in one run, through one Redis.
# Server on CPU 0, generator and Redis on CPU 1. Prints each report and the ratios.
#
#   scripts/compare-baseline.sh [BASELINE_DIR] [RATE] [SUBSCRIBERS] [SECONDS]
#
# Defaults: ../shared/baseline/node-ws-redis, 100 msg/s, 1000 subscribers, 10 s. Needs node and
# npm (the baseline's two packages are installed into a temporary copy, not into the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${1:-../shared/baseline/node-ws-redis}
rate=${2:-100}
subs=${3:-1000}
secs=${4:-10}

cargo build --release --quiet
B=$PWD/target/release
work=$(mktemp -d)
cleanup() {
    [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null
    [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

cp "$baseline"/package.json "$baseline"/ws_server.js "$work"/
(cd "$work" && npm install --silent --no-audit --no-fund >/dev/null)

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(port)
taskset -c 1 redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.1; done
R=redis://127.0.0.1:$rport

# run NAME URL: one generator run against the server whose pid is $srv.
run() {
    taskset -c 1 "$B/wsrelay-load" --url "$2" -n "$subs" --rate "$rate" --size 64 --warmup 2s \
        --duration "${secs}s" --drain 30s --server-pid "$srv" --json >"$work/$1.json" 2>"$work/$1.log" || true
    echo "== $1"
    python3 - "$work/$1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["counts"]; lat = r.get("latency") or {}
print(f"  delivered {c['received']} of {r['expected']}, lost {c['lost']}, reordered {c['reordered']}")
print(f"  deliveries per server CPU-second {r.get('deliveries_per_server_cpu_sec') or 0:.0f}")
print(f"  latency p50 {lat.get('p50_us', 0) / 1000:.1f} ms, p99 {lat.get('p99_us', 0) / 1000:.1f} ms")
print(f"  server RSS per connection {r.get('rss_bytes_per_connection') or 0:.0f} B")
EOF
}

wport=$(port)
taskset -c 0 "$B/wsrelay" --threads 1 --listen "127.0.0.1:$wport" --redis "$R" --log-level warn &
srv=$!
until curl -sf "http://127.0.0.1:$wport/healthz" >/dev/null; do sleep 0.1; done
run wsrelay "ws://127.0.0.1:$wport/"
kill -INT "$srv"; wait "$srv" 2>/dev/null || true # SIGINT: no drain delay, nothing to drain

nport=$(port)
REDIS_URL=$R taskset -c 0 node "$work/ws_server.js" "$nport" >/dev/null &
srv=$!
until (echo > "/dev/tcp/127.0.0.1/$nport") 2>/dev/null; do sleep 0.1; done
sleep 1 # the baseline subscribes to Redis after it starts listening
run node "ws://127.0.0.1:$nport/"
kill "$srv"; wait "$srv" 2>/dev/null || true
srv=

python3 - "$work/wsrelay.json" "$work/node.json" <<'EOF'
import json, sys
w, n = (json.load(open(p)) for p in sys.argv[1:])
def ratio(a, b):
    return f"{a / b:.1f}x" if a and b else "n/a"
wl, nl = w.get("latency") or {}, n.get("latency") or {}
print("== wsrelay / node")
print(f"  deliveries per server CPU-second: {ratio(w.get('deliveries_per_server_cpu_sec'), n.get('deliveries_per_server_cpu_sec'))}")
print(f"  p99 latency, node / wsrelay: {ratio(nl.get('p99_us'), wl.get('p99_us'))}")
print(f"  RSS per connection, node / wsrelay: {ratio(n.get('rss_bytes_per_connection'), w.get('rss_bytes_per_connection'))}")
EOF
