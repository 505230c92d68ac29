"""The route manager: desired routes by class, reconciled against the kernel's tortie routes.

Desired state is kept per route class ("workloads", "blocks", "bgp", ...); the effective
desired route for a key (family, table, dst) is the one from the first class in
``CLASS_PRIORITY`` that has it:

    workloads      a local pod's /32 (/128) to its veth: the most specific truth there is
    cni            the same routes, set one at a time by the CNI server before the
                   calculation catches up
    blocks         blackholes for the node's own blocks
    bgp-borrowed   /32s learned for addresses borrowed from our blocks by other nodes
    bgp            routes learned from peers
    egress         per-pool egress tables (policy routing)
    (other classes after these, by name)

Only routes with ``proto`` (TORTIE_PROTO) are read, changed or deleted, so routes made by
the kernel, the admin, BIRD or a CNI plugin are never touched. A new key is written with
NLM_F_EXCL, so a foreign route holding it is reported (EEXIST), not overwritten. One
exception, seen live by the monitor: ``ip route change/replace`` on one of our routes
stamps it with another protocol; that is our route changed by hand, and it is put back.

Work is proportional to what changed: every change marks its key dirty and ``apply()``
looks at dirty keys only. A full resync (a dump of our routes in every table) runs on the
first apply, on ``resync()`` (the agent's slow timer), and when the monitor lost events.
A restarted agent adopts: after the resync, a kernel route equal to the desired one is
left alone, so no route of a live pod is deleted and re-added.

A write the kernel refuses is reported in ApplyStats.errors and kept in ``failed``; it is
tried again on the next resync (the agent's slow timer), not in a hot loop.

Races handled:
- a route's device does not exist yet (CNI creates the veth after asking for the route,
  or the reverse): the route waits in ``pending`` and is written when the monitor sees
  the link come up;
- a device goes down or is deleted: IPv4 drops its routes without a notification, so the
  monitor's link event drops them from the actual state, and they are written again;
- the desired state must be complete before the first apply after a restart (the agent
  sets every class first), otherwise routes of classes not yet set would be deleted.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tortie.log import get_logger

from .kernel import ADD, DELETE, REPLACE, Kernel, NetlinkKernel, WriteError
from .model import AF_INET, AF_INET6, TORTIE_PROTO, Route, route_key

log = get_logger("routes")

CLASS_PRIORITY = ("workloads", "cni", "blocks", "bgp-borrowed", "bgp", "egress")

RouteKey = tuple[int, int, str]
# Errors that mean "the device is not there (or not up) yet": wait for a link event.
_WAIT_FOR_LINK = (errno.ENODEV, errno.ENETDOWN, errno.ENETUNREACH)


@dataclass(frozen=True, slots=True)
class ApplyStats:
    added: int = 0
    replaced: int = 0
    deleted: int = 0
    pending: int = 0  # desired routes waiting for their device (in total, after this apply)
    errors: tuple[WriteError, ...] = ()
    resynced: bool = False
    seconds: float = 0.0


def _same(d: Route, a: Route) -> bool:
    """Whether kernel route ``a`` already is desired route ``d``. A route without a device
    gets one resolved by the kernel (the gateway's), which is not a difference."""
    if d == a:
        return True
    return d.dev is None and (d.dst, d.table, d.type, d.gateways, d.scope, d.onlink, d.src,
                              d.metric) == (a.dst, a.table, a.type, a.gateways, a.scope,
                                            a.onlink, a.src, a.metric)


class RouteManager:
    def __init__(self, kernel: Kernel | None = None, *, netns: str | None = None,
                 proto: int = TORTIE_PROTO) -> None:
        self._own_kernel = kernel is None
        self.kernel: Kernel = kernel if kernel is not None else NetlinkKernel(netns)
        self.netns = netns
        self.proto = proto
        self._by_class: dict[str, dict[RouteKey, Route]] = {}
        self._order: list[str] = []
        self._desired: dict[RouteKey, Route] = {}
        self._actual: dict[RouteKey, Route] = {}
        self._strays: list[Route] = []  # second tortie routes on one key (other metric)
        self._dirty: set[RouteKey] = set()
        self._pending: set[RouteKey] = set()
        self._failed: dict[RouteKey, WriteError] = {}
        self._reclaim: set[RouteKey] = set()  # ours, replaced by hand with another protocol
        self._need_resync = True
        self.last_apply: float | None = None  # monotonic time of the last successful apply

    # -- desired state --------------------------------------------------------------------
    def set_routes(self, route_class: str, routes: Iterable[Route]) -> None:
        """Replace the desired routes of one class."""
        new = {r.key: r for r in routes}
        old = self._by_class.get(route_class)
        if old is None:
            self._add_class(route_class)
            old = {}
        self._by_class[route_class] = new
        if len(self._order) == 1:  # one class: the winner is the class's route itself
            desired, dirty = self._desired, self._dirty
            for k, r in new.items():
                if old.get(k) != r:
                    desired[k] = r
                    dirty.add(k)
            for k in old.keys() - new.keys():
                del desired[k]
                dirty.add(k)
            return
        changed = [k for k, r in new.items() if old.get(k) != r]
        changed += [k for k in old if k not in new]
        for k in changed:
            self._resolve(k)

    def set_route(self, route_class: str, route: Route) -> None:
        """Add or change one desired route (the CNI ADD path: one /32, applied at once)."""
        by_class = self._by_class.get(route_class)
        if by_class is None:
            self._add_class(route_class)
            by_class = self._by_class[route_class] = {}
        k = route.key  # a property: computed once (a BGP burst sets 10,000 routes this way)
        by_class[k] = route
        if len(self._order) == 1:  # one class: the winner is this route itself
            self._desired[k] = route
            self._dirty.add(k)
        else:
            self._resolve(k)

    def update_routes(self, route_class: str, routes: Iterable[Route],
                      removed: Iterable[RouteKey | Route | str] = ()) -> None:
        """Add or change several desired routes of one class and remove others: a delta
        (routes learned over BGP), in one call instead of one per route."""
        by_class = self._by_class.get(route_class)
        if by_class is None:
            self._add_class(route_class)
            by_class = self._by_class[route_class] = {}
        one = len(self._order) == 1
        desired, dirty, resolve = self._desired, self._dirty, self._resolve
        for r in routes:
            dst = r.dst
            k = (AF_INET6 if ":" in dst else AF_INET, r.table, dst)  # r.key, inlined
            by_class[k] = r
            if one:  # one class: the winner is this route itself
                desired[k] = r
                dirty.add(k)
            else:
                resolve(k)
        for key in removed:
            self.remove_route(route_class, key)

    def remove_route(self, route_class: str, key: RouteKey | Route | str) -> None:
        """Remove one desired route, named by its key, the Route, or a dst in the main table."""
        if isinstance(key, Route):
            key = key.key
        elif isinstance(key, str):
            key = route_key(key)
        if self._by_class.get(route_class, {}).pop(key, None) is not None:
            self._resolve(key)

    def desired(self) -> dict[RouteKey, Route]:
        return dict(self._desired)

    def _add_class(self, route_class: str) -> None:
        self._order.append(route_class)
        rank = {c: i for i, c in enumerate(CLASS_PRIORITY)}
        self._order.sort(key=lambda c: (rank.get(c, len(rank)), c))

    def _resolve(self, k: RouteKey) -> None:
        for c in self._order:
            r = self._by_class[c].get(k)
            if r is not None:
                self._desired[k] = r
                break
        else:
            self._desired.pop(k, None)
        self._dirty.add(k)

    # -- state ----------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self._dirty or self._need_resync or self._strays)

    @property
    def pending(self) -> frozenset[RouteKey]:
        return frozenset(self._pending)

    @property
    def failed(self) -> dict[RouteKey, WriteError]:
        return dict(self._failed)

    def actual(self) -> dict[RouteKey, Route]:
        return dict(self._actual)

    def close(self) -> None:
        """Close the kernel connection (when this manager opened it)."""
        if self._own_kernel:
            self.kernel.close()

    def request_resync(self) -> None:
        """Make the next apply() start with a full dump (the monitor lost events)."""
        self._need_resync = True

    def resync(self) -> None:
        """Read every tortie route of every table from the kernel and diff all keys on the
        next apply. Routes equal to the desired ones are adopted as they are."""
        actual: dict[RouteKey, Route] = {}
        strays = []
        for r in self.kernel.dump_routes(self.proto):
            k = r.key
            if k in actual:
                keep = self._desired.get(k)
                if keep is not None and keep.metric == r.metric:
                    strays.append(actual[k])
                    actual[k] = r
                else:
                    strays.append(r)
            else:
                actual[k] = r
        self._actual = actual
        self._strays = strays
        self._dirty = set(self._desired)
        self._dirty.update(actual)
        self._failed.clear()
        self._need_resync = False

    # -- reconcile ------------------------------------------------------------------------
    def apply(self) -> ApplyStats:
        """Write the difference between desired and actual for every dirty key, in one
        batch (deletes first, so a metric change can delete then add)."""
        t0 = time.perf_counter()
        resynced = self._need_resync
        if resynced:
            self.resync()
        actual, pending = self._actual, self._pending
        try:
            ops, keys = self._plan()
            errors = self.kernel.write_routes(ops, self.proto) if ops else []
        except Exception:
            self._need_resync = True  # the dirty keys are gone; a resync finds them again
            raise
        counts = {ADD: 0, REPLACE: 0, DELETE: 0}
        failed = {id(e.item): e for e in errors}
        retried = self._failed
        for (op, r), k in zip(ops, keys, strict=True):
            e = failed.get(id(r)) if failed else None
            if e is None or (op == DELETE and e.errno == errno.ESRCH):
                counts[op] += 1
                if op == DELETE:
                    if actual.get(k) is r:
                        del actual[k]
                else:
                    actual[k] = r
                if retried:
                    retried.pop(k, None)
            elif op != DELETE and e.errno in _WAIT_FOR_LINK:
                pending.add(k)
            elif op == ADD and e.errno == errno.EEXIST and not resynced:
                # Our view was stale (a missed or reordered notification): look again.
                self._need_resync = True
            else:
                retried[k] = e
        # A delete of a route that is already gone did what it should.
        errors = [e for e in errors if not (e.op == DELETE and e.errno == errno.ESRCH)]
        if errors:
            log.warning("route writes failed", count=len(errors),
                        first=[str(e) for e in errors[:5]])
        self.last_apply = time.monotonic()
        return ApplyStats(added=counts[ADD], replaced=counts[REPLACE], deleted=counts[DELETE],
                          pending=len(pending), errors=tuple(errors), resynced=resynced,
                          seconds=time.perf_counter() - t0)

    def _plan(self) -> tuple[list[tuple[str, Route]], list[RouteKey]]:
        """The operations for the dirty keys (deletes first, so a metric change can delete
        then add), with the key of each."""
        desired, actual, pending = self._desired, self._actual, self._pending
        links = self.kernel.links()
        refreshed = False
        deletes: list[tuple[str, Route]] = [(DELETE, r) for r in self._strays]
        del_keys: list[RouteKey] = [r.key for r in self._strays]
        writes: list[tuple[str, Route]] = []
        write_keys: list[RouteKey] = []
        for k in self._dirty:
            d = desired.get(k)
            a = actual.get(k)
            if d is None:
                pending.discard(k)
                if a is not None:
                    deletes.append((DELETE, a))
                    del_keys.append(k)
                continue
            if a is not None and (d is a or _same(d, a)):
                pending.discard(k)
                continue
            if d.dev is not None and d.dev not in links:
                if not refreshed:  # a link may have appeared since the last notification
                    links, refreshed = self.kernel.links(refresh=True), True
                if d.dev not in links:
                    pending.add(k)
                    if a is not None:  # what is there now is wrong: better no route
                        deletes.append((DELETE, a))
                        del_keys.append(k)
                    continue
            pending.discard(k)
            if a is None:
                writes.append((REPLACE if k in self._reclaim else ADD, d))
            elif a.metric != d.metric:
                deletes.append((DELETE, a))
                del_keys.append(k)
                writes.append((ADD, d))
            else:
                writes.append((REPLACE, d))
            write_keys.append(k)
        self._dirty = set()
        self._strays = []
        self._reclaim.clear()
        return deletes + writes, del_keys + write_keys

    # -- notifications (from routing.monitor.Monitor) --------------------------------------
    def on_route_event(self, deleted: bool, proto: int, route: Route,
                       replaced: bool = False) -> None:
        """A route notification. ``replaced``: the message carried NLM_F_REPLACE (it took
        the place of an existing route with the same dst and metric)."""
        k = route.key
        a = self._actual.get(k)
        if proto != self.proto:
            # `ip route change/replace` by hand rewrites our route and stamps it with the
            # default protocol. It is still the route we made, changed: take it back (with
            # a replace). A foreign route that never replaced ours is left alone.
            if replaced and not deleted and a is not None and a.metric == route.metric:
                del self._actual[k]
                self._reclaim.add(k)
                self._dirty.add(k)
            return
        if deleted:
            if a is not None and a.metric == route.metric:
                del self._actual[k]
                self._dirty.add(k)
        elif a is None or a != route:
            # Keep the kernel's version (with the device it resolved for a gateway, so a
            # link event finds it). Changed by hand: dirty. The echo of our own write, or
            # the same route with its resolved device: nothing to do.
            if a is not None and a.metric != route.metric:
                self._need_resync = True  # a second tortie route on this key
            self._actual[k] = route
            if a is None or not _same(a, route):
                self._dirty.add(k)

    def on_link_event(self, name: str, present: bool, up: bool) -> None:
        if present and up:
            for k in self._pending:
                d = self._desired.get(k)
                # A gateway route without a device may wait for any link (its uplink).
                if d is not None and (d.dev == name or d.dev is None):
                    self._dirty.add(k)
            return
        # Down or gone: the kernel dropped routes through it without telling anyone. Forget
        # them; the next apply writes them again (or parks them as pending), and a route the
        # kernel kept after all shows up as EEXIST, which triggers a resync.
        for k, a in list(self._actual.items()):
            if a.dev == name:
                del self._actual[k]
                self._dirty.add(k)

    async def run_monitor(self, on_change) -> None:
        """Follow kernel notifications until cancelled; ``on_change()`` is called whenever
        this manager became dirty. Runs on the current event loop via add_reader."""
        from .monitor import Monitor

        mon = Monitor(netns=self.netns, route_mgr=self)
        try:
            await mon.run(on_change)
        finally:
            mon.close()
