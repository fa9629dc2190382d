#!/usr/bin/env python3
"""The script pattern of a CRM's rate-limit page ("Operators > Rate Limits",
"Pattern: chunked bulk update"), stdlib only:
POST the ids in chunks of 200 to /graphql, raise on a non-2xx, then
time.sleep(0.9) after each call "to stay comfortably under the 100-per-minute
quota". Prints: calls, non-2xx, wall seconds.

    crm_loop.py BASE_URL TOKEN IDS_JSONL
"""
import json
import sys
import time
import urllib.error
import urllib.request

QUERY = ("mutation($ids: [UUID!]!) { updateOpportunities(data: {probability: 75}, "
         "filter: {id: {in: $ids}}) { affectedCount } }")
CHUNK = 200


def main():
    base, token, path = sys.argv[1:4]
    ids = [json.loads(line) for line in open(path) if line.strip()]
    calls = bad = 0
    start = time.monotonic()
    for i in range(0, len(ids), CHUNK):
        body = json.dumps({"query": QUERY, "variables": {"ids": ids[i:i + CHUNK]}}).encode()
        req = urllib.request.Request(base + "/graphql", data=body, method="POST", headers={
            "authorization": f"Bearer {token}", "content-type": "application/json"})
        calls += 1
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
        except urllib.error.HTTPError as e:  # r.raise_for_status() on the page
            bad += 1
            print(f"call {calls}: HTTP {e.code}", file=sys.stderr)
        time.sleep(0.9)
    print(calls, bad, f"{time.monotonic() - start:.3f}")


if __name__ == "__main__":
    main()
