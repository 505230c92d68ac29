"""Property: whatever happens -- desired-state changes, routes deleted or changed by hand,
links coming and going, in any order -- after the notifications are delivered and apply()
runs, the kernel holds exactly the desired routes whose devices exist."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from routing_helpers import route_strategy, without_dev

from tortie.routing.kernel import FakeKernel
from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.route_mgr import RouteManager

LINKS = ("vA", "vB", "vC")
CLASSES = ("workloads", "bgp", "egress")

routes = route_strategy(LINKS)
ops = st.one_of(
    st.tuples(st.just("set_routes"), st.sampled_from(CLASSES), st.lists(routes, max_size=6)),
    st.tuples(st.just("set_route"), st.sampled_from(CLASSES), routes),
    st.tuples(st.just("remove_route"), st.sampled_from(CLASSES), routes),
    st.tuples(st.just("hand_delete"), routes),
    st.tuples(st.just("hand_change"), routes, st.sampled_from(LINKS)),
    st.tuples(st.just("link_del"), st.sampled_from(LINKS)),
    st.tuples(st.just("link_add"), st.sampled_from(LINKS)),
    st.tuples(st.just("apply")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=25))
def test_kernel_converges_to_desired(steps):
    k = FakeKernel(LINKS)
    m = RouteManager(k)
    for step in steps:
        kind = step[0]
        if kind == "set_routes":
            m.set_routes(step[1], {r.key: r for r in step[2]}.values())
        elif kind == "set_route":
            m.set_route(step[1], step[2])
        elif kind == "remove_route":
            m.remove_route(step[1], step[2].key)
        elif kind == "hand_delete":
            gone = k.routes.pop(step[1].key, None)
            if gone is not None:
                m.on_route_event(True, TORTIE_PROTO, gone)
        elif kind == "hand_change":
            old = k.routes.get(step[1].key)
            if old is not None and old.type == "unicast" and step[2] in k.links():
                new = Route(old.dst, table=old.table, dev=step[2], gateways=old.gateways)
                k.routes[new.key] = new
                m.on_route_event(False, TORTIE_PROTO, new)
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
    want = {key: r for key, r in m.desired().items() if r.dev is None or r.dev in k.links()}
    # A route that names no device leaves the choice to the kernel (the gateway's): which
    # device it has is not a difference.
    assert {key: without_dev(r) if want.get(key) and want[key].dev is None else r
            for key, r in k.routes.items()} == want
    assert m.pending == {key for key, r in m.desired().items() if key not in want}
    assert not m.dirty
    # And a resync from scratch agrees: nothing to write.
    writes = k.writes
    m.resync()
    assert m.apply().errors == () and k.writes == writes
