#!/usr/bin/env python3
"""New-connection latency for benches/compare.sh: connect + authenticate +
`select 1` + close, one connection after another, per route.

    connect_latency.py --warmup N --count N ROUTE=CONNINFO ...

For each route: N warm-up connections (not measured: pools fill, caches
warm), then N measured ones. Each is timed from before `psycopg.connect`
to after `close()`: TCP connect, SSL negotiation where the client does TLS,
the startup and SCRAM exchange, one `select 1` (autocommit, so psycopg sends
no BEGIN; the extended-protocol messages go in one flight) and the
Terminate. The client is libpq, as psycopg[binary] bundles it. Prints one
line per route: `ROUTE p50_ms p90_ms min_ms max_ms n`.
"""
import argparse
import math
import statistics
import sys
import time

import psycopg


def once(conninfo):
    started = time.perf_counter()
    conn = psycopg.connect(conninfo, autocommit=True)
    try:
        if conn.execute("select 1").fetchone() != (1,):
            raise RuntimeError("select 1 did not return 1")
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000.0


def quantile(sorted_ms, q):
    """Nearest-rank quantile."""
    return sorted_ms[max(1, math.ceil(len(sorted_ms) * q)) - 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("routes", nargs="+", metavar="ROUTE=CONNINFO")
    args = parser.parse_args()
    for spec in args.routes:
        route, _, conninfo = spec.partition("=")
        try:
            for _ in range(args.warmup):
                once(conninfo)
            ms = sorted(once(conninfo) for _ in range(args.count))
        except (psycopg.Error, RuntimeError) as e:
            print(f"connect_latency.py: route {route}: {e}", file=sys.stderr)
            return 1
        print(
            f"{route} {statistics.median(ms):.1f} {quantile(ms, 0.9):.1f} "
            f"{ms[0]:.1f} {ms[-1]:.1f} {len(ms)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
