"""The route manager: desired routes by class, reconciled against the kernel's tortie routes.

Desired state is kept per route class ("workloads", "blocks", "bgp", ...); the effective
desired route for a key (family, table, dst) is the one from the first class in
``CLASS_PRIORITY`` that has it:

    workloads      a local pod's /32 (/128) to its veth: the most specific truth there is
                   (the calculation's, and the CNI server's for a pod it just wired)
    blocks         blackholes for the node's own blocks
    vxlan          other nodes' blocks of VXLAN pools, through the tunnel (or, with
                   CrossSubnet, straight to a node on this node's subnet)
    bgp            routes learned from peers
    egress         per-pool egress tables (policy routing)
    (other classes after these, by name)

The bookkeeping is one ``DeltaTracker`` (tortie.dataplane) keyed by route key: the winning
desired route, the kernel's route, and the keys where they differ. ``apply()`` writes those
keys only; keys that cannot be written now are held (``pending``: waiting for a device;
``failed``: refused by the kernel) until something about them changes.

Only routes with ``proto`` (TORTIE_PROTO) are read, changed or deleted, so routes made by
the kernel, the admin, BIRD or a CNI plugin are never touched. A new key is written with
NLM_F_EXCL, so a foreign route holding it is reported (EEXIST), not overwritten. One
exception, seen live by the monitor: ``ip route change/replace`` on one of our routes
stamps it with another protocol; that is our route changed by hand, and it is put back
(with a replace).

Work is proportional to what changed: every change updates the tracker's pending keys and
``apply()`` looks at those only. A full resync (a dump of our routes in every table) runs
on ``resync()``, and in the next apply after ``request_resync()`` (the monitor lost
events), on the first apply, and when a write found the view stale. A restarted agent adopts: after the
resync, a kernel route equal to the desired one is left alone, so no route of a live pod
is deleted and re-added. Two tortie routes on one key (another metric: "strays") are
found by the resync; the one not wanted is deleted.

A write the kernel refuses is reported in ApplyStats.errors and kept in ``failed``; it is
tried again on the next resync (the driver's slow timer), not in a hot loop.

Races handled:
- a route's device does not exist yet (CNI creates the veth after asking for the route,
  or the reverse): the route waits in ``pending`` and is written when the monitor sees
  the link come up;
- a device goes down or is deleted: IPv4 drops its routes without a notification, so the
  monitor's link event drops them from the actual state, and they are written again;
- the desired state must be complete before the first apply after a restart (the driver
  sets every class first), otherwise routes of classes not yet set would be deleted.

Not thread-safe: one thread (the dataplane driver's) calls everything here, the monitor's
``drain()`` included.
"""

from __future__ import annotations

import errno
import gc
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter

from tortie.dataplane import DeltaTracker
from tortie.log import get_logger

from .kernel import ADD, DELETE, REPLACE, Kernel, NetlinkKernel, WriteError
from .messages import RouteDelta, RouteKey
from .model import TORTIE_PROTO, Route, route_key

log = get_logger("routes")

CLASS_PRIORITY = ("workloads", "blocks", "vxlan", "bgp", "egress")

# Errors that mean "the device is not there (or not up) yet": wait for a link event.
_WAIT_FOR_LINK = (errno.ENODEV, errno.ENETDOWN, errno.ENETUNREACH)
RTPROT_KERNEL = 2  # routes the kernel makes for an address (connected subnets)
@dataclass(frozen=True, slots=True)
class WaitingForLink:
    """Why a desired route is held until a link comes up (see RouteManager.pending): its
    device is not there yet (no error), or the kernel refused it for want of a usable link
    (ENETUNREACH, ENETDOWN, ENODEV: the next hop is on no up link)."""

    error: WriteError | None = None

    def __str__(self) -> str:
        return f"waiting for a link: {self.error}" if self.error else "waiting for its device"


NO_DEVICE = WaitingForLink()


@dataclass(frozen=True, slots=True)
class ApplyStats:
    added: int = 0
    replaced: int = 0
    deleted: int = 0
    pending: int = 0  # desired routes waiting for their device (in total, after this apply)
    errors: tuple[WriteError, ...] = ()
    resynced: bool = False
    seconds: float = 0.0


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the duration of a batch (Mercurial's ``nogc``).

    A 50,000-route apply or dump allocates a few objects per route that all live on (the
    Routes, their keys, the operations), none of them in a cycle; with the collector on,
    that growth sets off several full collections of a heap that holds every route
    (30-250 ms per batch, measured). Paused, the young generation is collected once
    afterwards, in this same call (so its cost is the caller's, not a later victim's).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)


def _same(d: Route, a: Route) -> bool:
    """Whether kernel route ``a`` already is desired route ``d``. A route without a device
    gets one resolved by the kernel (the gateway's), which is not a difference."""
    if d == a:
        return True
    return d.dev is None and (d.dst, d.table, d.type, d.gateways, d.scope, d.onlink, d.src,
                              d.metric) == (a.dst, a.table, a.type, a.gateways, a.scope,
                                            a.onlink, a.src, a.metric)


class RouteManager:
    name = "routes"

    def __init__(self, kernel: Kernel | None = None, *, netns: str | None = None,
                 proto: int = TORTIE_PROTO) -> None:
        self._own_kernel = kernel is None
        self.kernel: Kernel = kernel if kernel is not None else NetlinkKernel(netns)
        self.netns = netns
        self.proto = proto
        self._by_class: dict[str, dict[RouteKey, Route]] = {}
        self._order: list[str] = []
        self._routes: DeltaTracker[RouteKey, Route] = DeltaTracker(equal=_same)
        self._strays: list[Route] = []  # second tortie routes on one key (other metric)
        self._reclaim: set[RouteKey] = set()  # ours, replaced by hand with another protocol
        # Links present and down since their last scan: no route goes through them, so the
        # next down event (a new veth gets several) skips the scan of every route.
        self._scanned_down: set[str] = set()
        self._refused: list[RouteKey] = []  # replaces the kernel refused in this apply
        self._need_resync = True
        self.last_apply: float | None = None  # monotonic time of the last successful apply

    # -- messages -------------------------------------------------------------------------
    def on_update(self, msg: object) -> None:
        """A RouteDelta from the calculation (other messages are not this manager's)."""
        if isinstance(msg, RouteDelta):
            self.update_routes(msg.route_class, msg.routes, msg.removed)

    # -- desired state --------------------------------------------------------------------
    def set_routes(self, route_class: str, routes: Iterable[Route]) -> None:
        """Replace the desired routes of one class."""
        new = {r.key: r for r in routes}
        old = self._class(route_class)
        self._by_class[route_class] = new
        if len(self._order) == 1:  # one class: the winner is the class's route itself
            tracker = self._routes
            if old:
                tracker.update_desired((k, r) for k, r in new.items() if old.get(k) != r)
                for k in [k for k in old if k not in new]:
                    tracker.delete_desired(k)
            else:
                tracker.update_desired(new)
            return
        changed = [k for k, r in new.items() if old.get(k) != r]
        changed += [k for k in old if k not in new]
        for k in changed:
            self._resolve(k)

    def set_route(self, route_class: str, route: Route) -> None:
        """Add or change one desired route (the CNI ADD path: one /32, applied at once)."""
        self.update_routes(route_class, (route,))

    def update_routes(self, route_class: str, routes: Iterable[Route],
                      removed: Iterable[RouteKey | Route | str] = ()) -> None:
        """Add or change several desired routes of one class and remove others: a delta
        (routes learned over BGP), in one call instead of one per route."""
        by_class = self._class(route_class)
        if len(self._order) == 1:  # one class: the winner is the route itself
            def keyed():
                for r in routes:
                    k = r.key
                    by_class[k] = r
                    yield k, r
            self._routes.update_desired(keyed())
        else:
            resolve = self._resolve
            for r in routes:
                k = r.key
                by_class[k] = r
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
        return dict(self._routes.desired)

    def _class(self, route_class: str) -> dict[RouteKey, Route]:
        by_class = self._by_class.get(route_class)
        if by_class is None:
            by_class = self._by_class[route_class] = {}
            self._order.append(route_class)
            rank = {c: i for i, c in enumerate(CLASS_PRIORITY)}
            self._order.sort(key=lambda c: (rank.get(c, len(rank)), c))
        return by_class

    def _resolve(self, k: RouteKey) -> None:
        for c in self._order:
            r = self._by_class[c].get(k)
            if r is not None:
                if self._routes.desired.get(k) is not r:
                    self._routes.set_desired(k, r)
                return
        self._routes.delete_desired(k)
        self._reclaim.discard(k)

    # -- state ----------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._need_resync or bool(self._strays) or self._routes.has_work

    @property
    def pending(self) -> frozenset[RouteKey]:
        """Desired routes waiting for their device."""
        return frozenset(k for k, why in self._routes.held.items() if isinstance(why, WaitingForLink))

    @property
    def failed(self) -> dict[RouteKey, WriteError]:
        """Desired routes the kernel refused (retried on the next resync)."""
        return {k: why for k, why in self._routes.held.items() if isinstance(why, WriteError)}

    def actual(self) -> dict[RouteKey, Route]:
        return dict(self._routes.actual)

    def class_status(self, route_class: str) -> dict[RouteKey, str | None]:
        """Each desired route of one class: None when the kernel holds it as desired, else
        why not (the kernel's refusal, the link it waits for, another class's route on the
        same destination, or not written yet)."""
        tracker = self._routes
        out: dict[RouteKey, str | None] = {}
        for k, r in self._by_class.get(route_class, {}).items():
            if tracker.desired.get(k) is not r:
                out[k] = "another route holds this destination"
            elif k in tracker.pending_updates:
                why = tracker.held.get(k)
                out[k] = str(why) if why is not None else "not written yet"
            else:
                out[k] = None
        return out

    def close(self) -> None:
        """Close the kernel connection (when this manager opened it)."""
        if self._own_kernel:
            self.kernel.close()

    def request_resync(self) -> None:
        """Forget what is believed about the kernel: the next apply() starts with a full
        dump (the slow timer; the monitor lost events). No I/O here."""
        self._need_resync = True

    def resync(self) -> None:
        """The full dump now: read every tortie route of every table, so ``actual()`` is
        the kernel's (adoption after a restart reads it before the first apply), and the
        next apply() writes the difference. Routes equal to the desired ones are adopted
        as they are; failed writes are tried again."""
        with gc_paused():
            self._read_kernel()

    def _read_kernel(self) -> None:
        dumped = self.kernel.dump_routes(self.proto)
        actual = {r.key: r for r in dumped}
        strays = []
        if len(actual) < len(dumped):  # two of our routes on one key (another metric)
            actual = {}
            desired = self._routes.desired
            for r in dumped:
                k = r.key
                a = actual.get(k)
                if a is None:
                    actual[k] = r
                    continue
                keep = desired.get(k)
                if keep is not None and keep.metric == r.metric:
                    strays.append(a)
                    actual[k] = r
                else:
                    strays.append(r)
        self._routes.replace_actual(actual, same_object_unchanged=True)
        self._strays = strays
        self._need_resync = False

    # -- reconcile ------------------------------------------------------------------------
    def apply(self) -> ApplyStats:
        """Write the difference between desired and actual for every pending key, in one
        batch (deletes first, so a metric change can delete then add)."""
        with gc_paused():
            return self._apply()

    def _apply(self) -> ApplyStats:
        t0 = time.perf_counter()
        resynced = self._need_resync
        if resynced:
            self._read_kernel()
        try:
            ops, keys, waiting = self._plan()
            errors = self.kernel.write_routes(ops, self.proto) if ops else []
        except Exception:
            self._need_resync = True  # what the kernel holds now is unknown
            raise
        counts = self._settle(ops, keys, errors, resynced)
        tracker = self._routes
        if self._refused:
            # A replace the kernel refused left the old route in place: it is not what is
            # wanted either, so it goes (as for a route whose device is gone). An egress
            # table then routes nothing and its floor refuses the pool's traffic.
            stale = [(k, tracker.held.get(k)) for k in self._refused if k in tracker.actual]
            self._refused = []
            if stale:
                drops = [(DELETE, tracker.actual[k]) for k, _ in stale]
                dropped = self.kernel.write_routes(drops, self.proto)
                counts[DELETE] += self._settle(drops, [k for k, _ in stale], dropped, resynced)[DELETE]
                errors = [*errors, *dropped]
                for k, why in stale:
                    if why is not None and k not in tracker.held:
                        tracker.hold(k, why)  # released by the delete; still waits as before
        for k in waiting:
            tracker.hold(k, NO_DEVICE)
        tracker.compact()
        # A delete of a route that is already gone did what it should.
        errors = [e for e in errors if not (e.op == DELETE and e.errno == errno.ESRCH)]
        if errors:
            log.warning("route writes failed", count=len(errors),
                        first=[str(e) for e in errors[:5]])
        self.last_apply = time.monotonic()
        return ApplyStats(added=counts[ADD], replaced=counts[REPLACE], deleted=counts[DELETE],
                          pending=len(self.pending), errors=tuple(errors), resynced=resynced,
                          seconds=time.perf_counter() - t0)

    def _plan(self) -> tuple[list[tuple[str, Route]], list[RouteKey | None], list[RouteKey]]:
        """The operations for the pending keys that are not held (deletes first, so a metric
        change can delete then add), the key of each (None: a stray), and the keys that
        must wait for their device."""
        tracker = self._routes
        actual, held, reclaim = tracker.actual, tracker.held, self._reclaim
        deletes: list[tuple[str, Route]] = [(DELETE, r) for r in self._strays]
        del_keys: list[RouteKey | None] = [None] * len(deletes)
        self._strays = []
        for k in tracker.pending_deletions:
            if k not in held:
                deletes.append((DELETE, actual[k]))
                del_keys.append(k)
        writes: list[tuple[str, Route]] = []
        write_keys: list[RouteKey] = []
        waiting: list[RouteKey] = []
        settled: list[tuple[RouteKey, Route]] = []
        links = self.kernel.links()
        looked_up: set[str] = set()
        for k, d in tracker.pending_updates.items():
            if k in held:
                continue
            a = actual.get(k)
            dev = d.dev
            if dev is not None and dev not in links:
                if dev not in looked_up:  # it may have appeared since the last notification
                    looked_up.add(dev)
                    self.kernel.lookup_link(dev)
                    links = self.kernel.links()
                if dev not in links:
                    waiting.append(k)
                    if a is not None:  # what is there now is wrong: better no route
                        deletes.append((DELETE, a))
                        del_keys.append(k)
                    continue
            if a is None:
                writes.append((REPLACE if k in reclaim else ADD, d))
            elif a is d or _same(d, a):  # equal after all (a resync kept it pending)
                settled.append((k, a))
                continue
            elif a.metric != d.metric:
                deletes.append((DELETE, a))
                del_keys.append(k)
                writes.append((ADD, d))
            else:
                writes.append((REPLACE, d))
            write_keys.append(k)
        if settled:
            tracker.mark_written_many(settled)
        if reclaim:
            reclaim.difference_update(write_keys)
        deletes += writes
        del_keys += write_keys
        return deletes, del_keys, waiting

    def _settle(self, ops: list[tuple[str, Route]], keys: list[RouteKey | None],
                errors: list[WriteError], resynced: bool) -> dict[str, int]:
        """Fold the outcome of a batch into the tracker; the count of each operation done."""
        tracker = self._routes
        counts = {ADD: 0, REPLACE: 0, DELETE: 0}
        if not errors and ops and ops[0][0] != DELETE:  # the bulk case: writes only, all done
            counts.update(Counter(map(itemgetter(0), ops)))
            if len(ops) == len(tracker.pending_updates):  # ... and they were every update
                tracker.mark_all_written()
            else:
                tracker.mark_written_many(zip(keys, map(itemgetter(1), ops), strict=True))
            return counts
        failed = {id(e.item): e for e in errors}
        actual = tracker.actual
        for (op, r), k in zip(ops, keys, strict=True):
            e = failed.get(id(r)) if failed else None
            if e is None or (op == DELETE and e.errno == errno.ESRCH):
                counts[op] += 1
                if k is None:  # a stray
                    continue
                if op == DELETE:
                    if actual.get(k) is r:
                        tracker.mark_deleted(k)
                else:
                    tracker.mark_written(k, r)
            elif k is None:
                pass  # a stray that would not go: the next resync finds it again
            elif op == ADD and e.errno == errno.EEXIST and not resynced:
                # Our view was stale (a missed or reordered notification): look again.
                self._need_resync = True
            else:
                tracker.hold(k, WaitingForLink(e) if op != DELETE and e.errno in _WAIT_FOR_LINK else e)
                if op == REPLACE:
                    self._refused.append(k)
        return counts

    # -- notifications (from routing.monitor.Monitor) --------------------------------------
    def on_route_event(self, deleted: bool, proto: int, route: Route,
                       replaced: bool = False) -> None:
        """A route notification. ``replaced``: the message carried NLM_F_REPLACE (it took
        the place of an existing route with the same dst and metric)."""
        k = route.key
        tracker = self._routes
        a = tracker.actual.get(k)
        if proto != self.proto:
            if proto == RTPROT_KERNEL and not deleted and tracker.held:
                # A connected subnet appeared (an address was added): a next hop that was
                # on no link may be reachable now.
                tracker.release([k for k, why in tracker.held.items()
                                 if isinstance(why, WaitingForLink) and why.error is not None])
            # `ip route change/replace` by hand rewrites our route and stamps it with the
            # default protocol. It is still the route we made, changed: take it back (with
            # a replace). A foreign route that never replaced ours is left alone.
            if replaced and not deleted and a is not None and a.metric == route.metric:
                tracker.delete_actual(k)
                self._reclaim.add(k)
            return
        if deleted:
            if a is not None and a.metric == route.metric:
                tracker.delete_actual(k)
        elif a is None or a != route:
            # Keep the kernel's version (with the device it resolved for a gateway, so a
            # link event finds it); the tracker compares it with the desired route. The echo
            # of our own write, or the same route with its resolved device: nothing to do.
            if a is not None and a.metric != route.metric:
                self._need_resync = True  # a second tortie route on this key
            tracker.set_actual(k, route)

    def on_link_event(self, name: str, present: bool, up: bool, new: bool = False) -> None:
        """A link notification. ``new``: a link the kernel interface did not know (just
        created: nothing was routed through it)."""
        tracker = self._routes
        if present and up:
            self._scanned_down.discard(name)
            desired = tracker.desired
            # A gateway route without a device may wait for any link (its uplink).
            tracker.release([k for k, why in tracker.held.items() if isinstance(why, WaitingForLink)
                             and desired[k].dev in (name, None)])
            return
        if present and (new or name in self._scanned_down):
            self._scanned_down.add(name)
            return
        # Down or gone: the kernel dropped routes through it without telling anyone. Forget
        # them; the next apply writes them again (or holds them as pending), and a route the
        # kernel kept after all shows up as EEXIST, which triggers a resync.
        for k in [k for k, a in tracker.actual.items() if a.dev == name]:
            tracker.delete_actual(k)
        if present:
            self._scanned_down.add(name)
        else:
            self._scanned_down.discard(name)

    async def run_monitor(self, on_change) -> None:
        """Follow kernel notifications until cancelled; ``on_change()`` is called whenever
        this manager became dirty. Runs on the current event loop via add_reader."""
        from .monitor import Monitor

        mon = Monitor(netns=self.netns, route_mgr=self)
        try:
            await mon.run(on_change)
        finally:
            mon.close()
