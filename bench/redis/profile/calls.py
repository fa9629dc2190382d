#!/usr/bin/env python3
"""RESP commands for bench/redis/profile/instructions.sh: FUNCTION LOAD of
decide.lua (or of any library written like it: it registers the function
named TOLLGATE_FUNCTION), then CALLS FCALLs of BATCH decisions each, over
1,000 keys in turn, every decision one slot with SPEC and cost 1, at Redis
TIME (decide.lua's header has the argument layout).

    calls.py LIBRARY.lua OUT.resp BATCH CALLS SPEC
"""
import sys

source, out_path, batch, calls, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
out = open(out_path, "wb")


def command(*args):
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    out.write(b"*%d\r\n" % len(parts))
    for p in parts:
        out.write(b"$%d\r\n%s\r\n" % (len(p), p))


library = "#!lua name=bench\n" + open(source).read().replace("TOLLGATE_FUNCTION", "bench")
command("FUNCTION", "LOAD", "REPLACE", library)
k = 0
for _ in range(calls):
    keys, args = [], []
    for _ in range(batch):
        keys.append("bench:k%d" % (k % 1000))
        k += 1
        args += ["d1", spec, "1"]
    command("FCALL", "bench", len(keys), *keys, *args)
