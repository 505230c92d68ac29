"""Property: whatever happens -- desired-state changes, routes deleted or changed by hand,
links coming and going, in any order -- after the notifications are delivered and apply()
runs, the kernel holds exactly the desired routes whose devices exist."""

from __future__ import annotations

from doubles.kernel_fake import FakeKernel
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_helpers import assert_converged, desired_step, step_strategy

from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.route_mgr import RouteManager

LINKS = ("vA", "vB", "vC")


@settings(max_examples=300, deadline=None)
@given(st.lists(step_strategy(("workloads", "bgp", "egress"), LINKS), max_size=25))
def test_kernel_converges_to_desired(steps):
    k = FakeKernel(LINKS)
    m = RouteManager(k)
    for step in steps:
        kind = step[0]
        if desired_step(m, step):
            pass
        elif kind == "hand_delete":
            gone = k.routes.pop(step[1].key, None)
            if gone is not None:
                m.on_route_event(True, TORTIE_PROTO, gone)
        elif kind == "hand_change":
            old = k.routes.get(step[1].key)
            if old is not None and old.type == "unicast" and step[2] in k.links():
                new = Route(old.dst, table=old.table, dev=step[2], gateways=old.gateways)
                if step[3]:  # tortie's protocol kept
                    k.routes[new.key] = new
                    m.on_route_event(False, TORTIE_PROTO, new)
                else:  # `ip route change` stamps proto boot: the route is no longer ours
                    del k.routes[new.key]
                    k.foreign[new.key] = new
                    m.on_route_event(False, 3, new, replaced=True)
        elif kind == "link_del":
            if step[1] in k.links():
                k.del_link(step[1])
                m.on_link_event(step[1], present=False, up=False)
        elif kind == "link_add":
            if step[1] not in k.links():
                k.add_link(step[1])
                m.on_link_event(step[1], present=True, up=True)
        else:
            m.apply()
    st_ = m.apply()
    assert not st_.errors
    assert_converged(m, k.routes, k.links())
    assert not m.dirty
    # And a resync from scratch agrees: nothing to write.
    writes = k.writes
    m.resync()
    assert m.apply().errors == () and k.writes == writes
