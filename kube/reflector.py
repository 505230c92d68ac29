"""The controller's reflectors: one thread per Kubernetes kind that lists, then watches
from the list's resourceVersion, and hands raw objects to the main loop through one queue
(`Listed`, `Changed`); the main loop's other events (`WepChange`, `Resync`) travel the same
queue. A dropped stream is re-watched from the last resourceVersion seen; `410 Gone`
(history compacted) means a fresh list.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from tortie.datastore.watch import Snapshot, Update
from tortie.health import Health
from tortie.log import get_logger

log = get_logger("controller")


# --- events from the reflectors to the main loop ------------------------------------------


@dataclass(frozen=True)
class Listed:
    """A full list of one kind: replaces everything known of it."""

    kind: str
    items: list[dict]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    kind: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict


@dataclass(frozen=True)
class WepChange:
    event: Snapshot | Update


@dataclass(frozen=True)
class Resync:
    """Compare everything with the datastore now (the slow timer's work, on demand)."""


class _RawWatch(k8s_watch.Watch):
    """A Watch that hands over events' objects as plain dicts: the controller mirrors
    objects as they are, including fields this client version has no model for."""

    def get_return_type(self, func):
        return None


class Reflector:
    """List, then watch from the list's resourceVersion, one kind, in a thread of its own."""

    def __init__(self, kind: str, list_fn: Callable, out: queue.Queue, *, watch_timeout: int,
                 retry_interval: float, health: Health | None = None) -> None:
        self.kind = kind
        self.health = health
        self.component = f"watch-{kind.lower()}"
        if health is not None:
            health.register(self.component, deadline=watch_timeout + 60.0)
        self.list_fn = list_fn
        self.out = out
        self.watch_timeout = watch_timeout
        self.retry_interval = retry_interval
        self.lists = 0  # full lists made: 1 + one per 410 Gone
        self.reconnects = 0  # watches resumed after a broken stream or API error
        self._stop = threading.Event()
        self._watch: _RawWatch | None = None
        self._thread = threading.Thread(target=self._run, name=f"reflector {kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (join() waits for it)."""
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()  # shuts the socket down, so a blocked read returns now

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        rv: str | None = None
        delay = self.retry_interval
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                rv = self._watch_from(rv)
                delay = self.retry_interval
                self._ok()
            except k8s.ApiException as exc:
                if exc.status == 410:
                    log.info("watch history expired; relisting", kind=self.kind, resource_version=rv)
                    rv = None
                    continue
                self._pause(exc, rv, delay)
                delay = min(delay * 2, 30.0)
            except Exception as exc:  # urllib3/socket errors: a broken stream or connection
                if self._stop.is_set():
                    break
                self._pause(exc, rv, delay)
                delay = min(delay * 2, 30.0)

    def _ok(self) -> None:
        if self.health is not None:
            self.health.ok(self.component)

    def _pause(self, exc: BaseException, rv: str | None, delay: float) -> None:
        self.reconnects += 1
        if self.health is not None:
            self.health.failed(self.component, f"{type(exc).__name__}: {exc}"[:200])
        log.warning("kubernetes watch lost; reconnecting", kind=self.kind, resource_version=rv,
                    retry_in=delay, error=f"{type(exc).__name__}: {exc}"[:300])
        self._stop.wait(delay)

    def _list(self) -> str:
        resp = self.list_fn(_preload_content=False, _request_timeout=(10, 60))
        if not 200 <= resp.status <= 299:
            raise k8s.ApiException(status=resp.status, reason=resp.reason)
        data = json.loads(resp.data)
        rv = str(data["metadata"]["resourceVersion"])
        self.lists += 1
        self.out.put(Listed(self.kind, list(data.get("items") or ()), rv))
        self._ok()
        log.info("listed", kind=self.kind, items=len(data.get("items") or ()), resource_version=rv)
        return rv

    def _watch_from(self, rv: str) -> str:
        """Deliver changes after rv until the server ends the stream; the last rv seen."""
        w = _RawWatch()
        self._watch = w
        try:
            for ev in w.stream(self.list_fn, resource_version=rv, timeout_seconds=self.watch_timeout,
                               allow_watch_bookmarks=True, _request_timeout=(10, self.watch_timeout + 30)):
                obj = ev.get("raw_object") or {}
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self.out.put(Changed(self.kind, ev["type"], obj))
                self._ok()
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
        return rv
