"""The property of test_route_mgr_props.py on the real kernel: random desired changes,
hand edits with `ip`, veths deleted and re-created; the monitor's real notifications are
fed to the manager; in the end the kernel holds exactly the desired routes whose devices
exist. This is what keeps the fake kernel honest."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from routing_helpers import assert_converged, desired_step, scratch_netns, step_strategy

from tortie.routing.kernel import NetlinkKernel
from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.monitor import Monitor
from tortie.routing.route_mgr import RouteManager

pytestmark = pytest.mark.timeout(300)

LINKS = ("vA", "vB", "vC")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step_strategy(("workloads", "bgp"), LINKS), max_size=15))
# Always covered: `ip route change` by hand without tortie's protocol, both families.
@example([("set_routes", "workloads", [Route("10.1.0.1/32", dev="vA"),
                                       Route("fd00:1::1/128", dev="vA", table=1000)]),
          ("apply",),
          ("hand_change", Route("10.1.0.1/32", dev="vA"), "vB", False),
          ("hand_change", Route("fd00:1::1/128", dev="vA", table=1000), "vC", False)])
def test_real_kernel_converges_to_desired(steps):
    with scratch_netns("prop") as ns:
        def ip(*args: str, check: bool = True) -> None:
            subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True)

        def add_link(name: str) -> None:
            ip("link", "add", name, "type", "veth", "peer", "name", f"p{name}")
            ip("link", "set", f"p{name}", "up")
            ip("link", "set", name, "up")

        links = set(LINKS)
        add_link("vG")  # the gateways' segment is never deleted
        ip("addr", "add", "10.9.0.1/24", "dev", "vG")
        ip("-6", "addr", "add", "fd00:9::1/64", "dev", "vG", "nodad")
        for name in LINKS:
            add_link(name)
        m = RouteManager(netns=ns)
        mon = Monitor(ns, route_mgr=m)
        try:
            for step in steps:
                kind = step[0]
                if desired_step(m, step):
                    pass
                elif kind == "hand_delete":
                    ip("route", "del", step[1].dst, "table", str(step[1].table), "proto",
                       str(TORTIE_PROTO), check=False)  # `ip` picks the family from dst
                elif kind == "hand_change":
                    keep = ["proto", str(TORTIE_PROTO)] if step[3] else []
                    ip("route", "change", step[1].dst, "dev", step[2], "table",
                       str(step[1].table), *keep, check=False)
                elif kind == "link_del" and step[1] in links:
                    ip("link", "del", step[1])
                    links.discard(step[1])
                elif kind == "link_add" and step[1] not in links:
                    add_link(step[1])
                    links.add(step[1])
                elif kind == "apply":
                    mon.drain()
                    m.apply()
            mon.drain()
            st_ = m.apply()
            assert not st_.errors
            mon.drain()  # our own echoes: nothing to do
            assert not m.dirty
        finally:
            mon.close()
            m.close()
        k = NetlinkKernel(ns)
        try:
            have = {r.key: r for r in k.dump_routes(TORTIE_PROTO)}
        finally:
            k.close()
        assert_converged(m, have, links)
