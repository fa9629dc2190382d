#!/usr/bin/env python3
"""The clients of bench/proxy.sh scenario 1: N threads, each with its own
keep-alive connection (http.client), sending GET requests as fast as it can
until TOTAL calls have been started between them (or MAX_SECONDS passed).

    client.py URL_PREFIX --clients N --total TOTAL --max-seconds S
              [--retry-429 ATTEMPTS] [--header 'Name: value']...

URL_PREFIX is http://HOST:PORT/path; call i goes to URL_PREFIX/i.

--retry-429 ATTEMPTS is Celigo's own retry pattern: on a 429, wait
Retry-After (seconds) plus up to 250 ms of jitter and send again, at most
ATTEMPTS attempts in all; then the call has failed for good. Without it,
any answer but a 2xx is a failed call (what a client with no retry logic
gets). A connection error is a failed call either way (the connection is
opened again for the next one).

Prints one JSON object: calls started, completed (2xx), failed (and why),
attempts and 429s the clients saw, Tollgate-Attempts seen, the elapsed time
from the start to the end of the last call, and the latency of every call
(first attempt sent -> final answer read; failed calls included) p50/p99.
"""
import argparse
import http.client
import itertools
import json
import random
import sys
import threading
import time
from urllib.parse import urlsplit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--total", type=int, default=6000)
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--retry-429", type=int, default=0)
    ap.add_argument("--jitter", type=float, default=0.25)
    ap.add_argument("--timeout", type=float, default=40)
    ap.add_argument("--header", action="append", default=[])
    a = ap.parse_args()

    u = urlsplit(a.url)
    host, port = u.hostname, u.port or 80
    prefix = u.path.rstrip("/")
    headers = {}
    for h in a.header:
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()

    sys.setswitchinterval(0.0005)  # many threads waiting on sockets: hand the GIL over soon
    counter = itertools.count()
    lock = threading.Lock()
    totals = {"ok": 0, "failed_429": 0, "failed_status": 0, "failed_error": 0, "attempts": 0,
              "seen_429": 0, "tg_attempts": 0, "tg_retried": 0}
    statuses = {}
    latencies = []
    ends = []
    worsts = []
    barrier = threading.Barrier(a.clients + 1)
    state = {"t0": 0.0, "deadline": 0.0}

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=a.timeout)
        mine = dict.fromkeys(totals, 0)
        lat, last_end, worst = [], 0.0, (0.0, 0.0)
        seen = {}
        barrier.wait()
        while True:
            i = next(counter)
            if i >= a.total or time.monotonic() >= state["deadline"]:
                break
            start = time.monotonic()
            attempt = 0
            result = None
            while result is None:
                attempt += 1
                mine["attempts"] += 1
                try:
                    conn.request("GET", f"{prefix}/{i}", headers=headers)
                    r = conn.getresponse()
                    r.read()
                    status = r.status
                    ra = r.getheader("retry-after")
                    tg = r.getheader("tollgate-attempts")
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=a.timeout)
                    result = "failed_error"
                    break
                seen[status] = seen.get(status, 0) + 1
                if tg is not None:
                    mine["tg_attempts"] += int(tg)
                    mine["tg_retried"] += int(tg) > 1
                if 200 <= status < 300:
                    result = "ok"
                elif status == 429:
                    mine["seen_429"] += 1
                    if a.retry_429 and attempt < a.retry_429:
                        try:
                            wait = float(ra) if ra is not None else 1.0
                        except ValueError:
                            wait = 1.0
                        time.sleep(max(wait, 0) + random.uniform(0, a.jitter))
                    else:
                        result = "failed_429"
                else:
                    result = "failed_status"
            end = time.monotonic()
            mine[result] += 1
            lat.append(end - start)
            last_end = max(last_end, end)
            worst = max(worst, (end - start, start - state["t0"]))
        conn.close()
        with lock:
            for k, v in mine.items():
                totals[k] += v
            for k, v in seen.items():
                statuses[k] = statuses.get(k, 0) + v
            latencies.extend(lat)
            ends.append(last_end)
            worsts.append(worst)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.clients)]
    for t in threads:
        t.start()
    state["t0"] = time.monotonic()
    state["deadline"] = state["t0"] + a.max_seconds
    barrier.wait()
    for t in threads:
        t.join(a.max_seconds + 5 * a.timeout)
    elapsed = max(ends + [state["t0"]]) - state["t0"]
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    out = dict(totals)
    out.update(calls=len(lat), failed=totals["failed_429"] + totals["failed_status"] + totals["failed_error"],
               elapsed=round(elapsed, 3), p50_ms=round(pct(0.50) * 1e3, 2), p99_ms=round(pct(0.99) * 1e3, 2),
               max_ms=round(lat[-1] * 1e3, 2) if lat else None,
               max_started_s=round(max(worsts)[1], 3) if worsts else None,
               statuses={str(k): v for k, v in sorted(statuses.items())},
               unfinished=sum(t.is_alive() for t in threads))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
