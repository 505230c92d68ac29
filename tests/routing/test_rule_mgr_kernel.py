"""RuleManager against the real kernel: its priority range only, drift repaired."""

from __future__ import annotations

import asyncio
import socket

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
