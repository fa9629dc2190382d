#!/usr/bin/env python3
"""CPU used by user processes outside the benchmark, between two snapshots.

    foreign_cpu.py snap FILE ROOT_PID   # record utime+stime of every process
                                        # that is not ROOT_PID or below it
    foreign_cpu.py diff BEFORE AFTER    # print that CPU as % of one core

On a shared 2-core machine another build or test run changes every figure;
this says how much of that happened during a measured run. Processes that
start and end between the two snapshots are not seen (a lower bound).
"""
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def scan():
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        # fields after the command: state ppid ... utime(14th overall) stime(15th)
        ppid, utime, stime, start = int(rest[1]), int(rest[11]), int(rest[12]), int(rest[19])
        procs[int(name)] = (ppid, utime + stime, start)
    return procs


def snap(path, root):
    procs = scan()
    ours = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    # Kernel threads (kthreadd's children) are left out: ksoftirqd and the
    # like mostly carry the benchmark's own loopback traffic.
    foreign = {f"{pid}:{start}": cpu for pid, (ppid, cpu, start) in procs.items()
               if pid not in ours and pid != 2 and ppid != 2}
    with open(path, "w") as f:
        json.dump({"t": time.monotonic(), "cpu": foreign}, f)


def diff(before, after):
    a, b = json.load(open(before)), json.load(open(after))
    ticks = sum(cpu - a["cpu"].get(k, 0) for k, cpu in b["cpu"].items())
    secs = max(b["t"] - a["t"], 1e-6)
    print(f"{100 * ticks / TICK / secs:.0f}")


if __name__ == "__main__":
    if sys.argv[1] == "snap":
        snap(sys.argv[2], int(sys.argv[3]))
    else:
        diff(sys.argv[2], sys.argv[3])
