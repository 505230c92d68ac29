import asyncio
import queue
import threading
import time

import pytest

from tortie.datastore.watch import Snapshot, Status, Syncer, Update, wait_in_sync


class Collector:
    """Runs a syncer's blocking iterator in a thread; events land in a queue."""

    def __init__(self, syncer: Syncer) -> None:
        self.syncer = syncer
        self.events: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for ev in self.syncer.iter_events():
            self.events.put(ev)

    def next(self, timeout: float = 10.0):
        return self.events.get(timeout=timeout)

    def take(self, n: int, timeout: float = 10.0) -> list:
        return [self.next(timeout) for _ in range(n)]

    def stop(self) -> None:
        self.syncer.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def collect():
    made: list[Collector] = []

    def start(syncer: Syncer) -> Collector:
        c = Collector(syncer)
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()


def test_snapshot_then_every_change_once(etcd, etcd_prefix, collect):
    etcd.put(etcd_prefix + "a", b"1")
    etcd.put(etcd_prefix + "b", b"2")
    etcd.put(etcd_prefix[:-1] + "-other/x", b"outside the prefix")
    c = collect(Syncer(etcd, page_size=1))  # one key per page: pagination at one revision
    snap = c.next()
    assert isinstance(snap, Snapshot)
    assert snap.items == {etcd_prefix + "a": b"1", etcd_prefix + "b": b"2"}
    assert wait_in_sync(c.syncer)
    rev = etcd.put(etcd_prefix + "a", b"1b")
    etcd.delete(etcd_prefix + "b")
    etcd.put(etcd_prefix[:-1] + "-other/y", b"outside")
    etcd.put(etcd_prefix + "c/d", b"3")
    got = c.take(3)
    assert got == [Update(etcd_prefix + "a", b"1b", rev), Update(etcd_prefix + "b", None, rev + 1),
                   Update(etcd_prefix + "c/d", b"3", rev + 3)]
    assert c.events.empty()
    assert c.syncer.revision == rev + 3


def test_writes_between_snapshot_and_watch_are_not_lost(etcd, etcd_prefix, collect):
    # A burst of writes racing the syncer's start: the union of snapshot + updates must be
    # the final state, with each write seen at most once.
    stop = threading.Event()
    written: dict[str, bytes] = {}

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 300:
            written[etcd_prefix + f"k{i % 20}"] = str(i).encode()
            etcd.put(etcd_prefix + f"k{i % 20}", str(i).encode())
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.02)
    c = collect(Syncer(etcd))
    t.join()
    stop.set()
    marker = etcd.put(etcd_prefix + "zz-end", b"end")
    state: dict[str, bytes] = {}
    seen_revs: set[int] = set()
    while True:
        ev = c.next()
        if isinstance(ev, Snapshot):
            state = dict(ev.items)
            continue
        assert ev.revision not in seen_revs
        seen_revs.add(ev.revision)
        state[ev.key] = ev.value
        if ev.revision == marker:
            break
    del state[etcd_prefix + "zz-end"]
    assert state == written


def test_resumes_after_dropped_connection_without_resnapshot(proxied, collect):
    proxy, via, direct = proxied
    direct.put("/tortie/a", b"1")
    c = collect(Syncer(via, retry_interval=0.1, max_retry_interval=0.5))
    assert isinstance(c.next(), Snapshot)
    assert wait_in_sync(c.syncer)
    proxy.cut()
    deadline = time.monotonic() + 10
    while c.syncer.status is not Status.WAIT_FOR_DATASTORE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.syncer.status is Status.WAIT_FOR_DATASTORE
    r1 = direct.put("/tortie/a", b"2")  # changes while the syncer is cut off
    r2 = direct.put("/tortie/b", b"3")
    proxy.restore()
    assert c.take(2, timeout=20) == [Update("/tortie/a", b"2", r1), Update("/tortie/b", b"3", r2)]
    assert wait_in_sync(c.syncer)
    assert c.syncer.resyncs == 0


def test_resyncs_from_fresh_snapshot_when_compacted(proxied, collect):
    proxy, via, direct = proxied
    direct.put("/tortie/a", b"1")
    direct.put("/tortie/gone", b"x")
    c = collect(Syncer(via, retry_interval=0.1, max_retry_interval=0.5))
    assert isinstance(c.next(), Snapshot)
    assert wait_in_sync(c.syncer)
    proxy.cut()
    direct.delete("/tortie/gone")
    direct.put("/tortie/a", b"2")
    rev = direct.put("/tortie/new", b"3")
    direct.raw.compact(rev)  # the revision the syncer would resume from is gone
    proxy.restore()
    snap = c.next(timeout=20)
    assert isinstance(snap, Snapshot) and snap.revision == rev
    assert snap.items == {"/tortie/a": b"2", "/tortie/new": b"3"}
    assert c.syncer.resyncs == 1
    assert wait_in_sync(c.syncer)
    r = direct.put("/tortie/after", b"4")
    assert c.next() == Update("/tortie/after", b"4", r)


def test_async_events_and_stop(etcd, etcd_prefix):
    etcd.put(etcd_prefix + "a", b"1")

    async def main():
        syncer = Syncer(etcd)
        got = []
        async for ev in syncer.events():
            got.append(ev)
            if isinstance(ev, Snapshot):
                await asyncio.to_thread(wait_in_sync, syncer)
                await asyncio.to_thread(etcd.put, etcd_prefix + "b", b"2")
            else:
                break  # leaving the loop stops the syncer
        return syncer, got

    syncer, got = asyncio.run(asyncio.wait_for(main(), 20))
    assert got[0].items == {etcd_prefix + "a": b"1"}
    assert (got[1].key, got[1].value) == (etcd_prefix + "b", b"2")
    assert syncer._thread is not None and not syncer._thread.is_alive()


def test_unreachable_datastore_waits_and_stops_cleanly(collect):
    from tortie.datastore.etcd import EtcdClient, EtcdConfig
    from tortie.lab.etcd_server import free_port

    client = EtcdClient(EtcdConfig(endpoints=(f"http://127.0.0.1:{free_port()}",), timeout=0.5))
    syncer = Syncer(client, retry_interval=0.05)
    c = collect(syncer)
    time.sleep(0.5)
    assert syncer.status is Status.WAIT_FOR_DATASTORE and c.events.empty()
    c.stop()
    client.close()


def test_snapshot_larger_than_one_grpc_message(etcd, etcd_prefix, collect):
    # 6 MB under the prefix: more than gRPC's 4 MB default for one response, so only a
    # paged read gets it all.
    big = b"x" * 120_000
    for i in range(50):  # one at a time: etcd takes at most 1.5 MB per request
        etcd.put(f"{etcd_prefix}big/{i:03d}", big)
    c = collect(Syncer(etcd, page_size=10))
    snap = c.next(timeout=30)
    assert isinstance(snap, Snapshot) and len(snap.items) == 50
    assert all(v == big for v in snap.items.values())


def test_several_prefixes_one_revision_each_resumes_on_its_own(proxied, collect):
    proxy, via, direct = proxied
    direct.put("/tortie/resources/ippool/p", b"pool")
    direct.put("/tortie/ipam/affinity/n1/10.0.0.0-26", b"aff")
    direct.put("/tortie/ipam/blocks/10.0.0.0-26", b"block churn nobody here wants")
    c = collect(Syncer(via, ["/tortie/resources/", "/tortie/ipam/affinity/"], retry_interval=0.1,
                       max_retry_interval=0.5))
    snap = c.next()
    assert set(snap.items) == {"/tortie/resources/ippool/p", "/tortie/ipam/affinity/n1/10.0.0.0-26"}
    assert wait_in_sync(c.syncer)
    r1 = direct.put("/tortie/resources/node/n1", b"n1")
    direct.put("/tortie/ipam/blocks/10.0.0.0-26", b"more churn")
    assert c.next() == Update("/tortie/resources/node/n1", b"n1", r1)
    # The resources watch has now seen a later revision than the affinity watch; after the
    # cut each must resume from its own, or a change would be lost or repeated.
    proxy.cut()
    r2 = direct.put("/tortie/ipam/affinity/n2/10.0.0.64-26", b"aff2")
    r3 = direct.put("/tortie/resources/node/n2", b"n2")
    proxy.restore()
    got = sorted(c.take(2, timeout=20), key=lambda u: u.revision)
    assert got == [Update("/tortie/ipam/affinity/n2/10.0.0.64-26", b"aff2", r2),
                   Update("/tortie/resources/node/n2", b"n2", r3)]
    time.sleep(0.2)
    assert c.events.empty() and c.syncer.resyncs == 0


def test_overlapping_prefixes_are_refused(etcd):
    with pytest.raises(ValueError, match="none inside another"):
        Syncer(etcd, ["/a/", "/a/b/"])
