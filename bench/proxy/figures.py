#!/usr/bin/env python3
"""Scenario 1 figures for bench/proxy.sh, as shell assignments.

    figures.py celigo CLIENT_JSON GW_ADMITTED GW_DENIED CAPACITY RATE

CLIENT_JSON is bench/proxy/client.py's output; GW_ADMITTED and GW_DENIED
are the gateway's tollgate_decisions_total{limit="account",...} counters
(every request that reached the gateway is one or the other). The least
time the limits allow for K completed calls on a fresh leaky bucket of
CAPACITY refilling RATE/s is max(0, K - CAPACITY) / RATE; utilisation is
that over the clients' elapsed time (start to the end of the last call).
"""
import json
import sys


def celigo(client_json, admitted, denied, cap, rate):
    c = json.load(open(client_json))
    admitted, denied, cap, rate = int(float(admitted)), int(float(denied)), float(cap), float(rate)
    ok, elapsed = c["ok"], c["elapsed"]
    least = max(0.0, ok - cap) / rate
    util = 100 * least / elapsed if elapsed > 0 else 0.0
    up = admitted + denied
    pct = 100 * denied / up if up else 0.0
    print(f"ok={ok} calls={c['calls']} failed={c['failed']} failed_429={c['failed_429']} "
          f"failed_status={c['failed_status']} failed_error={c['failed_error']} attempts={c['attempts']} "
          f"seen_429={c['seen_429']} tg_retried={c['tg_retried']} elapsed={elapsed:.2f} "
          f"p50={c['p50_ms']:.1f} p99={c['p99_ms']:.1f} max={c['max_ms']:.1f} max_at={c['max_started_s']} unfinished={c['unfinished']} "
          f"up_calls={up} up_429={denied} up_429_pct={pct:.2f} least={least:.2f} util={util:.1f} "
          f"per_s={ok / elapsed if elapsed > 0 else 0:.1f} past_burst_per_s={max(0, ok - cap) / elapsed if elapsed > 0 else 0:.1f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"celigo": celigo}[cmd](*args)
