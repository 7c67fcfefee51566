# Shared by the measurement scripts (sourced): a free port, and waiting for a quiet machine.
# wait_quiet waits, up to QUIET_MAX seconds (default 1200), for the 1-minute load average to
# stay below 0.3 for 30 s, and prints how quiet it was.
QUIET_MAX=${QUIET_MAX:-1200}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_quiet() {
  local start=$SECONDS calm=0 load
  while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" 'BEGIN{exit !(l < 0.3)}'; then calm=$((calm + 5)); else calm=0; fi
    if [ $calm -ge 30 ]; then echo "quiet: load $load for 30 s (waited $((SECONDS - start)) s)"; return; fi
    if [ $((SECONDS - start)) -ge "$QUIET_MAX" ]; then echo "NOT quiet after $QUIET_MAX s: load $load"; return; fi
    sleep 5
  done
}

