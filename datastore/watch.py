"""The syncer: a consistent snapshot of a key prefix, then every change after it.

    syncer = Syncer(client)                 # the whole datastore prefix by default, or
    syncer = Syncer(client, [p + keys.RESOURCES, p + keys.IPAM_AFFINITY])  # only what you need
    async for event in syncer.events():     # or: for event in syncer.iter_events()
        Snapshot -> replace everything you hold with event.items
        Update   -> one key changed (value None: deleted)

The first event is always a Snapshot. The watch starts at the snapshot's revision + 1,
so no change is lost or seen twice between the two. When the connection drops, the
syncer retries and resumes the watch from the last revision it delivered: the consumer
sees only the Updates it missed. When etcd has compacted that revision away, resuming
is impossible, and the syncer reads a fresh snapshot and delivers it as a new Snapshot
(level-triggered: the consumer rebuilds from it, as on start).

Several prefixes are read at one revision and watched on one stream, each resuming
from its own last revision. The watch runs in a thread of its own on its own gRPC stream (the etcd client is
synchronous); events reach asyncio consumers through the loop's thread-safe call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2
from etcd3.utils import prefix_range_end

from tortie.datastore.etcd import EtcdClient, is_endpoints_failed
from tortie.errors import DatastoreUnavailable
from tortie.log import get_logger

log = get_logger("syncer")


@dataclass(frozen=True)
class Snapshot:
    """Every key under the prefix (full keys) as of `revision`."""

    revision: int
    items: Mapping[str, bytes]


@dataclass(frozen=True)
class Update:
    """One key changed at `revision`; `value` None means it was deleted."""

    key: str
    value: bytes | None
    revision: int


Event = Snapshot | Update


class Status(enum.Enum):
    WAIT_FOR_DATASTORE = "wait-for-datastore"
    RESYNC = "resync"
    IN_SYNC = "in-sync"


class _Compacted(Exception):
    """The revision to resume from is gone: only a fresh snapshot can help."""


_RETRYABLE = (DatastoreUnavailable, grpc.RpcError)


class Syncer:
    """Snapshot + watch of key prefixes, with resume and resync; see the module docstring."""

    def __init__(self, client: EtcdClient, prefix: str | Sequence[str] | None = None, *,
                 page_size: int = 1000, retry_interval: float = 0.2, max_retry_interval: float = 1.0) -> None:
        self.client = client
        if prefix is None:
            prefix = client.config.prefix
        self.prefixes: tuple[str, ...] = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        if not self.prefixes or any(a != b and b.startswith(a) for a in self.prefixes for b in self.prefixes):
            raise ValueError(f"want one or more prefixes, none inside another: {self.prefixes}")
        self.prefix = ",".join(self.prefixes)  # for logs
        self._revs = dict.fromkeys(self.prefixes, 0)  # per prefix: the last revision delivered
        self.page_size = page_size
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.status = Status.WAIT_FOR_DATASTORE
        self.revision = 0  # the last revision delivered
        self.resyncs = 0  # snapshots delivered after the first: each one a compaction recovered
        self._stop = threading.Event()
        self._call = None  # the live watch stream, cancelled by stop()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- consumers ------------------------------------------------------------------

    def iter_events(self) -> Iterator[Event]:
        """Blocking iterator of events until stop(); runs the watch in a thread."""
        q: queue.Queue = queue.Queue()
        self._start(q.put)
        while True:
            event = q.get()
            if event is None:
                return
            yield event

    async def events(self) -> AsyncIterator[Event]:
        """Async iterator of events until stop() or the consumer stops iterating."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def deliver(event: Event | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop already closed during shutdown
                loop.call_soon_threadsafe(q.put_nowait, event)

        self._start(deliver)
        try:
            while True:
                event = await q.get()
                if event is None:
                    return
                yield event
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; safe from any thread, and more than once."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the worker -----------------------------------------------------------------

    def _start(self, deliver: Callable[[Event | None], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("a Syncer runs once; make a new one")
        self._thread = threading.Thread(target=self._run, args=(deliver,), name=f"syncer {self.prefix}",
                                        daemon=True)
        self._thread.start()

    def _run(self, deliver: Callable[[Event | None], None]) -> None:
        delay = self.retry_interval
        need_snapshot = True
        try:
            while not self._stop.is_set():
                try:
                    if need_snapshot:
                        self.status = Status.RESYNC
                        snap = self._snapshot()
                        if self._stop.is_set():
                            break
                        if self.revision:
                            self.resyncs += 1
                        self.revision = snap.revision
                        self._revs = dict.fromkeys(self.prefixes, snap.revision)
                        deliver(snap)
                        need_snapshot = False
                        log.info("snapshot delivered", prefix=self.prefix, revision=snap.revision,
                                 keys=len(snap.items), resync=self.resyncs > 0)
                    self._watch(deliver, on_live=self._live)
                    delay = self.retry_interval
                except _Compacted as exc:
                    log.warning("watch revision compacted; resyncing from a fresh snapshot",
                                prefix=self.prefix, revision=self.revision, compacted=str(exc))
                    need_snapshot = True
                except (*_RETRYABLE, ValueError) as exc:
                    if isinstance(exc, ValueError) and not is_endpoints_failed(exc):
                        raise
                    if self._stop.is_set():
                        break
                    self.status = Status.WAIT_FOR_DATASTORE
                    log.warning("datastore connection lost; retrying", prefix=self.prefix,
                                revision=self.revision, retry_in=delay, error=_describe(exc))
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.max_retry_interval)
        except Exception:
            log.exception("syncer failed", prefix=self.prefix)
            raise
        finally:
            deliver(None)

    def _live(self) -> None:
        if self.status is not Status.IN_SYNC:
            log.info("in sync", prefix=self.prefix, revision=self.revision)
        self.status = Status.IN_SYNC

    def _snapshot(self) -> Snapshot:
        """Every key under the prefixes at one revision, read in pages."""
        items: dict[str, bytes] = {}
        revision = 0  # the first page fixes the revision every later page is read at
        for prefix in self.prefixes:
            start = prefix.encode()
            end = prefix_range_end(start)
            while True:
                req = etcdrpc.RangeRequest(key=start, range_end=end, limit=self.page_size, revision=revision)
                resp, _ = self.client.rpc("Range", req)
                revision = revision or resp.header.revision
                for kv in resp.kvs:
                    items[kv.key.decode()] = kv.value
                if not resp.more or not resp.kvs:
                    break
                start = resp.kvs[-1].key + b"\0"
        return Snapshot(revision, items)

    def _watch(self, deliver: Callable[[Event | None], None], on_live: Callable[[], None]) -> None:
        """Deliver changes after each prefix's revision until the stream ends or stop()."""
        creates = [etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=p.encode(), range_end=prefix_range_end(p.encode()),
            start_revision=self._revs[p] + 1, progress_notify=True)) for p in self.prefixes]
        # One create in flight at a time: etcd answers them in order, and that order is
        # the only way to learn which watch id belongs to which prefix.
        sends: queue.Queue = queue.Queue()
        sends.put(creates[0])
        watch_prefix: dict[int, str] = {}

        def requests():
            # Stays open after the creates: a half-closed stream may be torn down.
            while (req := sends.get()) is not None:
                yield req

        channel = self.client.channel()
        call = etcdrpc.WatchStub(channel).Watch(requests(), metadata=self.client.raw.metadata)
        with self._lock:
            self._call = call
        try:
            if self._stop.is_set():
                return
            for resp in call:
                if resp.compact_revision:
                    raise _Compacted(f"compacted up to {resp.compact_revision}")
                if resp.canceled:
                    raise DatastoreUnavailable(f"watch cancelled by etcd: {resp.cancel_reason or 'no reason'}")
                if resp.created:
                    watch_prefix[resp.watch_id] = self.prefixes[len(watch_prefix)]
                    if len(watch_prefix) < len(creates):
                        sends.put(creates[len(watch_prefix)])
                    else:
                        on_live()
                prefix = watch_prefix.get(resp.watch_id)
                if prefix is None:
                    continue
                for ev in resp.events:
                    deleted = ev.type == kv_pb2.Event.DELETE
                    deliver(Update(ev.kv.key.decode(), None if deleted else ev.kv.value, ev.kv.mod_revision))
                    self._revs[prefix] = ev.kv.mod_revision
                    self.revision = max(self.revision, ev.kv.mod_revision)
                # A progress notification (etcd sends one only to a watcher that has caught
                # up) moves the revision on too, so a quiet prefix resumes from near the
                # present rather than from a long-compacted past.
                if not resp.events and not resp.created and resp.header.revision > self._revs[prefix]:
                    self._revs[prefix] = resp.header.revision
            self.client.failed(channel)  # a member shutting down ends its streams
            raise DatastoreUnavailable("watch stream ended")
        except grpc.RpcError as exc:
            if self._stop.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.client.failed(channel)  # resume on another member, if there is one
            raise
        finally:
            sends.put(None)
            call.cancel()  # etcd keeps a half-closed watch stream open; end it for sure
            with self._lock:
                self._call = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def wait_in_sync(syncer: Syncer, timeout: float = 10.0) -> bool:
    """For tests and tools: block until the syncer's watch is live."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if syncer.status is Status.IN_SYNC:
            return True
        time.sleep(0.01)
    return False


__all__ = ["Event", "Snapshot", "Status", "Syncer", "Update", "wait_in_sync"]
