"""Is the datastore answering? The agent's one word on it, for readiness and CNI.

A linearizable read with its own short deadline: every `interval` (3 s) while etcd
answers, every `interval_down` (0.5 s) while it does not, so an idle node costs next to
nothing and a return is seen at once. A caller whose own etcd call failed says so with
`report()`: down now, and probed fast from then on. etcd killed (refused), frozen (no
answer) or without quorum (no answer) all show as down, and up again at the first answer.
`up` starts true: the agent has just read and written etcd to register its node.

With several members, a failed probe is first probed again (at the fast rate) and only a
second failure in a row says down: a cluster that lost its leader answers nothing for
the second it takes to elect the next, and a node that called itself down for that
second would answer CNI ADDs with "try again later" that a moment later would succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from tortie.datastore.etcd import EtcdClient
from tortie.errors import DatastoreUnavailable
from tortie.log import get_logger

log = get_logger("datastore")


class DatastoreMonitor:
    def __init__(self, client: EtcdClient, *, interval: float = 3.0, interval_down: float = 0.5,
                 deadline: float = 1.0, on_change: Callable[[bool, str | None], None] | None = None,
                 strikes: int | None = None) -> None:
        self.client = client
        # failed probes in a row that make it down (see above)
        self.strikes = strikes or (1 if len(client.config.endpoints) == 1 else 2)
        self._failed = 0
        self.interval = interval
        self.interval_down = interval_down
        self.deadline = deadline
        self._wake: asyncio.Event | None = None
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
            self._failed += 1
            if self._failed >= self.strikes or not self.up:
                self._set(False, str(exc))
            else:
                log.info("datastore probe failed; probing again before calling it down", error=str(exc))
        else:
            self._failed = 0
            self._set(True, None)
        return self.up

    def report(self, error: str) -> None:
        """A caller's etcd call failed (unreachable): down now; probing speeds up to see the
        return. Call it on the monitor's event loop."""
        if not self.up:
            return  # already known, and probed fast: a retrying runtime must not cause more
        self._set(False, error)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            t0 = time.monotonic()
            await self.probe()
            interval = self.interval if self.up and not self._failed else self.interval_down
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, interval - (time.monotonic() - t0)))
