"""RouteManager against the real kernel, inside a fresh network namespace per test."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from routing_helpers import async_wait_until

from tortie.routing import netlink as nl
from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.monitor import Monitor
from tortie.routing.route_mgr import RouteManager

pytestmark = pytest.mark.timeout(60)  # a lost netlink reply must fail, not hang

# One pod /32 and /128, the node's blocks as blackholes, a learned block over two peers.
ROUTES = [
    Route("10.1.0.5/32", dev="vA"),
    Route("fd00:1::5/128", dev="vA"),
    Route("10.1.0.0/26", type="blackhole"),
    Route("fd00:1::/122", type="blackhole"),
    Route("10.2.0.0/26", gateways=("10.9.0.2", "10.9.0.3")),
    Route("fd00:2::/122", gateways=("fd00:9::2", "fd00:9::3"), dev="vA"),
    Route("10.3.0.0/26", gateways=("10.9.0.4",)),
    Route("10.4.0.0/24", gateways=("10.9.0.7",), table=1000),
    # Every other shape the encoder knows, so adoption is checked for each of them.
    Route("10.5.0.0/24", gateways=("192.0.2.1",), dev="vA", onlink=True),
    Route("10.6.0.0/24", dev="vA", src="10.9.0.1"),
    Route("10.7.0.0/24", gateways=("10.9.0.2",), metric=100),
    Route("fd00:3::/64", gateways=("fd00:9::2",)),
]


def load(m: RouteManager, routes=ROUTES) -> None:
    m.set_routes("workloads", [r for r in routes if r.dev and not r.gateways])
    m.set_routes("blocks", [r for r in routes if r.type == "blackhole"])
    m.set_routes("bgp", [r for r in routes if r.gateways])


def test_install_diff_remove(node):
    m = RouteManager(netns=node.ns)
    load(m)
    st = m.apply()
    assert (st.added, st.replaced, st.deleted, st.errors) == (len(ROUTES), 0, 0, ())
    shown = {r["dst"]: r for r in node.routes()}
    assert set(shown) == {"10.1.0.5", "fd00:1::5", "10.1.0.0/26", "fd00:1::/122",
                          "10.2.0.0/26", "fd00:2::/122", "10.3.0.0/26", "10.4.0.0/24",
                          "10.5.0.0/24", "10.6.0.0/24", "10.7.0.0/24", "fd00:3::/64"}
    assert shown["10.5.0.0/24"]["flags"] == ["onlink"]
    assert shown["10.6.0.0/24"]["prefsrc"] == "10.9.0.1"
    assert shown["10.7.0.0/24"]["metric"] == 100
    assert shown["10.1.0.5"]["dev"] == "vA" and shown["10.1.0.5"]["scope"] == "link"
    assert shown["10.1.0.0/26"]["type"] == "blackhole"
    assert shown["fd00:1::/122"]["type"] == "blackhole"
    for dst, gws in (("10.2.0.0/26", {"10.9.0.2", "10.9.0.3"}),
                     ("fd00:2::/122", {"fd00:9::2", "fd00:9::3"})):
        assert {h["gateway"] for h in shown[dst]["nexthops"]} == gws  # ECMP, both families
    assert shown["10.4.0.0/24"]["table"] == "1000"

    # The diff touches only what changed.
    m.set_route("workloads", Route("10.1.0.5/32", dev="vC"))
    m.set_route("bgp", Route("10.2.0.0/26", gateways=("10.9.0.2", "10.9.0.3", "10.9.0.4")))
    m.remove_route("bgp", Route("10.3.0.0/26", gateways=("10.9.0.4",)))
    st = m.apply()
    assert (st.added, st.replaced, st.deleted, st.errors) == (0, 2, 1, ())
    shown = {r["dst"]: r for r in node.routes()}
    assert shown["10.1.0.5"]["dev"] == "vC" and "10.3.0.0/26" not in shown
    assert len(shown["10.2.0.0/26"]["nexthops"]) == 3

    # A fresh resync agrees with what the manager believes: nothing to do.
    m.resync()
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 0, 0)

    for cls in ("workloads", "blocks", "bgp"):
        m.set_routes(cls, [])
    assert m.apply().deleted == len(ROUTES) - 1
    assert node.routes() == []


def test_other_protocols_are_never_touched(node):
    node.ip("route", "add", "10.50.0.0/24", "dev", "vA")  # proto boot
    node.ip("route", "add", "10.51.0.0/24", "dev", "vA", "proto", "static")
    node.ip("route", "add", "10.1.0.9/32", "dev", "vB", "proto", "static")
    node.ip("route", "add", "10.52.0.0/24", "dev", "vA", "table", "1000")
    before = node.routes(proto=None)
    m = RouteManager(netns=node.ns)
    load(m)
    m.apply()
    # A desired route on a key a foreign route holds: reported, the foreign one stays.
    m.set_route("workloads", Route("10.1.0.9/32", dev="vA"))
    st = m.apply()
    assert [e.errno for e in st.errors] == [17]  # EEXIST
    assert "10.1.0.9/32" in str(st.errors[0].item)
    for cls in ("workloads", "blocks", "bgp"):
        m.set_routes(cls, [])
    m.resync()
    m.apply()
    assert node.routes() == []
    assert node.routes(proto=None) == before


def test_restarted_manager_adopts_without_rewriting(node, route_events):
    first = RouteManager(netns=node.ns)
    load(first)
    first.apply()
    before = node.routes()
    events = route_events(node.ns)

    second = RouteManager(netns=node.ns)
    load(second)
    st = second.apply()
    assert st.resynced and (st.added, st.replaced, st.deleted, st.errors) == (0, 0, 0, ())
    assert events.take() == []  # not one RTM_NEWROUTE/RTM_DELROUTE: the routes were adopted
    assert node.routes() == before

    # The evidence can fail: a real change is seen.
    second.set_route("workloads", Route("10.1.0.5/32", dev="vC"))
    second.apply()
    assert (nl.RTM_NEWROUTE, "10.1.0.5/32") in events.take()


AGENT = textwrap.dedent("""
    import sys, time
    from tortie.routing.route_mgr import RouteManager
    from tortie.routing.model import Route
    m = RouteManager(netns=sys.argv[1])
    m.set_routes("workloads", [Route(f"10.1.{i // 250}.{i % 250}/32", dev="vA") for i in range(250)])
    m.set_routes("blocks", [Route("10.1.0.0/16", type="blackhole")])
    assert not m.apply().errors
    print("ready", flush=True)
    time.sleep(60)
""")


def test_kill_9_then_restart_keeps_route_objects(node, route_events):
    proc = subprocess.Popen([sys.executable, "-c", AGENT, node.ns], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = node.routes()
    assert len(before) == 251
    events = route_events(node.ns)
    m = RouteManager(netns=node.ns)
    m.set_routes("workloads", [Route(f"10.1.{i // 250}.{i % 250}/32", dev="vA")
                               for i in range(250)])
    m.set_routes("blocks", [Route("10.1.0.0/16", type="blackhole")])
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 0, 0)
    assert events.take() == [] and node.routes() == before


def run_with_monitor(m: RouteManager, body) -> None:
    """Run ``body(loop)`` with a monitor that applies whenever the manager is dirty."""
    async def main():
        mon = Monitor(m.netns, route_mgr=m)
        mon.attach(asyncio.get_running_loop(), m.apply)
        try:
            await body()
        finally:
            mon.close()
    asyncio.run(main())


async def sh(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(*cmd)
    assert await proc.wait() == 0


def test_drift_is_repaired_within_2s(node):
    m = RouteManager(netns=node.ns)
    load(m)
    m.apply()

    async def body():
        for dst in ("10.1.0.5/32", "fd00:1::5/128", "10.2.0.0/26", "10.4.0.0/24"):
            table = "1000" if dst == "10.4.0.0/24" else "main"
            fam = "-6" if ":" in dst else "-4"
            await sh("ip", "-n", node.ns, fam, "route", "del", dst, "table", table)
            gone_then_back = await async_wait_until(
                lambda d=dst: d.removesuffix("/32").removesuffix("/128") in node.route_dsts(),
                2.0)
            assert gone_then_back < 2.0
        # Changed by hand, keeping tortie's protocol or not (`ip route change` stamps
        # proto boot by default): put back as it was.
        for proto in ([], ["proto", str(TORTIE_PROTO)]):
            await sh("ip", "-n", node.ns, "route", "change", "10.1.0.5/32", "dev", "vC", *proto)
            await async_wait_until(lambda: any(
                r["dst"] == "10.1.0.5" and r["dev"] == "vA" for r in node.routes()), 2.0)
        await sh("ip", "-n", node.ns, "-6", "route", "replace", "fd00:1::5/128", "dev", "vC")
        await async_wait_until(lambda: any(
            r["dst"] == "fd00:1::5" and r["dev"] == "vA" for r in node.routes()), 2.0)

    run_with_monitor(m, body)
    m.resync()
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 0, 0)


def test_pending_route_waits_for_its_device(node):
    m = RouteManager(netns=node.ns)
    m.set_routes("workloads", [Route("10.1.0.7/32", dev="cali7"),
                               Route("fd00:1::7/128", dev="cali7")])
    st = m.apply()
    assert st.pending == 2 and st.added == 0 and not st.errors
    assert node.routes() == []

    async def body():
        await sh("ip", "-n", node.ns, "link", "add", "cali7", "type", "veth", "peer", "name", "p7")
        await sh("ip", "-n", node.ns, "link", "set", "cali7", "up")
        await async_wait_until(lambda: node.route_dsts() == {"10.1.0.7", "fd00:1::7"}, 2.0)
        assert not m.pending
        # The device goes down: the kernel drops the IPv4 route silently; it comes back
        # with the device.
        await sh("ip", "-n", node.ns, "link", "set", "cali7", "down")
        await async_wait_until(lambda: "10.1.0.7" not in node.route_dsts(), 2.0)
        await asyncio.sleep(0.1)
        await sh("ip", "-n", node.ns, "link", "set", "cali7", "up")
        await async_wait_until(lambda: {"10.1.0.7", "fd00:1::7"} <= node.route_dsts(), 2.0)

    run_with_monitor(m, body)


@pytest.mark.parametrize("n", [3000])
def test_bulk_batches_and_reports_which_route_failed(node, n):
    m = RouteManager(netns=node.ns)
    routes = [Route(f"10.{20 + i // 65536}.{(i >> 8) & 255}.{i & 255}/32", dev="vA")
              for i in range(n)]
    # One route with a gateway nobody can reach fails; the rest of the batch goes in.
    bad = Route("10.99.0.0/24", gateways=("192.0.2.1",))
    m.set_routes("workloads", routes)
    m.set_route("bgp", bad)
    st = m.apply()
    assert st.added == n and len(st.errors) == 1 and st.errors[0].item == bad
    assert st.errors[0].errno == 101  # ENETUNREACH
    assert len(node.routes()) == n


def test_netns_sockets_leave_the_thread_where_it_was(node):
    from tortie.errors import DataplaneError

    own = os.readlink("/proc/thread-self/ns/net")
    m = RouteManager(netns=node.ns)
    m.set_route("workloads", Route("10.1.0.5/32", dev="vA"))
    m.apply()
    assert os.readlink("/proc/thread-self/ns/net") == own
    assert node.route_dsts() == {"10.1.0.5"}
    with pytest.raises(DataplaneError):
        RouteManager(netns=node.ns + "-missing")
    assert os.readlink("/proc/thread-self/ns/net") == own
    m.close()


def test_renamed_device_is_seen_on_resync(node):
    m = RouteManager(netns=node.ns)
    m.set_route("workloads", Route("10.1.0.5/32", dev="vC"))
    m.apply()
    m.resync()  # the parse cache now knows this route's message
    assert m.apply().replaced == 0
    node.ip("link", "set", "vC", "down")
    node.ip("link", "set", "vC", "name", "vE")
    node.ip("link", "set", "vE", "up")
    node.ip("route", "replace", "10.1.0.5/32", "dev", "vE", "proto", str(TORTIE_PROTO))
    m.resync()
    st = m.apply()
    # The route is on vE now, not on the vC it should use, and vC is gone: it waits.
    assert st.deleted == 1 and st.pending == 1 and node.routes() == []


def test_a_route_for_a_device_made_after_the_last_link_notification_goes_in_at_once(node):
    """The device of a new route is looked up by name (one request; a dump of every link
    is interrupted by links created meanwhile, which a burst of pods does all the time)."""
    from tortie.routing.model import Route
    from tortie.routing.route_mgr import RouteManager

    mgr = RouteManager(netns=node.ns)
    mgr.apply()
    subprocess.run(["ip", "-n", node.ns, "link", "add", "vE", "type", "veth", "peer", "name", "vF"], check=True)
    subprocess.run(["ip", "-n", node.ns, "link", "set", "vE", "up"], check=True)
    mgr.update_routes("workloads", [Route(dst="10.9.9.9/32", dev="vE", scope="link")])
    stats = mgr.apply()  # no monitor here: the manager has not heard of vE
    assert (stats.added, stats.pending, stats.errors) == (1, 0, ())
    out = subprocess.run(["ip", "-n", node.ns, "route", "show", "10.9.9.9"], capture_output=True,
                         text=True, check=True).stdout
    assert "dev vE" in out
    mgr.close()
