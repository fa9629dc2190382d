#!/usr/bin/env python3
"""bench/redis.sh's helpers: read Redis's statistics and the bench's output.

  stats.py roundtrips COMMANDSTATS MONITOR DECISIONS CALLS
      Commands per decision: every command that reached Redis between
      CONFIG RESETSTAT and the end of the run (INFO commandstats), split by
      MONITOR into those a client sent (one round trip each, or part of
      one pipeline) and those decide.lua ran inside Redis. Prints a report
      and, last, "fcall_per_decision=X client_other=Y"; exits 1 when a
      decision took anything but exactly one FCALL.
  stats.py server COMMANDSTATS DECISIONS
      "calls_per_decision=... usec_per_decision=... detail=cmd:calls/usec,..."
      for one throughput run.
  stats.py kv FILE KEY
      The value of KEY in a "k=v k=v" line.
"""
import re
import sys
from collections import Counter


def commandstats(path):
    """{command: (calls, usec, failed+rejected)} from INFO commandstats."""
    out = {}
    for line in open(path):
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+),.*?rejected_calls=(\d+),failed_calls=(\d+)", line)
        if m:
            out[m[1]] = (int(m[2]), int(m[3]), int(m[4]) + int(m[5]))
    return out


def monitor(path):
    """Counters of (source, command) from MONITOR lines. Source is 'lua' for
    commands decide.lua ran, 'client' for those of the connections that sent
    FCALL (the bench's pool), 'other' for other connections (this script's
    redis-cli: its INFO can reach the feed before MONITOR is gone)."""
    lines = []
    for line in open(path, errors="replace"):
        m = re.match(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
        if m:
            lines.append((m[1].split()[-1], m[2].lower()))
    ours = {src for src, cmd in lines if cmd == "fcall"}
    seen = Counter()
    for src, cmd in lines:
        seen[("lua" if src == "lua" else "client" if src in ours else "other", cmd)] += 1
    return seen


def roundtrips(stats_path, monitor_path, decisions, calls):
    """Every decision took one call: the client's count of script calls is
    the server's count of FCALL, no more calls than decisions (several
    decisions queued together share one), nothing else sent."""
    stats, mon = commandstats(stats_path), monitor(monitor_path)
    n, sent = int(decisions), int(calls)
    ok = True
    client = {c: k for (s, c), k in mon.items() if s == "client"}
    lua = {c: k for (s, c), k in mon.items() if s == "lua"}
    fcall_calls, _, fcall_failed = stats.get("fcall", (0, 0, 0))
    fcall_ok = fcall_calls - fcall_failed
    print(f"    INFO commandstats after {n:,} decisions (all commands, clients' and the script's):")
    for cmd, (calls, usec, failed) in sorted(stats.items()):
        print(f"      {cmd:<16} {calls:>8,} calls = {calls / n:6.3f} per decision, "
              f"{usec / max(calls, 1):7.2f} us each" + (f", {failed} failed" if failed else ""))
    print("    MONITOR, by who sent them:")
    for (source, cmd), k in sorted(mon.items()):
        print(f"      {source:<6} {cmd:<16} {k:>8,} = {k / n:6.3f} per decision")
    other = sum(k for c, k in client.items() if c != "fcall")
    if fcall_ok != sent or fcall_failed or sent > n or sent == 0:
        print(f"    FAIL: {fcall_ok:,} successful FCALL for {n:,} decisions in {sent:,} calls "
              f"({fcall_failed} failed)")
        ok = False
    if client.get("fcall", 0) != fcall_calls:
        print(f"    FAIL: MONITOR saw {client.get('fcall', 0):,} FCALL from clients, commandstats {fcall_calls:,}")
        ok = False
    if other:
        print(f"    FAIL: clients sent {other:,} commands besides FCALL")
        ok = False
    inner = sum(lua.values())
    print(f"    inside the script: {inner / n:.2f} commands per decision ({', '.join(f'{c} {k / n:.2f}' for c, k in sorted(lua.items()))})")
    print(f"    {n / max(sent, 1):.2f} decisions per call")
    print(f"fcall_per_decision={fcall_ok / n:.4f} client_other={other} inner_per_decision={inner / n:.2f}")
    return 0 if ok else 1


def server(stats_path, decisions):
    stats = commandstats(stats_path)
    n = max(int(decisions), 1)
    calls = sum(c for cmd, (c, _, _) in stats.items() if not cmd.startswith("config"))
    # A script's usec includes the commands it ran (INCRBY among them, for a
    # fixed window): count top-level commands only, the script's calls when
    # there are any, else the envoy-style client's INCRBY + EXPIRE.
    scripts = ("fcall", "evalsha")
    top = {cmd: v for cmd, v in stats.items()
           if cmd in (scripts if any(c in stats for c in scripts) else ("incrby", "expire"))}
    usec = sum(u for _, u, _ in top.values())
    detail = ",".join(f"{cmd}:{c / n:.2f}x{u / max(c, 1):.2f}us" for cmd, (c, u, _) in sorted(top.items()))
    print(f"calls_per_decision={calls / n:.2f} usec_per_decision={usec / n:.2f} detail={detail}")


def kv(path, key):
    for line in open(path):
        for part in line.split():
            k, _, v = part.partition("=")
            if k == key:
                print(v)
                return 0
    return 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit({"roundtrips": roundtrips, "server": server, "kv": kv}[cmd](*args) or 0)
