"""RuleManager against the real kernel: its priority range only, drift repaired."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest
from routing_helpers import async_wait_until

from tortie.routing.model import Route, Rule
from tortie.routing.monitor import Monitor
from tortie.routing.route_mgr import RouteManager
from tortie.routing.rule_mgr import RuleManager

pytestmark = pytest.mark.timeout(60)  # a lost netlink reply must fail, not hang

POOL, POOL6 = "10.1.0.0/16", "fd00:1::/64"
EGRESS = [
    Rule(100, dst=POOL),  # pod-to-pod traffic keeps the main table
    Rule(100, dst=POOL6),
    Rule(110, src=POOL, table=1000),  # everything else from the pool leaves by table 1000
    Rule(110, src=POOL6, table=1000),
]


def test_rules_in_the_owned_range_only(node):
    node.ip("rule", "add", "pref", "150", "fwmark", "3", "lookup", "7")  # ours to clean up
    node.ip("rule", "add", "pref", "300", "from", "1.2.3.0/24", "lookup", "9")  # not ours
    node.ip("rule", "add", "pref", "99", "to", "10.1.0.0/16", "lookup", "9")  # not ours
    m = RuleManager(netns=node.ns)
    m.set_rules("egress", EGRESS)
    st = m.apply()
    assert (st.added, st.deleted, st.errors) == (4, 1, ())
    v4 = node.rules("-4")
    assert {(r["priority"], r.get("dst"), r.get("dstlen"), r.get("src"), r.get("srclen"),
             r["table"]) for r in v4 if 100 <= r["priority"] < 200} == {
        (100, "10.1.0.0", 16, "all", None, "main"), (110, None, None, "10.1.0.0", 16, "1000")}
    assert {r["priority"] for r in v4} == {0, 99, 100, 110, 300, 32766, 32767}
    assert {r["priority"] for r in node.rules("-6")} == {0, 100, 110, 32766}
    again = RuleManager(netns=node.ns)  # a restart: nothing to do
    again.set_rules("egress", EGRESS)
    st = again.apply()
    assert (st.added, st.deleted) == (0, 0)

    # A pool's egress goes away: its rules, and (through the route manager) its table.
    routes = RouteManager(netns=node.ns)
    routes.set_routes("egress", [Route("0.0.0.0/0", gateways=("10.9.0.254",), table=1000)])
    routes.apply()
    assert node.ip("route", "show", "table", "1000").stdout.startswith("default via 10.9.0.254")
    m.set_rules("egress", [r for r in EGRESS if r.family == socket.AF_INET6])
    routes.set_routes("egress", [])
    assert m.apply().deleted == 2 and routes.apply().deleted == 1
    assert {r["priority"] for r in node.rules("-4")} == {0, 99, 300, 32766, 32767}
    assert node.ip("route", "show", "table", "1000").stdout == ""


def test_rule_deleted_by_hand_is_restored_within_2s(node):
    m = RuleManager(netns=node.ns)
    m.set_rules("egress", EGRESS)
    m.apply()

    async def main():
        mon = Monitor(node.ns, rule_mgr=m)
        mon.attach(asyncio.get_running_loop(), m.apply)
        try:
            for fam, src in (("-4", POOL), ("-6", POOL6)):
                proc = await asyncio.create_subprocess_exec(
                    "ip", "-n", node.ns, fam, "rule", "del", "pref", "110", "from", src)
                assert await proc.wait() == 0
                took = await async_wait_until(
                    lambda f=fam: any(r["priority"] == 110 for r in node.rules(f)), 2.0)
                assert took < 2.0
        finally:
            mon.close()

    asyncio.run(main())


def test_an_unreachable_rule_refuses_what_the_table_before_it_does_not_route(node):
    """The floor under a pool's egress table: `from <pool> unreachable` right after
    `from <pool> lookup <table>`. With the table empty the pool's traffic is refused, not
    handed on to the main table (which has a default here)."""
    node.ip("route", "add", "default", "via", "10.9.0.254")  # via vA
    floor = [Rule(110, src=POOL, table=1000), Rule(111, src=POOL, action="unreachable"),
             Rule(111, src=POOL6, action="unreachable")]
    m = RuleManager(netns=node.ns)
    m.set_rules("egress", floor)
    assert m.apply().added == 3
    listed = {r["priority"]: r for r in node.rules("-4")}
    assert listed[111].get("action") == "unreachable" and listed[111]["src"] == "10.1.0.0"
    route_get = ("route", "get", "192.0.2.1", "from", "10.1.0.5", "iif", "vC")  # a pod's packet
    subprocess.run(["ip", "netns", "exec", node.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    out = node.ip(*route_get, check=False)
    assert "unreachable" in out.stdout + out.stderr or "Network is unreachable" in out.stderr
    routes = RouteManager(netns=node.ns)
    routes.set_routes("egress", [Route("0.0.0.0/0", gateways=("10.9.0.254",), table=1000)])
    routes.apply()
    assert "via 10.9.0.254" in node.ip(*route_get).stdout and "table 1000" in node.ip(*route_get).stdout
    again = RuleManager(netns=node.ns)  # listed back as what was written: nothing to do
    again.set_rules("egress", floor)
    st = again.apply()
    assert (st.added, st.deleted) == (0, 0)
    assert str(floor[1]) == "111: from 10.1.0.0/16 unreachable"
