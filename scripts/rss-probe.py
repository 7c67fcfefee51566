#!/usr/bin/env python3
"""Peak memory of a fan-out to clients that never read, against --loop-output-budget.

Starts a wsrelay (in-process broker, history off), connects SUBS raw clients to one channel
with a small receive window that stop reading once they are subscribed, then one publisher
sends MSGS messages of SIZE bytes to the channel as fast as it can (a thread drains what the
server sends back to it). VmRSS is sampled every 5 ms from /proc while the burst runs and for
a while after; VmHWM at the end is the peak.

    cargo build --release
    scripts/rss-probe.py                      # defaults: 50 subscribers, 300 x 64 KiB, 16 MiB budget
    SUBS=50 MSGS=300 SIZE=65536 BUDGET=16777216 EXTRA="--threads 2" scripts/rss-probe.py

Environment: B (target/release), SUBS, MSGS, SIZE, BUDGET, RCVBUF (4096), EXTRA (more flags),
SETTLE (seconds to keep sampling after the last send, 3).
"""
import base64
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

B = os.environ.get("B", "target/release")
SUBS = int(os.environ.get("SUBS", "50"))
MSGS = int(os.environ.get("MSGS", "300"))
SIZE = int(os.environ.get("SIZE", "65536"))
BUDGET = int(os.environ.get("BUDGET", str(16 << 20)))
RCVBUF = int(os.environ.get("RCVBUF", "4096"))
EXTRA = os.environ.get("EXTRA", "").split()
SETTLE = float(os.environ.get("SETTLE", "3"))
CHANNEL = "probe"


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def frame(payload, opcode=0x1):
    """A masked client frame (key 0, so the payload goes as it is)."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + b"\0\0\0\0" + payload


def read_frame(sock):
    """One server frame: (opcode, payload)."""
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("closed")
            buf += chunk
        return buf
    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", exact(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(8))[0]
    return b0 & 0x0F, exact(n)


def connect(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /{CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        # One byte at a time: nothing after the head may be consumed here.
        c = s.recv(1)
        if not c:
            raise EOFError("handshake refused")
        head += c
    assert head.startswith(b"HTTP/1.1 101"), head
    # Subscribed once its own message comes back (a raw client's first message is read only
    # after its channel is live).
    s.sendall(frame(b"ready"))
    while read_frame(s) != (0x1, b"ready"):
        pass
    return s


def metric(port, name):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        body += c
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\d+)", body.decode(), re.M)
    return int(m.group(1)) if m else None


def main():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cmd = [f"{B}/wsrelay", "--listen", f"127.0.0.1:{port}", "--loop-output-budget", str(BUDGET),
           "--history-size", "0", "--log-level", "warn"] + EXTRA
    srv = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    warnings = []
    threading.Thread(target=lambda: warnings.extend(srv.stderr), daemon=True).start()
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("server did not start")
            time.sleep(0.02)
    pid = srv.pid
    try:
        base_idle = status_kib(pid, "VmRSS")
        subs = [connect(port, RCVBUF) for _ in range(SUBS)]
        pub = connect(port)
        base = status_kib(pid, "VmRSS")
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], status_kib(pid, "VmRSS"))
                except OSError:
                    return
                time.sleep(0.005)

        def drain():
            try:
                while pub.recv(1 << 20):
                    pass
            except OSError:
                pass

        sampler = threading.Thread(target=sample)
        sampler.start()
        threading.Thread(target=drain, daemon=True).start()
        body = b"x" * SIZE
        t0 = time.time()
        for i in range(MSGS):
            pub.sendall(frame(body, 0x2))
        sent = time.time() - t0
        time.sleep(SETTLE)
        after = status_kib(pid, "VmRSS")
        done.set()
        sampler.join()
        hwm = status_kib(pid, "VmHWM")
        closes = metric(port, "wsrelay_slow_consumer_closes_total")
        threads = len(os.listdir(f"/proc/{pid}/task"))
        print(f"subscribers {SUBS}, {MSGS} x {SIZE} B, budget {BUDGET} B, flags {' '.join(EXTRA) or '-'}")
        print(f"RSS KiB: started {base_idle}, connected {base}, peak sampled {peak[0]}, "
              f"VmHWM {hwm}, {SETTLE:.0f} s after {after}; growth to VmHWM {hwm - base} KiB "
              f"({(hwm - base) / 1024:.1f} MiB); sent in {sent:.2f} s; slow-consumer closes {closes}; "
              f"threads {threads}")
        for s in subs:
            s.close()
        pub.close()
    finally:
        srv.terminate()
        srv.wait()
    for w in warnings[:3]:
        print("  log:", w.rstrip()[:200])
    if len(warnings) > 3:
        print(f"  log: ... {len(warnings) - 3} more lines")


if __name__ == "__main__":
    main()
