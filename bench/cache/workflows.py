#!/usr/bin/env python3
"""The clients of bench/cache.sh scenario 1: three workflows that each read
the same company records, within seconds of each other (the GTM
rate-limiting guide's "three workflows each fetch the same company record
within 5 s").

    workflows.py run URL_PREFIX --companies N [--workflows 3] [--threads T]
                 [--stagger S] [--max-lead L] [--within 5] [--max-seconds M]
                 [--echo-path PATH] [--hashes FILE] [--header 'Name: value']...
    workflows.py check URL_PREFIX --ids N --sample K --hashes FILE...
                 [--echo-path PATH] [--header 'Name: value']...

run: workflow w (0, 1, 2) starts w * S seconds after the first and reads
URL_PREFIX/<id> for every company id in the same order (ids 1000001 ..
1000000 + N), with T threads (each its own keep-alive http.client
connection) taking the next id of its workflow as it is free. A workflow
does not run more than L ids (default 100) ahead of the others: a thread
that took id i waits until every other workflow has taken id i - L (the
Python threads do not share the proxy's line evenly, and without this
bound the workflows drift seconds apart over a long run). So each record
is read three times, by three workflows, a moment apart; the script
measures how far apart (the spread from the first read's start to the
last's, per id) and counts the ids read more than --within seconds apart.

A response counts as its status, Content-Type and body (an SHA-1 of them).
Per id, the three are compared with each other; with --echo-path (the demo
upstream's JSON echo names the path it was asked for) each body must also
name PATH/<id>, so an answer for another record is caught even if all three
agree. --hashes writes "id hash" per id ("DIFFER ..." when the three do not
agree, "- " when one failed), for comparing passes.

check: reads --sample ids (spread over 1000001 .. 1000000 + N) once each,
one at a time, from URL_PREFIX (the gateway directly), and compares each
with every --hashes file. Prints one JSON object.

run prints one JSON object: requests, 2xx, failed, statuses, Tollgate-Cache
values seen, elapsed (the first start to the last end), p50/p99 per read,
the per-id spread (max, p99, ids over --within), and the comparison
(ids complete, identical, differing, naming another path).
"""
import argparse
import hashlib
import http.client
import itertools
import json
import sys
import threading
import time
from urllib.parse import urlsplit

FIRST_ID = 1000001


def parse_headers(pairs):
    headers = {}
    for h in pairs:
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    return headers


def digest(status, content_type, body):
    h = hashlib.sha1(f"{status}\n{content_type}\n".encode())
    h.update(body)
    return h.hexdigest()[:16]


def names_path(body, want):
    try:
        return json.loads(body).get("path") == want
    except (ValueError, AttributeError):
        return False


def run(a):
    u = urlsplit(a.url)
    host, port, prefix = u.hostname, u.port or 80, u.path.rstrip("/")
    headers = parse_headers(a.header)
    n, nw = a.companies, a.workflows
    start = [[None] * n for _ in range(nw)]
    hashes = [[None] * n for _ in range(nw)]
    path_ok = [[True] * n for _ in range(nw)]
    lock = threading.Lock()
    totals = {"ok": 0, "failed_status": 0, "failed_error": 0}
    statuses, cache, latencies, ends = {}, {}, [], [0.0]
    counters = [itertools.count() for _ in range(nw)]
    taken = [0] * nw  # ids each workflow has taken (its next id)
    barrier = threading.Barrier(nw * a.threads + 1)
    state = {"t0": 0.0}
    sys.setswitchinterval(0.0005)

    def worker(w):
        conn = http.client.HTTPConnection(host, port, timeout=a.timeout)
        mine = dict.fromkeys(totals, 0)
        seen, states, lat, last = {}, {}, [], 0.0
        barrier.wait()
        t0 = state["t0"]
        begin = t0 + w * a.stagger
        now = time.monotonic()
        if begin > now:
            time.sleep(begin - now)
        deadline = t0 + a.max_seconds
        while True:
            i = next(counters[w])
            if i >= n or time.monotonic() >= deadline:
                break
            taken[w] = max(taken[w], i + 1)
            while a.max_lead and min(taken[v] for v in range(nw) if v != w) < i - a.max_lead:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
            cid = FIRST_ID + i
            s = time.monotonic()
            start[w][i] = s - t0
            try:
                conn.request("GET", f"{prefix}/{cid}", headers=headers)
                r = conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=a.timeout)
                mine["failed_error"] += 1
                continue
            e = time.monotonic()
            lat.append(e - s)
            last = max(last, e)
            seen[r.status] = seen.get(r.status, 0) + 1
            tc = r.getheader("tollgate-cache") or "(none)"
            states[tc] = states.get(tc, 0) + 1
            if 200 <= r.status < 300:
                mine["ok"] += 1
                hashes[w][i] = digest(r.status, r.getheader("content-type"), body)
                if a.echo_path:
                    path_ok[w][i] = names_path(body, f"{a.echo_path}/{cid}")
            else:
                mine["failed_status"] += 1
        conn.close()
        with lock:
            for k, v in mine.items():
                totals[k] += v
            for k, v in seen.items():
                statuses[k] = statuses.get(k, 0) + v
            for k, v in states.items():
                cache[k] = cache.get(k, 0) + v
            latencies.extend(lat)
            ends.append(last - state["t0"] if last else 0.0)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True)
               for w in range(nw) for _ in range(a.threads)]
    for t in threads:
        t.start()
    state["t0"] = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join(a.max_seconds + 2 * a.timeout + nw * a.stagger)

    spreads, complete, identical, differ, wrong_path = [], 0, 0, 0, 0
    lines = []
    for i in range(n):
        starts = [start[w][i] for w in range(nw)]
        if all(s is not None for s in starts):
            spreads.append(max(starts) - min(starts))
        hs = [hashes[w][i] for w in range(nw)]
        if any(h is None for h in hs):
            lines.append(f"{FIRST_ID + i} -")
            continue
        complete += 1
        wrong_path += not all(path_ok[w][i] for w in range(nw))
        if len(set(hs)) == 1 and all(path_ok[w][i] for w in range(nw)):
            identical += 1
            lines.append(f"{FIRST_ID + i} {hs[0]}")
        else:
            differ += 1
            lines.append(f"{FIRST_ID + i} DIFFER:{','.join(hs)}")
    if a.hashes:
        with open(a.hashes, "w") as f:
            f.write("\n".join(lines) + "\n")
    lat = sorted(latencies)
    sp = sorted(spreads)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
    out = dict(totals)
    out.update(
        requests=sum(statuses.values()) + totals["failed_error"],
        expected=n * nw,
        failed=totals["failed_status"] + totals["failed_error"],
        statuses={str(k): v for k, v in sorted(statuses.items())},
        cache=dict(sorted(cache.items())),
        elapsed=round(max(ends), 3),
        p50_ms=round(pct(lat, 0.50) * 1e3, 2), p99_ms=round(pct(lat, 0.99) * 1e3, 2),
        spread_max_s=round(sp[-1], 3) if sp else None, spread_p99_s=round(pct(sp, 0.99), 3) if sp else None,
        over_within=sum(s > a.within for s in sp), within_s=a.within,
        ids=n, complete=complete, identical=identical, differ=differ, wrong_path=wrong_path,
        unfinished=sum(t.is_alive() for t in threads),
    )
    print(json.dumps(out))


def check(a):
    u = urlsplit(a.url)
    host, port, prefix = u.hostname, u.port or 80, u.path.rstrip("/")
    headers = parse_headers(a.header)
    files = []
    for name in a.hashes:
        with open(name) as f:
            files.append(dict(line.split(" ", 1) for line in f.read().splitlines() if line))
    step = max(1, a.ids // a.sample)
    ids = [FIRST_ID + i for i in range(0, a.ids, step)][: a.sample]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    same = [0] * len(files)
    fetched, wrong_path, mismatches = 0, 0, []
    for cid in ids:
        conn.request("GET", f"{prefix}/{cid}", headers=headers)
        r = conn.getresponse()
        body = r.read()
        if not 200 <= r.status < 300:
            mismatches.append(f"{cid}: direct answered {r.status}")
            continue
        fetched += 1
        if a.echo_path and not names_path(body, f"{a.echo_path}/{cid}"):
            wrong_path += 1
        h = digest(r.status, r.getheader("content-type"), body)
        for k, f in enumerate(files):
            if f.get(str(cid)) == h:
                same[k] += 1
            elif len(mismatches) < 5:
                mismatches.append(f"{cid}: direct {h}, {a.hashes[k]} {f.get(str(cid))}")
    conn.close()
    # pass against pass, over every id
    across = None
    if len(files) >= 2:
        across = sum(all(f.get(k) == v for f in files[1:]) and not v.startswith(("DIFFER", "-"))
                     for k, v in files[0].items())
    print(json.dumps(dict(sample=len(ids), fetched=fetched, same=same, wrong_path=wrong_path,
                          across_passes=across, ids=len(files[0]) if files else 0,
                          mismatches=mismatches)))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("url")
    r.add_argument("--companies", type=int, default=10000)
    r.add_argument("--workflows", type=int, default=3)
    r.add_argument("--threads", type=int, default=16)
    r.add_argument("--stagger", type=float, default=0.25)
    r.add_argument("--max-lead", type=int, default=100)
    r.add_argument("--within", type=float, default=5.0)
    r.add_argument("--max-seconds", type=float, default=300)
    r.add_argument("--timeout", type=float, default=40)
    r.add_argument("--echo-path", default="")
    r.add_argument("--hashes", default="")
    r.add_argument("--header", action="append", default=[])
    c = sub.add_parser("check")
    c.add_argument("url")
    c.add_argument("--ids", type=int, required=True)
    c.add_argument("--sample", type=int, default=50)
    c.add_argument("--echo-path", default="")
    c.add_argument("--hashes", action="append", default=[])
    c.add_argument("--header", action="append", default=[])
    a = ap.parse_args()
    run(a) if a.mode == "run" else check(a)


if __name__ == "__main__":
    main()
