"""The pod routes of a CNI server that runs on its own, without an agent."""

from __future__ import annotations

import asyncio
import threading

from tortie.routing.model import TORTIE_PROTO, Route

ROUTE_CLASS = "workloads"  # the route manager's class for local pods (the calculation's too)


class LocalRoutes:
    """The standalone server's route owner: a route manager of its own, applied per call
    on a worker thread (in the agent, the dataplane driver plays this part). It has no
    netlink monitor, so each call re-reads the kernel (a veth deleted by hand took its
    routes with it)."""

    def __init__(self, proto: int = TORTIE_PROTO) -> None:
        self.proto = proto
        self._mgr = None
        self._lock = threading.Lock()

    def _apply(self, routes: tuple[Route, ...], removed: tuple) -> None:
        from tortie.routing.route_mgr import RouteManager

        with self._lock:
            if self._mgr is None:
                self._mgr = RouteManager(proto=self.proto)
            self._mgr.update_routes(ROUTE_CLASS, routes, removed)
            self._mgr.request_resync()
            self._mgr.apply()

    async def publish(self, routes: tuple[Route, ...], removed: tuple) -> None:
        await asyncio.to_thread(self._apply, routes, removed)
