"""Netlink notifications to the managers: drift repair without polling.

One non-blocking socket joined to the link, IPv4/IPv6 route and IPv4/IPv6 rule groups.
It serves the dataplane driver's thread, the one that owns every kernel write: wait for
``fileno()`` to be readable (``selectors``, with the driver's own wake-up fd), then
``drain()`` reads every queued notification, feeds each to the managers, and says whether
one of them became dirty, so the thread runs their ``apply()``. Everything happens on that
thread: the managers are not thread-safe, and need not be.

    mon = Monitor(netns, route_mgr=routes, rule_mgr=rules)
    sel = selectors.DefaultSelector(); sel.register(mon, selectors.EVENT_READ)
    while running:
        if sel.select(timeout) and mon.drain():
            routes.apply(); rules.apply()

A route deleted or changed by hand marks its key pending and the next apply puts it back;
the echo of our own writes finds nothing to do. If the kernel drops notifications
(ENOBUFS: the socket buffer overflowed) the managers are told to resync.

``attach(loop, on_change)`` / ``await run(on_change)`` do the same from an asyncio loop
(tests; never the agent's loop, which must not write the kernel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tortie.log import get_logger

from . import netlink as nl
from .kernel import NetlinkKernel

log = get_logger("routes")

GROUPS = (nl.RTNLGRP_LINK, nl.RTNLGRP_IPV4_ROUTE, nl.RTNLGRP_IPV6_ROUTE,
          nl.RTNLGRP_IPV4_RULE, nl.RTNLGRP_IPV6_RULE)
_IFF_UP = 0x1
BATCH = 2000  # notifications handled per loop callback


class Monitor:
    def __init__(self, netns: str | None = None, *, route_mgr=None, rule_mgr=None) -> None:
        self.route_mgr = route_mgr
        self.rule_mgr = rule_mgr
        self.sock = nl.NetlinkSocket(netns, groups=GROUPS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0  # messages seen (for tests and metrics)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.detach()
        self.sock.close()

    def _dirty(self) -> bool:
        return any(m is not None and m.dirty for m in (self.route_mgr, self.rule_mgr))

    def drain(self) -> bool:
        """Read and dispatch every queued notification; True if a manager is dirty
        afterwards (lost notifications: the managers resync, and it is True)."""
        return self.process()

    def process(self, limit: int = 0) -> bool:
        """Read and dispatch what is queued (at most ``limit`` notifications, 0 = all);
        True if a manager is dirty afterwards."""
        try:
            bufs = self.sock.recv_nowait(limit)
        except OverflowError:
            log.warning("netlink notifications lost, resyncing")
            for m in (self.route_mgr, self.rule_mgr):
                if m is not None:
                    m.request_resync()  # in their next apply (no I/O here)
            return True
        for buf in bufs:
            self._dispatch(buf)
        return self._dirty()

    def _dispatch(self, buf: bytes) -> None:
        rm, rl = self.route_mgr, self.rule_mgr
        kernel = getattr(rm, "kernel", None)
        for off, length, mtype in nl.iter_messages(buf):
            self.events += 1
            if mtype in (nl.RTM_NEWROUTE, nl.RTM_DELROUTE):
                if rm is None:
                    continue
                out: list = []
                names = kernel.link_names if isinstance(kernel, NetlinkKernel) else {}
                # A notification is one datagram of one message: no copy needed then.
                one = buf if off == 0 and length >= len(buf) - 3 else buf[off:off + length]
                nl.parse_routes(one, names, None, out)
                replaced = bool(nl.header_flags(buf, off) & nl.NLM_F_REPLACE)
                for t, proto, route in out:
                    rm.on_route_event(t == nl.RTM_DELROUTE, proto, route, replaced)
            elif mtype in (nl.RTM_NEWLINK, nl.RTM_DELLINK):
                index, name = nl.parse_link(buf, off, length)
                flags = nl.link_flags(buf, off)
                present = mtype == nl.RTM_NEWLINK
                new = False
                if kernel is not None:
                    new = present and index not in kernel.link_names
                    kernel.note_link(index, name, present)
                if rm is not None and name:
                    rm.on_link_event(name, present, bool(flags & _IFF_UP), new)
            elif mtype in (nl.RTM_NEWRULE, nl.RTM_DELRULE) and rl is not None:
                out = []
                nl.parse_rules(buf[off:off + length], out)
                for t, rule, raw in out:
                    rl.on_rule_event(t == nl.RTM_DELRULE, rule, nl.rule_priority(raw))

    # -- asyncio --------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], object]) -> None:
        """Watch the socket on ``loop``; call ``on_change()`` when a manager became dirty."""
        def readable() -> None:
            try:
                # Bounded, so a flood (the echo of a 50k-route batch) does not stall the
                # loop: the fd stays readable and the loop calls again after other work.
                if self.process(BATCH):
                    on_change()
            except Exception:  # one bad message must not kill the agent's loop
                log.exception("netlink monitor")
        self._loop = loop
        loop.add_reader(self.fileno(), readable)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fileno())
            self._loop = None

    async def run(self, on_change: Callable[[], object]) -> None:
        """attach() to the running loop and wait until cancelled."""
        self.attach(asyncio.get_running_loop(), on_change)
        try:
            await asyncio.Event().wait()
        finally:
            self.detach()
