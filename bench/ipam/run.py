"""IPAM benchmark: allocations per second next to etcd's raw compare-and-swap rate.

Starts its own etcd (unique ports, temporary data dir, always stopped) and measures,
in one run:

- raw CAS: sequential mod_revision-guarded puts to one key, reusing the revision from
  each reply (the floor one allocation transaction sits on), and 8 processes doing the
  same on their own keys;
- allocations/s with 1 allocator and with 8 concurrent allocator processes on 8 nodes
  (block claims included: /26 blocks of 64 addresses, Calico's default);
- latency of a single allocation from an already-claimed block (p50, p99), and of
  one that claims a block first.

    python bench/ipam/run.py [--json] [--count N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid

TARGET_RATE_8 = 500.0  # allocations/s in aggregate with 8 allocators
TARGET_P50_MS = 3.0  # one allocation from an already-claimed block
BLOCK_SIZE = 26  # Calico's default for IPv4
BLOCK_ADDRS = 1 << (32 - BLOCK_SIZE)


def _client(endpoint: str, prefix: str):
    from tortie.datastore.etcd import EtcdClient, EtcdConfig

    return EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=prefix))


def _quiet() -> None:
    from tortie import log

    log.configure(level="warning", stream=sys.stderr)


def raw_cas(endpoint: str, prefix: str, key: str, n: int, start_at: float = 0.0) -> tuple[int, float, float]:
    """n sequential CAS writes on key; (n, start, end)."""
    from tortie.datastore.etcd import Txn

    client = _client(endpoint, prefix)
    try:
        ok, rev = client.transaction(Txn().guard(key, 0).put(key, b"0"))
        assert ok, "CAS key exists already"
        while time.time() < start_at:
            time.sleep(0.0005)
        t0 = time.perf_counter()
        for i in range(n):
            ok, rev = client.cas(key, rev, str(i).encode())
            assert ok, "lost a CAS on a private key"
        return n, t0, time.perf_counter()
    finally:
        client.close()


def allocator(endpoint: str, prefix: str, node: str, n: int,
              start_at: float = 0.0) -> tuple[int, float, float, list[float]]:
    """n allocations for node, each with its own handle; (n, start, end, per-call seconds)."""
    _quiet()
    from tortie.datastore.ipam import IPAM

    client = _client(endpoint, prefix)
    try:
        ipam = IPAM(client)
        lat = []
        while time.time() < start_at:
            time.sleep(0.0005)
        t0 = time.perf_counter()
        for i in range(n):
            a = time.perf_counter()
            ipam.auto_assign(f"bench.{node}-{i}", node)
            lat.append(time.perf_counter() - a)
        return n, t0, time.perf_counter(), lat
    finally:
        client.close()


def _parallel(fn, argsets: list[tuple]) -> tuple[float, list]:
    """Run fn in one spawned process per argset from a common start; (aggregate ops/s, results).
    perf_counter is CLOCK_MONOTONIC on Linux, shared by all processes."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(argsets)) as pool:
        pool.map(time.sleep, [0] * len(argsets))  # every worker is up
        start_at = time.time() + 0.3
        results = pool.starmap(fn, [(*a, start_at) for a in argsets], chunksize=1)
    total = sum(r[0] for r in results)
    return total / (max(r[2] for r in results) - min(r[1] for r in results)), results


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(count: int) -> dict:
    _quiet()
    from tortie.datastore.store import ResourceStore
    from tortie.lab.etcd_server import EtcdServer

    prefix = f"/bench-ipam-{uuid.uuid4().hex[:8]}/"
    with EtcdServer() as server:
        ep = server.endpoint
        client = _client(ep, prefix)
        try:
            store = ResourceStore(client)
            store.create({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "bench"},
                          "spec": {"cidr": "10.128.0.0/14", "blockSize": BLOCK_SIZE}})
            for i in range(9):
                store.apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": f"b{i}"},
                             "spec": {}})

            n, t0, t1 = raw_cas(ep, prefix, prefix + "cas/seq", count * 2)
            cas_seq = n / (t1 - t0)
            cas_8, _ = _parallel(raw_cas, [(ep, prefix, prefix + f"cas/p{i}", count) for i in range(8)])

            n, t0, t1, per_call = allocator(ep, prefix, "b8", count)
            alloc_1 = n / (t1 - t0)
            # One node filling its blocks in order claims a new block exactly at every
            # BLOCK_ADDRS-th allocation; the others come from an already-claimed block.
            lat = [t for i, t in enumerate(per_call) if i % BLOCK_ADDRS]
            alloc_8, results = _parallel(allocator, [(ep, prefix, f"b{i}", count) for i in range(8)])
            lat_8 = [t for r in results for i, t in enumerate(r[3]) if i % BLOCK_ADDRS]

            claim = [t for i, t in enumerate(per_call) if not i % BLOCK_ADDRS]
        finally:
            client.close()
    return {
        "raw_cas_per_s": round(cas_seq, 1),
        "raw_cas_8_procs_per_s": round(cas_8, 1),
        "alloc_1_per_s": round(alloc_1, 1),
        "alloc_8_per_s": round(alloc_8, 1),
        "alloc_latency_p50_ms": round(1000 * statistics.median(lat), 3),
        "alloc_latency_p99_ms": round(1000 * _pct(lat, 0.99), 3),
        "alloc_with_claim_p50_ms": round(1000 * statistics.median(claim), 3),
        "alloc_latency_8_p50_ms": round(1000 * statistics.median(lat_8), 3),
        "count_per_allocator": count,
        "targets": {"alloc_8_per_s": TARGET_RATE_8, "alloc_latency_p50_ms": TARGET_P50_MS},
        "pass": {"alloc_8_per_s": alloc_8 >= TARGET_RATE_8,
                 "alloc_latency_p50_ms": 1000 * statistics.median(lat) <= TARGET_P50_MS},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--count", type=int, default=600, help="allocations per allocator (default 600)")
    args = ap.parse_args(argv)
    r = measure(args.count)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        def mark(key: str) -> str:
            return "PASS" if r["pass"][key] else "MISS"

        rows = [
            ("measure", "value", "reference (same run)", "target", ""),
            ("raw etcd CAS, sequential, 1 client", f"{r['raw_cas_per_s']:.0f}/s", "", "", ""),
            ("raw etcd CAS, 8 processes, own keys", f"{r['raw_cas_8_procs_per_s']:.0f}/s", "", "", ""),
            ("allocations, 1 allocator", f"{r['alloc_1_per_s']:.0f}/s",
             f"{r['raw_cas_per_s']:.0f}/s raw CAS", "", ""),
            ("allocations, 8 allocators on 8 nodes", f"{r['alloc_8_per_s']:.0f}/s",
             f"{r['raw_cas_8_procs_per_s']:.0f}/s raw CAS", f">= {TARGET_RATE_8:.0f}/s", mark("alloc_8_per_s")),
            ("one allocation, claimed block, p50", f"{r['alloc_latency_p50_ms']:.2f} ms",
             f"{1000 / r['raw_cas_per_s']:.2f} ms per raw CAS", f"<= {TARGET_P50_MS:.0f} ms",
             mark("alloc_latency_p50_ms")),
            ("one allocation, claimed block, p99", f"{r['alloc_latency_p99_ms']:.2f} ms", "", "", ""),
            ("same, p50 while 8 allocators run", f"{r['alloc_latency_8_p50_ms']:.2f} ms", "", "", ""),
            ("one allocation that claims a block, p50", f"{r['alloc_with_claim_p50_ms']:.2f} ms", "", "", ""),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        print(f"({args.count} allocations per allocator, {os.cpu_count()} CPUs)")
    return 0 if all(r["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
