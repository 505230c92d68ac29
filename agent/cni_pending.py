"""What a CNI DEL (or an undone ADD) could not finish in the datastore while etcd was
unreachable: the pod's WorkloadEndpoint to delete and its handle's addresses to free.

The kernel side of a DEL never waits for etcd (the veth goes at once, so the pod's
traffic stops); the datastore side is recorded here and finished, WorkloadEndpoint
first, then the addresses (an address is never free while an endpoint still names it),
as soon as etcd answers again. The record is a small JSON file in the agent's state
directory, rewritten atomically on every change, so an agent restarted in between
finishes the job instead of leaking the addresses (`ipam check` could not see such a
leak: the endpoint and the allocation would still agree).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from tortie.errors import DatastoreUnavailable
from tortie.log import get_logger

log = get_logger("cni")


@dataclass(frozen=True)
class Cleanup:
    handle: str
    container_id: str
    ifname: str
    pod_name: str | None = None
    pod_namespace: str | None = None
    wep: bool = True  # tortie-ipam holds addresses only: no endpoint to delete


RETRY = 1.0  # how often the cleanups are tried while etcd stays away


class PendingCleanups:
    """Cleanups by handle, kept in a file (None: in memory only), and the task that
    finishes them: `finish(item)` does the datastore work of one (and calls `done`),
    under `lock(container id)`, whenever `datastore_up()`, every RETRY or on `kick()`."""

    def __init__(self, path: str | None, finish: Callable[[Cleanup], Awaitable[None]],
                 lock: Callable, datastore_up: Callable[[], bool]) -> None:
        self.path = path
        self._finish, self._lock, self._up = finish, lock, datastore_up
        self._kick = asyncio.Event()
        self._items: dict[str, Cleanup] = {}
        if path is None:
            return
        try:
            with open(path) as f:
                raw = json.load(f)
            self._items = {d["handle"]: Cleanup(**d) for d in raw}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("cannot read the pending CNI cleanups; `tortiectl ipam check` finds what "
                      "they held", path=path, error=str(exc))
        if self._items:
            log.info("pending CNI cleanups from before a restart", count=len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, handle: str) -> bool:
        return handle in self._items

    def items(self) -> list[Cleanup]:
        return list(self._items.values())

    def get(self, handle: str) -> Cleanup | None:
        return self._items.get(handle)

    def kick(self) -> None:
        """Try now (etcd answers again)."""
        self._kick.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), RETRY)
            self._kick.clear()
            if not self._items or not self._up():
                continue
            for item in self.items():
                try:
                    async with self._lock(item.container_id):
                        if item.handle in self._items:
                            await self._finish(item)
                except DatastoreUnavailable:
                    break
                except Exception as exc:
                    log.error("pending cleanup failed; retrying", handle=item.handle, error=str(exc))

    def add(self, item: Cleanup) -> None:
        self._items[item.handle] = item
        self._save()

    def done(self, handle: str) -> None:
        if self._items.pop(handle, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump([asdict(i) for i in self._items.values()], f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # kept in memory all the same
            log.error("cannot record the pending CNI cleanups", path=self.path, error=str(exc))
            with contextlib.suppress(OSError):
                os.unlink(tmp)
