#!/usr/bin/env python3
"""Write a deterministic request trace (JSONL, sorted by t) for `tollgate simulate`.

usage: make_trace.py LINES [SECONDS] > trace.jsonl
Three tenants: 'acme' bursts hard, 'globex' is steady, 'initech' is light;
a few requests have no tenant header at all.
"""
import json, random, sys

lines = int(sys.argv[1]) if len(sys.argv) > 1 else 400
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
rng = random.Random(7)
tenants = [("acme", 0.6), ("globex", 0.3), ("initech", 0.08), (None, 0.02)]
names, weights = zip(*tenants)
out = sys.stdout
for i in range(lines):
    t = round(seconds * i / lines, 6)
    tenant = rng.choices(names, weights)[0]
    headers = {"x-tenant-id": tenant} if tenant else {}
    line = {"t": t, "method": rng.choice(["GET", "GET", "POST"]), "path": "/v1/jobs",
            "headers": headers, "ip": f"10.0.0.{rng.randint(1, 9)}", "latency": round(rng.uniform(0.02, 0.4), 3)}
    out.write(json.dumps(line, separators=(",", ":")) + "\n")
