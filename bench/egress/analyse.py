#!/usr/bin/env python3
"""Figures for bench/egress.sh.

  analyse.py summary RUN_STDOUT
      The runner's summary line as shell assignments (done= dead= retried=
      throttled= calls= elapsed_s= util=).
  analyse.py gateway ACCESS_LOG PATH_PREFIX
      From the gateway's JSON access log, the requests under PATH_PREFIX:
      count, 2xx, 429, first/last timestamp (as shell assignments).
  analyse.py shared SHAPE ACCESS_LOG OHA_JSON RUNNER_PREFIX OTHER_PREFIX
      Scenario 2 (as shell assignments): SHAPE is fixed:QUOTA:EVERY_S or bucket:CAPACITY:RATE_PER_S.
      The other client's admitted (2xx) rate o comes from oha's own status
      counts over its duration. What is left for the runner is the allowed
      rate minus o; utilisation is the runner's admitted rate over that:
        fixed windows: runner 2xx per window over the windows it used whole
          (its first and last window left out: partial), / (QUOTA - o*EVERY);
        bucket: the least time the left rate allows for the runner's calls
          past the burst, (runner 2xx - CAPACITY) / (RATE - o), over the time
          from its first to its last request (gateway log).
      The same with o measured by the gateway's log over the very windows
      (or span) the runner's rate is measured on: sh_util_log. oha runs a
      little longer than the runner (it starts first), and is admitted more
      while the runner is not there, so the two differ; the verdict takes the
      lower (sh_util_min).
"""
import json
import math
import re
import sys
from datetime import datetime


def ts(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def summary(path):
    text = open(path).read()
    m = re.search(r"tollgate run: done (\d+), dead-lettered (\d+), retried (\d+), 429s received (\d+), "
                  r"calls (\d+), elapsed ([^,]+), ([\d.]+) calls/min, quota utilisation ([\d.]+%|n/a)", text)
    if not m:
        print("summary_ok=0")
        return
    el = m.group(6)
    secs = 0.0
    for num, unit in re.findall(r"([\d.]+)([hms])", el):
        secs += float(num) * {"h": 3600, "m": 60, "s": 1}[unit]
    util = m.group(8).rstrip("%")
    print(f"summary_ok=1 done={m.group(1)} dead={m.group(2)} retried={m.group(3)} throttled={m.group(4)} "
          f"calls={m.group(5)} elapsed_s={secs} elapsed_h='{el}' per_min={m.group(7)} util={util}")


def requests(log, prefix):
    out = []
    for line in open(log):
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if d.get("path", "").startswith(prefix):
            out.append((ts(d["ts"]), int(d["status"])))
    out.sort()
    return out


def gateway(log, prefix):
    r = requests(log, prefix)
    ok = sum(1 for _, s in r if 200 <= s < 300)
    t429 = sum(1 for _, s in r if s == 429)
    first, last = (r[0][0], r[-1][0]) if r else (0, 0)
    print(f"gw_count={len(r)} gw_2xx={ok} gw_429={t429} gw_span={last - first:.3f}")


def shared(shape, log, oha_json, runner_prefix, other_prefix):
    kind, a, b = shape.split(":")
    a, b = float(a), float(b)
    oha = json.load(open(oha_json))
    codes = oha.get("statusCodeDistribution", {})
    o_ok = sum(v for k, v in codes.items() if k.startswith("2"))
    o_429 = codes.get("429", 0)
    o_secs = oha["summary"]["total"]
    o = o_ok / o_secs
    run = requests(log, runner_prefix)
    other = requests(log, other_prefix)
    r_ok = [t for t, s in run if 200 <= s < 300]
    r_429 = sum(1 for _, s in run if s == 429)
    first, last = run[0][0], run[-1][0]
    span = last - first
    other_in = sum(1 for t, s in other if first <= t <= last and 200 <= s < 300)
    o_log = other_in / span if span > 0 else 0
    if kind == "fixed":
        quota, every = a, b
        allowed = quota / every
        w = lambda t: math.floor(t / every)
        wins = {}
        for t in r_ok:
            wins[w(t)] = wins.get(w(t), 0) + 1
        keys = range(w(first) + 1, w(last))
        whole = [wins.get(k, 0) for k in keys]
        got = sum(whole) / (len(whole) * every) if whole else float("nan")
        left = allowed - o
        util = got / left
        # The other client's 2xx in those same windows (gateway log).
        o_log = (sum(1 for t, s in other if w(t) in keys and 200 <= s < 300) / (len(whole) * every)
                 if whole else float("nan"))
        how = f"{len(whole)} whole windows, runner {got:.1f}/s"
    else:
        cap, rate = a, b
        allowed = rate
        left = rate - o
        ideal = max(len(r_ok) - cap, 0) / left
        util = ideal / span if span > 0 else float("nan")
        got = max(len(r_ok) - cap, 0) / span
        ideal_log = max(len(r_ok) - cap, 0) / (rate - o_log)
        how = f"past the burst of {cap:.0f}: runner {got:.1f}/s over {span:.1f} s"
    if kind == "fixed":
        left_log = allowed - o_log
        util_log = got / left_log
    else:
        left_log = rate - o_log
        util_log = ideal_log / span if span > 0 else float("nan")
    print(f"sh_left_log={left_log:.1f} sh_util_log={100 * util_log:.1f} sh_util_min={100 * min(util, util_log):.1f}")
    print(f"sh_o={o:.1f} sh_o_log={o_log:.1f} sh_o_ok={o_ok} sh_o_429={o_429} sh_o_secs={o_secs:.1f} "
          f"sh_allowed={allowed:.0f} sh_left={left:.1f} sh_got={got:.1f} sh_util={100 * util:.1f} "
          f"sh_r_ok={len(r_ok)} sh_r_429={r_429} sh_span={span:.2f} sh_how='{how}'")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"summary": summary, "gateway": gateway, "shared": shared}[cmd](*args)
