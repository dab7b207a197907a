#!/usr/bin/env python3
"""Starts a daemon and times it to ready, for benches/backlog.sh (see benches/README.md).

    ready_timer.py URL LOG PIDFILE TIMEOUT -- COMMAND [ARGS...]

Takes the time, starts COMMAND (fork + exec, its stdout and stderr appended to LOG, its pid
written to PIDFILE at once), then sends `GET URL` (e.g. http://127.0.0.1:8026/readyz) every
5 ms on a fixed schedule until one answers 200, COMMAND exits, or TIMEOUT seconds pass. Each
poll is a new TCP connection with a 1 s timeout; a refused connection (nothing listening yet)
and a 503 (listening, not ready) count as "not yet". Prints one line:

    ready_ms=<exec to first 200> listen_ms=<exec to first accepted connection> polls=<n> \
    pid=<pid> status=<ready|timeout|died>

and exits 0 (status ready) or 1, leaving COMMAND running: the caller stops it (by its pid).
Resolution: the poll interval (5 ms) plus one request's time.
"""

import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

INTERVAL = 0.005


def poll(host, port, path):
    """(connected, status or None) of one GET."""
    try:
        s = socket.create_connection((host, port), timeout=1.0)
    except OSError:
        return False, None
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n" not in buf and len(buf) < 1024:
            chunk = s.recv(1024)
            if not chunk:
                break
            buf += chunk
        parts = buf.split(b" ", 2)
        return True, int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except OSError:
        return True, None
    finally:
        s.close()


def main():
    if len(sys.argv) < 7 or sys.argv[5] != "--":
        sys.exit(__doc__)
    url, log, pidfile, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cmd = sys.argv[6:]
    u = urlsplit(url)
    host, port, path = u.hostname, u.port or 80, u.path or "/"
    out = open(log, "ab")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    with open(pidfile, "w") as f:
        f.write(f"{p.pid}\n")
    listen = None
    polls = 0
    status = "timeout"
    k = 0
    while True:
        now = time.monotonic()
        if now - t0 > timeout:
            break
        if p.poll() is not None:
            status = "died"
            break
        connected, code = poll(host, port, path)
        polls += 1
        t = time.monotonic()
        if connected and listen is None:
            listen = t
        if code == 200:
            status = "ready"
            break
        k += 1
        delay = t0 + k * INTERVAL - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            k = int((time.monotonic() - t0) / INTERVAL) + 1
    end = time.monotonic()
    ms = lambda t: f"{(t - t0) * 1000:.1f}" if t is not None else "?"
    print(f"ready_ms={ms(end) if status == 'ready' else '?'} listen_ms={ms(listen)} "
          f"polls={polls} pid={p.pid} status={status}", flush=True)
    sys.exit(0 if status == "ready" else 1)


if __name__ == "__main__":
    main()
