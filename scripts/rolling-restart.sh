#!/usr/bin/env bash
# Rolling restart and node crash behind HAProxy, measured: deploy/haproxy.cfg in front of three
# wsrelay nodes sharing one Redis, CLIENTS wsrelay.v1 clients with sessions on two of four
# channels each, a publisher publishing RATE messages a second through HAProxy. First every node
# in turn gets SIGTERM, exits and starts again on its ports; then, on a fresh cluster, the
# busiest node gets SIGKILL. Prints, per run: reconnect time p50/p99/max, clients moved, the
# peak connection rate a node saw, messages delivered and duplicates dropped, and fails if any
# client missed a message, saw one twice after the graceful restart, gave up, or was told
# recovered:false. It is tests/rolling.rs (which CI runs with 1,000 clients and short drains)
# in release mode with the numbers below.
#
#   scripts/rolling-restart.sh [CLIENTS] [RATE] [DRAIN_DELAY] [DRAIN_PERIOD]
#
# Defaults: 5000 clients, 50 messages a second, the shipped drain flags (5s, 10s). Needs
# haproxy (apt-get install haproxy) and redis-server. About 4,000 clients fit per 10,000 open
# files of the HAProxy process (two descriptors per client) and of this one.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH=$PATH:/usr/sbin:/sbin

export WSRELAY_ROLLING_CLIENTS=${1:-5000}
export WSRELAY_ROLLING_RATE=${2:-50}
export WSRELAY_ROLLING_DRAIN_DELAY=${3:-5s}
export WSRELAY_ROLLING_DRAIN_PERIOD=${4:-10s}
export WSRELAY_REQUIRE_DEPLOY=1

echo "machine: $(nproc) cores, $(uname -sr), open-file limit $(ulimit -n)"
echo "command: $0 $WSRELAY_ROLLING_CLIENTS $WSRELAY_ROLLING_RATE $WSRELAY_ROLLING_DRAIN_DELAY $WSRELAY_ROLLING_DRAIN_PERIOD"
cargo test --release --quiet --test rolling --no-run
# One scenario at a time, so that neither measures the other's load; node and HAProxy logs
# (lines starting with "[") are left out.
cargo test --release --quiet --test rolling -- --nocapture --test-threads 1 \
    rolling_restart_behind_haproxy node_crash_behind_haproxy 2>&1 | grep -v '^\['
