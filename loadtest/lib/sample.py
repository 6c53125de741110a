#!/usr/bin/env python3
"""Samples a process tree's resources once per interval, for loadtest/run.sh.

Usage: python3 loadtest/lib/sample.py --out FILE.csv [--interval SECONDS] PID...

Each line of FILE.csv (after a header) is one sample of every given PID and all its descendants
(nginx's workers, Varnish's child, found through /proc/*/stat each time, so restarted children
are counted): unix time in seconds, resident memory in bytes (VmRSS summed), CPU time in seconds
(user + system, summed; processes that exited take their time with them, which is why targets are
roots that live through the run), open file descriptors (entries of /proc/PID/fd, summed) and the
number of processes. Runs until SIGTERM or SIGINT, or until every root is gone; each line is
flushed as it is written, so a killed sampler loses nothing it measured.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree(roots: list[int]) -> list[int]:
    kids = children_map()
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def one(pid: int) -> tuple[int, float, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z":
            return None
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        rss = 0
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, cpu, fds
    except (OSError, IndexError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description="Sample RSS, CPU and fds of process trees.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("pids", nargs="+", type=int)
    args = ap.parse_args()
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.out, "w", buffering=1) as out:
        out.write("unix_s,rss_bytes,cpu_s,fds,procs\n")
        nxt = time.monotonic()
        while not stop:
            rss = fds = procs = 0
            cpu = 0.0
            for pid in tree(args.pids):
                got = one(pid)
                if got:
                    rss += got[0]
                    cpu += got[1]
                    fds += got[2]
                    procs += 1
            if procs == 0:
                return 0
            out.write(f"{time.time():.3f},{rss},{cpu:.2f},{fds},{procs}\n")
            nxt += args.interval
            time.sleep(max(0.0, nxt - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
