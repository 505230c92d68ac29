"""The netlink monitor: from a plain thread (selectors + drain, the dataplane driver's way) and
on the asyncio loop; one monitor for both managers; lost events."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import subprocess
import threading

import pytest
from routing_helpers import async_wait_until, wait_until

from tortie.routing import netlink as nl
from tortie.routing.model import Route, Rule
from tortie.routing.monitor import Monitor
from tortie.routing.route_mgr import RouteManager
from tortie.routing.rule_mgr import RuleManager

pytestmark = pytest.mark.timeout(60)


def applied_managers(ns: str) -> tuple[RouteManager, RuleManager]:
    """A route and a rule manager with one route and one rule applied in ``ns``."""
    routes = RouteManager(netns=ns)
    rules = RuleManager(netns=ns)
    routes.set_routes("workloads", [Route("10.1.0.5/32", dev="vA")])
    rules.set_rules("egress", [Rule(110, src="10.1.0.0/16", table=1000)])
    routes.apply()
    rules.apply()
    return routes, rules


def dataplane_thread(mon: Monitor, managers, stop_fd: int, log: list) -> threading.Thread:
    """The driver's shape: one thread waits on the monitor and a wake-up fd, drains, and
    applies the dirty managers; it owns every kernel write."""
    def loop():
        with selectors.DefaultSelector() as sel:
            sel.register(mon, selectors.EVENT_READ)
            sel.register(stop_fd, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in sel.select(5.0)]
                if stop_fd in ready:
                    return
                if mon in ready and mon.drain():
                    log.append(tuple(m.apply() for m in managers if m.dirty))
    t = threading.Thread(target=loop, name="dataplane")
    t.start()
    return t


def test_drain_from_a_thread_repairs_a_hand_deleted_route(node):
    routes, rules = applied_managers(node.ns)
    mon = Monitor(node.ns, route_mgr=routes, rule_mgr=rules)
    assert mon.drain() is False  # the echoes of our own writes: nothing to do
    applied: list = []
    stop_r, stop_w = os.pipe()
    t = dataplane_thread(mon, (routes, rules), stop_r, applied)
    try:
        node.ip("route", "del", "10.1.0.5/32")
        wait_until(lambda: applied and "10.1.0.5" in node.route_dsts(), 2.0)
        assert applied[0][0].added == 1
        node.ip("rule", "del", "pref", "110")
        wait_until(lambda: any(r["priority"] == 110 for r in node.rules()), 2.0)
    finally:
        os.write(stop_w, b"x")
        t.join(10)
        os.close(stop_r)
        os.close(stop_w)
        mon.close()
    assert not t.is_alive()
    assert subprocess.run(["ip", "-n", node.ns, "route", "show", "10.1.0.5"], check=True,
                          capture_output=True, text=True).stdout.startswith("10.1.0.5 dev vA")
    routes.close()
    rules.close()


def test_one_monitor_feeds_both_managers(node):
    routes, rules = applied_managers(node.ns)
    applied = []

    def on_change():
        applied.append((routes.apply() if routes.dirty else None,
                        rules.apply() if rules.dirty else None))

    async def main():
        mon = Monitor(node.ns, route_mgr=routes, rule_mgr=rules)
        mon.attach(asyncio.get_running_loop(), on_change)
        try:
            for cmd in (["route", "del", "10.1.0.5/32"], ["rule", "del", "pref", "110"]):
                proc = await asyncio.create_subprocess_exec("ip", "-n", node.ns, *cmd)
                assert await proc.wait() == 0
            await async_wait_until(
                lambda: "10.1.0.5" in node.route_dsts()
                and any(r["priority"] == 110 for r in node.rules()), 2.0)
        finally:
            mon.close()

    asyncio.run(main())
    assert applied
    routes.close()
    rules.close()


def test_run_monitor_until_cancelled(node):
    m = RouteManager(netns=node.ns)
    m.set_routes("workloads", [Route("10.1.0.5/32", dev="vA")])
    m.apply()

    async def main():
        task = asyncio.create_task(m.run_monitor(m.apply))
        await asyncio.sleep(0.05)
        proc = await asyncio.create_subprocess_exec("ip", "-n", node.ns, "route", "del",
                                                    "10.1.0.5/32")
        await proc.wait()
        await async_wait_until(lambda: "10.1.0.5" in node.route_dsts(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_lost_notifications_ask_for_a_resync(node):
    m = RouteManager(netns=node.ns)
    m.apply()
    mon = Monitor(node.ns, route_mgr=m)
    try:
        mon.sock.sock.setsockopt(socket.SOL_SOCKET, nl.SO_RCVBUFFORCE, 4096)
        m.set_routes("workloads", [Route(f"10.1.{i // 250}.{i % 250}/32", dev="vA")
                                   for i in range(2000)])
        m.apply()
        assert not m.dirty
        assert mon.drain() is True  # ENOBUFS: the manager cannot trust its view
        assert m.dirty
        st = m.apply()
        assert st.resynced and (st.added, st.replaced, st.deleted) == (0, 0, 0)
    finally:
        mon.close()
        m.close()
