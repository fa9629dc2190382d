#!/usr/bin/env python3
"""Summarise bench/engine.sh's runs: tollgate vs governor, with ratios.

Usage:
  summary.py collect CRITERION_DIR BEST_JSON   fold the latest criterion run into BEST_JSON
  summary.py report BEST_JSON MEMORY_TXT RUNS  print the table
"""
import glob
import json
import os
import re
import sys


def collect(criterion_dir, best_path):
    """Keep each id's best headline figure (criterion's slope, else mean), in ns."""
    best = json.load(open(best_path)) if os.path.exists(best_path) else {}
    for path in glob.glob(os.path.join(criterion_dir, "*", "*", "new", "estimates.json")):
        group, name = path.split(os.sep)[-4:-2]
        with open(path) as f:
            est = json.load(f)
        v = (est.get("slope") or est["mean"])["point_estimate"]
        key = f"{group}/{name}"
        best[key] = min(v, best.get(key, v))
    with open(best_path, "w") as f:
        json.dump(best, f, indent=1)


def fmt(v):
    if v is None:
        return "-"
    return f"{v / 1000:.2f} µs" if v >= 1000 else f"{v:.1f} ns"


def report(best_path, memory_out, runs):
    best = json.load(open(best_path))

    def ns(group, name):
        return best.get(f"{group}/{name}")

    rows = []  # (case, governor, tollgate, target ratio or None)
    def row(case, gov, tg, target=None):
        rows.append((case, gov, tg, target))

    D, K, T, A = "a_direct", "b_keyed_10k", "c_keyed_10k_2threads", "d_algorithms_10k"
    gov_keyed = ns(K, "governor")
    row("a. one key, 1 thread: DirectLimiter", ns(D, "governor"), ns(D, "tollgate"))
    row("a. one key, 1 thread: MemoryStore::decide", ns(D, "governor"), ns(D, "tollgate_store"))
    row("a. one key, 1 thread: Engine::check_into", ns(D, "governor"), ns(D, "tollgate_engine"))
    row("a. one key, denial path", ns(D, "governor_deny"), ns(D, "tollgate_deny"))
    # (issue 20's target for a keyed bucket: governor's time or less; each algorithm <= 2x)
    row("b. 10k keys, 1 thread: decide, 1 token bucket", gov_keyed, ns(K, "tollgate"), 1.0)
    row("b. 10k keys, 1 thread: Engine::check_into", gov_keyed, ns(K, "tollgate_engine"))
    row("c. 10k keys, 2 threads (wall ns/decision)", ns(T, "governor"), ns(T, "tollgate"))
    for algo in ["token_bucket", "leaky_bucket", "fixed_window", "fixed_window_amsterdam",
                 "sliding_window", "tiered", "concurrency"]:
        label = "concurrency (acquire+finish)" if algo == "concurrency" else algo
        row(f"d. 10k keys: {label}", gov_keyed, ns(A, algo), 2.0)

    print()
    print(f"time per decision, best of {runs} run(s); ratio = tollgate / governor")
    print(f"{'case':<52} {'governor':>10} {'tollgate':>10} {'ratio':>7}  target")
    for case, gov, tg, target in rows:
        ratio = tg / gov if gov and tg else None
        verdict = ""
        if target is not None and ratio is not None:
            verdict = f"<= {target:g}x " + ("met" if ratio <= target else "MISSED")
        r = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{case:<52} {fmt(gov):>10} {fmt(tg):>10} {r:>7}  {verdict}")

    one, three = ns(A, "token_bucket"), ns(A, "three_limits")
    if one and three:
        ratio = three / one
        print(f"{'d. 3 limits (tb+fw+sw) vs 1 token bucket':<52} {fmt(one):>10} {fmt(three):>10} "
              f"{ratio:>6.2f}x  <= 3x {'met' if ratio <= 3 else 'MISSED'}")
    g2, t2 = ns(T, "governor"), ns(T, "tollgate")
    if g2 and t2:
        print(f"\n2 threads: governor {1e9 / g2 / 1e6:.2f} M decisions/s, "
              f"tollgate {1e9 / t2 / 1e6:.2f} M decisions/s "
              f"(tollgate/governor throughput {g2 / t2:.2f}, >= 1.0 "
              f"{'met' if g2 / t2 >= 1.0 else 'MISSED'})")

    mem, uuid = {}, {}
    with open(memory_out) as f:
        for line in f:
            m = re.match(r"RESULT memory/(\w+) heap_bytes_per_key=([\d.]+) rss_bytes_per_key=([\d.]+)", line)
            if m:
                mem[m.group(1)] = (float(m.group(2)), float(m.group(3)))
            # the table's row of 36-byte keys (a UUID each): `STORE uuid COUNT HEAP RSS`
            m = re.match(r"(\w+)\s+uuid\s+\d+\s+([\d.]+)\s+([\d.]+)", line)
            if m:
                uuid[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    if "tollgate" in mem and "governor" in mem:
        (th, tr), (gh, gr) = mem["tollgate"], mem["governor"]
        print(f"\nmemory, 1,000,000 token-bucket keys   {'governor':>10} {'tollgate':>10} {'ratio':>7}  target")
        print(f"{'  heap bytes/key (requested)':<38} {gh:>10.1f} {th:>10.1f} {th / gh:>6.2f}x  "
              f"<= 128 B {'met' if th <= 128 else 'MISSED'}")
        print(f"{'  resident bytes/key (RSS growth)':<38} {gr:>10.1f} {tr:>10.1f} {tr / gr:>6.2f}x  "
              f"<= 128 B {'met' if tr <= 128 else 'MISSED'}")
    if "tollgate" in uuid and "governor" in uuid:
        # (issue 20's target is for 36-byte keys, counted on the heap; the RSS also
        # pays the allocator's rounding of each key string, governor's too)
        (th, tr), (gh, gr) = uuid["tollgate"], uuid["governor"]
        print(f"{'  36-byte keys: heap bytes/key':<38} {gh:>10.1f} {th:>10.1f} {th / gh:>6.2f}x  "
              f"<= 128 B {'met' if th <= 128 else 'MISSED'}")
        print(f"{'  36-byte keys: resident bytes/key':<38} {gr:>10.1f} {tr:>10.1f} {tr / gr:>6.2f}x  "
              f"<= 128 B {'met' if tr <= 128 else 'MISSED'}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "collect":
        collect(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
