#!/usr/bin/env python3
"""The producers and the live client of bench/coordinator.sh.

    drive.py intake PROXY VENDOR --jobs N --batch B
        POST N jobs to http://PROXY/_tollgate/jobs in JSONL batches of B
        (one keep-alive http.client connection, batches built beforehand);
        prints {"jobs", "seconds", "jobs_per_s"} for the intake alone.

    drive.py live PROXY --rate R --seconds S [--push N --vendor VENDOR]
        A live client: GET http://PROXY/vendor/live/i at R a second for S
        seconds (open loop: each call starts at its slot, or at once when the
        one before ran late), one keep-alive connection. With --push, N jobs
        are pushed first (batches of 1,000) and the script waits until the
        proxy's /metrics shows none pending. Prints the live calls' latency
        (slot -> answer read) p50/p99/max, their statuses, and for the batch
        its wall time and jobs/s.
"""
import argparse
import http.client
import json
import sys
import time


def batches(vendor, total, size, first=0):
    out = []
    for start in range(first, first + total, size):
        lines = "".join(
            '{"id":"b%d","method":"POST","url":"http://%s/batch/%d","body":{"n":%d}}\n' % (i, vendor, i, i)
            for i in range(start, min(start + size, first + total))
        )
        out.append(lines.encode())
    return out


def post_all(proxy, chunks):
    conn = http.client.HTTPConnection(proxy, timeout=60)
    for body in chunks:
        conn.request("POST", "/_tollgate/jobs", body, {"content-type": "application/x-ndjson"})
        r = conn.getresponse()
        text = r.read()
        if r.status != 202:
            sys.exit("intake answered %d: %s" % (r.status, text[:300]))
    conn.close()


def pending(admin):
    conn = http.client.HTTPConnection(admin, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tollgate_jobs_pending{")
    )


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def intake(args):
    chunks = batches(args.vendor, args.jobs, args.batch)
    start = time.perf_counter()
    post_all(args.proxy, chunks)
    seconds = time.perf_counter() - start
    print(json.dumps({"jobs": args.jobs, "batch": args.batch, "seconds": round(seconds, 3),
                      "jobs_per_s": round(args.jobs / seconds)}))


def live(args):
    result = {}
    pushed_at = None
    if args.push:
        pushed_at = time.perf_counter()
        post_all(args.proxy, batches(args.vendor, args.push, 1000))
    conn = http.client.HTTPConnection(args.proxy, timeout=30)
    latencies, statuses = [], {}
    begin = time.perf_counter()
    n = int(args.rate * args.seconds)
    for i in range(n):
        slot = begin + i / args.rate
        now = time.perf_counter()
        if now < slot:
            time.sleep(slot - now)
        conn.request("GET", "/vendor/live/%d" % i)
        r = conn.getresponse()
        r.read()
        latencies.append(time.perf_counter() - slot)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    conn.close()
    ms = lambda s: round(s * 1000, 3) if s is not None else None
    result["live"] = {"calls": n, "rate": args.rate, "statuses": statuses,
                      "p50_ms": ms(quantile(latencies, 0.50)), "p99_ms": ms(quantile(latencies, 0.99)),
                      "max_ms": ms(max(latencies) if latencies else None)}
    if args.push:
        while pending(args.admin) > 0:
            time.sleep(0.05)
        wall = time.perf_counter() - pushed_at
        result["batch"] = {"jobs": args.push, "seconds": round(wall, 3), "jobs_per_s": round(args.push / wall)}
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    i = sub.add_parser("intake")
    i.add_argument("proxy")
    i.add_argument("vendor")
    i.add_argument("--jobs", type=int, default=100000)
    i.add_argument("--batch", type=int, default=1000)
    l = sub.add_parser("live")
    l.add_argument("proxy")
    l.add_argument("--admin", required=True)
    l.add_argument("--rate", type=float, default=100)
    l.add_argument("--seconds", type=float, default=20)
    l.add_argument("--push", type=int, default=0)
    l.add_argument("--vendor", default="")
    args = p.parse_args()
    {"intake": intake, "live": live}[args.what](args)


if __name__ == "__main__":
    main()
