#!/usr/bin/env python3
"""Watches smtp-sink's message counter for benches/delivery.sh (see benches/README.md).

`smtp-sink -c` writes `sess=S quit=Q mesg=M\\r` to its stdout after every session end, QUIT
and message. This helper reads the tail of that file every INTERVAL seconds (one process, no
forks: the machine has two cores shared by the sink, verigate and the client) and reports:

    first=<t> c_first=<n> last=<t> c_last=<n> status=<done|timeout|window|died> \
    vg_first=<ticks> vg_last=<ticks> sink_first=<ticks> sink_last=<ticks> \
    busy_first=<ticks> busy_last=<ticks> wr_first=<ticks> wr_last=<ticks> \
    c_at_skip=<n> t_at_skip=<t>

- first: when the counter was first seen above BASELINE (the first delivery, ±INTERVAL);
  c_first the counter then. last / c_last: when it was first seen at or above TARGET (status
  done), or when the watch ended for another reason.
- the *_first / *_last tick values are utime+stime of the verigate and sink processes, of
  verigate's store writer thread (`verigate-store-writer`, wr_*) and the machine's busy ticks
  (/proc/stat) sampled at those two instants, so CPU use is measured over exactly the delivery
  window.
- WINDOW > 0 ends the watch WINDOW seconds after `first` (status window): the paced run.
- SKIP > 0 also reports the counter SKIP seconds after `first` (c_at_skip, t_at_skip), so the
  paced rate can be computed without the initial burst.
- status died: the verigate process went away.

Every change of the counter is appended to TRACE as `t count` (for a rate-over-time look).

VG_PID may be `@FILE`: the watcher then creates TRACE.ready once it is watching and reads the
verigate pid from FILE as soon as it appears there. delivery.sh starts the watcher first and
verigate after TRACE.ready: a daemon with a backlog delivers its first hundreds of mails within
milliseconds of starting, faster than a Python process starts.

usage: delivery_watch.py SINK_OUT BASELINE TARGET TIMEOUT WINDOW SKIP VG_PID SINK_PID TRACE
"""

import os
import sys
import time

INTERVAL = 0.02


def count(fd):
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    tail = os.pread(fd, 160, max(0, size - 160)).decode("ascii", "replace")
    i = tail.rfind("mesg=")
    if i < 0:
        return 0
    digits = ""
    for ch in tail[i + 5:]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits or 0)


def ticks(pid, tid=None):
    if pid is None:
        return -1
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return -1


def writer_tid(pid):
    """The tid of verigate's store writer thread (its name is cut to 15 characters), or None."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("verigate-store"):
                    return tid
    except OSError:
        pass
    return None


def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal


def main():
    (sink_out, baseline, target, timeout, window, skip, vg_pid, sink_pid, trace) = sys.argv[1:10]
    baseline, target = int(baseline), int(target)
    timeout, window, skip = float(timeout), float(window), float(skip)
    fd = os.open(sink_out, os.O_RDONLY)
    out = open(trace, "a")
    pid_file = None
    if vg_pid.startswith("@"):
        pid_file, vg_pid = vg_pid[1:], None
        open(trace + ".ready", "w").close()
    start = time.time()
    first = c_first = None
    at_skip = None
    snap_first = (0, 0, 0, -1)
    wtid = None
    prev = -1
    status = "timeout"
    while True:
        now = time.time()
        if vg_pid is None:
            try:
                with open(pid_file) as f:
                    vg_pid = f.read().strip() or None
            except OSError:
                pass
        c = count(fd)
        if c != prev:
            out.write(f"{now:.3f} {c}\n")
            prev = c
        if first is None and c > baseline:
            first, c_first = now, c
            wtid = writer_tid(vg_pid) if vg_pid else None
            snap_first = (ticks(vg_pid), ticks(sink_pid), busy(), ticks(vg_pid, wtid) if wtid else -1)
        if first is not None and skip > 0 and at_skip is None and now - first >= skip:
            at_skip = (now, c)
        if c >= target:
            status = "done"
            break
        if first is not None and window > 0 and now - first >= window:
            status = "window"
            break
        if now - start >= timeout:
            break
        if vg_pid is not None and ticks(vg_pid) < 0:
            status = "died"
            break
        time.sleep(INTERVAL)
    snap_last = (ticks(vg_pid), ticks(sink_pid), busy(), ticks(vg_pid, wtid) if wtid else -1)
    out.close()
    if first is None:
        first, c_first = now, baseline
    if at_skip is None:
        at_skip = (first, c_first)
    print(
        f"first={first:.3f} c_first={c_first} last={now:.3f} c_last={c} status={status} "
        f"vg_first={snap_first[0]} vg_last={snap_last[0]} "
        f"sink_first={snap_first[1]} sink_last={snap_last[1]} "
        f"busy_first={snap_first[2]} busy_last={snap_last[2]} "
        f"wr_first={snap_first[3]} wr_last={snap_last[3]} "
        f"t_at_skip={at_skip[0]:.3f} c_at_skip={at_skip[1]}"
    )


if __name__ == "__main__":
    main()
