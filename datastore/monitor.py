"""Is the datastore answering? The agent's one word on it, for readiness and CNI.

A linearizable read every `interval`, each with its own short deadline: etcd killed
(refused), frozen (no answer) or without quorum (no answer) all show as down within
interval + deadline, and up again at the first answer. `up` starts true: the agent has
just read and written etcd to register its node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tortie.datastore.etcd import EtcdClient
from tortie.errors import DatastoreUnavailable
from tortie.log import get_logger

log = get_logger("datastore")


class DatastoreMonitor:
    def __init__(self, client: EtcdClient, *, interval: float = 0.5, deadline: float = 1.0,
                 on_change: Callable[[bool, str | None], None] | None = None) -> None:
        self.client = client
        self.interval = interval
        self.deadline = deadline
        self.on_change = on_change
        self.up = True
        self.error: str | None = None
        self.since = time.monotonic()

    def _set(self, up: bool, error: str | None) -> None:
        self.error = error
        if up == self.up:
            return
        was = time.monotonic() - self.since
        self.up, self.since = up, time.monotonic()
        if up:
            log.info("datastore reachable again", down_for=round(was, 3))
        else:
            log.error("datastore unreachable", error=error)
        if self.on_change is not None:
            self.on_change(up, error)

    async def probe(self) -> bool:
        try:
            await asyncio.to_thread(self.client.ping, self.deadline)
        except DatastoreUnavailable as exc:
            self._set(False, str(exc))
        else:
            self._set(True, None)
        return self.up

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.probe()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))
