"""bench/syncer: the datastore Syncer against the etcd client's own read and watch.

On a private etcd (own ports and data dir, removed afterwards):
  snapshot  N keys of resource-sized JSON: Syncer start -> Snapshot delivered, against one
            unpaged Range of the same prefix (EtcdClient.get_prefix)
  stream    M writes in transactions of 100: first write -> last Update delivered, against
            the etcd3 library's watch callback on the same prefix at the same time (both
            are bounded by the writer; the lag after the last write is what differs)
  latency   one put -> its Update delivered, median and p99 of 300, against the library watch

    python bench/syncer/run.py [--keys N] [--writes M] [--json]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.watch import Snapshot, Syncer, Update, wait_in_sync
from tortie.lab.etcd_server import EtcdServer

PREFIX = "/bench/"
TARGET_SNAPSHOT_RATIO = 2.0  # paged snapshot at most 2x one unpaged Range
TARGET_STREAM_RATIO = 0.8  # at least 80% of the library watch's delivery rate
TARGET_LATENCY_MS = 5.0  # median put -> Update


def value(i: int) -> bytes:
    return json.dumps({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                       "metadata": {"name": f"node-k8s-pod{i}-eth0", "namespace": "default",
                                    "labels": {"app": f"a{i % 50}", "tier": "web"}},
                       "spec": {"node": f"node{i % 100}", "pod": f"pod{i}", "endpoint": "eth0",
                                "ipNetworks": [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"],
                                "interfaceName": f"cali{i:011d}"}}).encode()


class Consumer:
    """Drains a syncer in a thread, noting when each key's latest value arrived."""

    def __init__(self, syncer: Syncer) -> None:
        self.syncer = syncer
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for ev in self.syncer.iter_events():
            self.q.put((time.perf_counter(), ev))


def library_watch(client: EtcdClient) -> tuple[queue.Queue, object]:
    """The reference: the etcd3 library's own watch, events timestamped on arrival."""
    q: queue.Queue = queue.Queue()

    def cb(resp) -> None:
        now = time.perf_counter()
        for ev in getattr(resp, "events", ()):
            q.put((now, ev.key.decode()))

    watch_id = client.raw.add_watch_prefix_callback(PREFIX, cb)
    return q, watch_id


def bench(keys: int, writes: int) -> dict:
    out: dict = {}
    with EtcdServer() as server:
        cfg = EtcdConfig(endpoints=(server.endpoint,), prefix=PREFIX)
        writer, reader, ref_client = EtcdClient(cfg), EtcdClient(cfg), EtcdClient(cfg)
        try:
            writer.put_many((f"{PREFIX}wep/{i}", value(i)) for i in range(keys))

            # snapshot
            ref = []
            for _ in range(3):
                t0 = time.perf_counter()
                kvs, _ = reader.get_prefix(PREFIX)
                ref.append(time.perf_counter() - t0)
                assert len(kvs) == keys
            syncer = Syncer(reader)
            t0 = time.perf_counter()
            consumer = Consumer(syncer)
            t_snap, snap = consumer.q.get(timeout=60)
            assert isinstance(snap, Snapshot) and len(snap.items) == keys
            out["snapshot_s"] = t_snap - t0
            out["snapshot_ref_s"] = min(ref)
            assert wait_in_sync(syncer)

            # stream: both watchers see the same writes
            ref_q, watch_id = library_watch(ref_client)
            t0 = time.perf_counter()
            writer.put_many((f"{PREFIX}wep/{i % keys}", value(i)) for i in range(writes))
            t_written = time.perf_counter()
            last = 0.0
            for _ in range(writes):
                last, ev = consumer.q.get(timeout=60)
                assert isinstance(ev, Update)
            ref_last = 0.0
            for _ in range(writes):
                ref_last, _key = ref_q.get(timeout=60)
            out["stream_write_s"] = t_written - t0
            out["stream_s"] = last - t0
            out["stream_ref_s"] = ref_last - t0

            # latency, one put at a time
            lat, ref_lat = [], []
            for i in range(300):
                t0 = time.perf_counter()
                writer.put(f"{PREFIX}lat/{i}", b"x")
                t1, ev = consumer.q.get(timeout=10)
                t2, _key = ref_q.get(timeout=10)
                lat.append((t1 - t0) * 1000)
                ref_lat.append((t2 - t0) * 1000)
            out["latency_ms"] = (statistics.median(lat), statistics.quantiles(lat, n=100)[98])
            out["latency_ref_ms"] = (statistics.median(ref_lat), statistics.quantiles(ref_lat, n=100)[98])
            ref_client.raw.cancel_watch(watch_id)
            syncer.stop()
        finally:
            for c in (writer, reader, ref_client):
                c.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=10000)  # the unpaged reference fails past 4 MB
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = bench(args.keys, args.writes)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    rate = args.writes / r["stream_s"]
    ref_rate = args.writes / r["stream_ref_s"]
    print(f"{'':34}{'Syncer':>14}{'reference':>14}")
    print(f"{f'snapshot of {args.keys} keys (s)':34}{r['snapshot_s']:>14.3f}{r['snapshot_ref_s']:>14.3f}"
          "   (ref: one unpaged Range)")
    print(f"{f'{args.writes} updates delivered (/s)':34}{rate:>14,.0f}{ref_rate:>14,.0f}"
          f"   (ref: etcd3 watch; writer alone took {r['stream_write_s']:.2f} s)")
    print(f"{'last update after last write (ms)':34}{(r['stream_s'] - r['stream_write_s']) * 1000:>14.1f}"
          f"{(r['stream_ref_s'] - r['stream_write_s']) * 1000:>14.1f}   (both are writer-bound above)")
    print(f"{'put -> update p50 / p99 (ms)':34}{r['latency_ms'][0]:>7.2f}/{r['latency_ms'][1]:<6.2f}"
          f"{r['latency_ref_ms'][0]:>7.2f}/{r['latency_ref_ms'][1]:<6.2f}")
    checks = [
        (f"snapshot <= {TARGET_SNAPSHOT_RATIO}x reference", r["snapshot_s"] <= TARGET_SNAPSHOT_RATIO * r["snapshot_ref_s"]),
        (f"update rate >= {TARGET_STREAM_RATIO:.0%} of reference", rate >= TARGET_STREAM_RATIO * ref_rate),
        (f"median latency <= {TARGET_LATENCY_MS} ms", r["latency_ms"][0] <= TARGET_LATENCY_MS),
    ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
