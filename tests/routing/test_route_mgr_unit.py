"""Reconcile logic of RouteManager against the in-memory kernel (no root needed)."""

from __future__ import annotations

import errno

from doubles.kernel_fake import FakeKernel

from tortie.routing.model import Route, route_key
from tortie.routing.route_mgr import RouteManager


def mgr(*links: str) -> tuple[RouteManager, FakeKernel]:
    k = FakeKernel(links or ("vA", "vB"))
    return RouteManager(k), k


def test_install_noop_change_remove():
    m, k = mgr()
    pods = [Route(f"10.1.0.{i}/32", dev="vA") for i in range(10)]
    m.set_routes("workloads", pods)
    assert m.dirty
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (10, 0, 0)
    assert set(k.routes.values()) == set(pods)
    assert not m.dirty
    writes = k.writes
    assert m.apply().added == 0 and k.writes == writes  # nothing dirty, nothing written
    m.set_route("workloads", Route("10.1.0.3/32", dev="vB"))
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 1, 0)
    assert k.routes[route_key("10.1.0.3")].dev == "vB"
    m.set_routes("workloads", [r for r in pods if r.dst != "10.1.0.5/32"])  # and 10.1.0.3 back
    m.remove_route("workloads", "10.1.0.4/32")
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 1, 2)
    assert route_key("10.1.0.5") not in k.routes and route_key("10.1.0.4") not in k.routes


def test_class_priority_on_the_same_key():
    m, k = mgr()
    m.set_routes("bgp", [Route("10.1.0.5/32", gateways=("10.9.0.9",))])
    m.set_routes("workloads", [Route("10.1.0.5/32", dev="vA")])
    m.apply()
    assert k.routes[route_key("10.1.0.5")].dev == "vA"  # workloads beat bgp
    m.set_routes("workloads", [])
    m.apply()
    assert k.routes[route_key("10.1.0.5")].gateways == ("10.9.0.9",)  # bgp's comes back
    m.set_routes("bgp", [])
    assert m.apply().deleted == 1 and not k.routes


def test_adoption_writes_nothing():
    k = FakeKernel(("vA",))
    routes = [Route("10.1.0.5/32", dev="vA"), Route("10.1.0.0/26", type="blackhole"),
              Route("10.2.0.0/26", gateways=("10.9.0.2", "10.9.0.3"))]
    for r in routes:
        k.routes[r.key] = r
    k.routes[route_key("10.7.0.0/24")] = Route("10.7.0.0/24", dev="vA")  # no longer wanted
    m = RouteManager(k)
    m.set_routes("workloads", routes[:1])
    m.set_routes("blocks", routes[1:2])
    m.set_routes("bgp", routes[2:])
    st = m.apply()
    assert st.resynced and (st.added, st.replaced, st.deleted) == (0, 0, 1)
    assert k.writes == 1


def test_one_class_set_again_over_what_the_kernel_has():
    m, k = mgr()
    pods = [Route(f"10.1.0.{i}/32", dev="vA") for i in range(4)]
    m.set_routes("workloads", pods)
    assert m.apply().added == 4
    m.set_routes("workloads", [*pods[1:], Route("10.1.0.9/32", dev="vB")])
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (1, 0, 1)
    assert set(k.routes) == {r.key for r in pods[1:]} | {route_key("10.1.0.9")}


def test_pending_until_the_device_appears():
    m, k = mgr("vA")
    m.set_routes("workloads", [Route("10.1.0.5/32", dev="cali9"), Route("10.1.0.6/32", dev="vA")])
    st = m.apply()
    assert st.added == 1 and st.pending == 1 and m.pending == {route_key("10.1.0.5")}
    assert not m.dirty  # waiting is not busy-looping
    k.add_link("cali9")
    m.on_link_event("cali9", present=True, up=True)
    assert m.dirty
    st = m.apply()
    assert st.added == 1 and st.pending == 0 and route_key("10.1.0.5") in k.routes


def test_pending_route_dropped_when_no_longer_wanted():
    m, _ = mgr("vA")
    m.set_route("workloads", Route("10.1.0.5/32", dev="cali9"))
    assert m.apply().pending == 1
    m.remove_route("workloads", "10.1.0.5/32")
    assert m.apply().pending == 0


def test_drift_events_mark_dirty_and_repair():
    m, k = mgr()
    r = Route("10.1.0.5/32", dev="vA")
    m.set_route("workloads", r)
    m.apply()
    del k.routes[r.key]  # deleted by hand...
    m.on_route_event(True, m.proto, r)  # ...and the monitor saw it
    assert m.dirty
    assert m.apply().added == 1 and k.routes[r.key] == r
    changed = Route("10.1.0.5/32", dev="vB")
    k.routes[r.key] = changed
    m.on_route_event(False, m.proto, changed)
    assert m.apply().replaced == 1 and k.routes[r.key] == r
    m.on_route_event(False, m.proto, r)  # the echo of our own write
    assert not m.dirty


def test_foreign_route_is_not_overwritten():
    m, k = mgr()
    foreign = Route("10.1.0.5/32", dev="vB")
    k.foreign[foreign.key] = foreign
    m.set_route("workloads", Route("10.1.0.5/32", dev="vA"))
    st = m.apply()
    assert st.added == 0 and [e.errno for e in st.errors] == [errno.EEXIST]
    assert k.foreign[foreign.key] == foreign and foreign.key in m.failed
    m.on_route_event(False, 4, foreign)  # a foreign route's notification changes nothing
    assert not m.dirty


def test_our_route_replaced_by_hand_is_taken_back():
    m, k = mgr()
    r = Route("10.1.0.5/32", dev="vA")
    m.set_route("workloads", r)
    m.apply()
    by_hand = Route("10.1.0.5/32", dev="vB")
    m.on_route_event(False, 3, by_hand, replaced=False)  # appended, not ours: ignored
    assert not m.dirty
    del k.routes[r.key]
    k.foreign[r.key] = by_hand  # `ip route change` made it proto boot
    m.on_route_event(False, 3, by_hand, replaced=True)
    assert m.dirty
    st = m.apply()
    assert st.replaced == 1 and k.routes[r.key] == r


def test_link_gone_forgets_its_routes_and_waits():
    m, k = mgr()
    m.set_route("workloads", Route("10.1.0.5/32", dev="vB"))
    m.apply()
    k.del_link("vB")
    m.on_link_event("vB", present=False, up=False)
    st = m.apply()
    assert st.pending == 1 and not k.routes


def test_a_link_going_down_forgets_its_routes_and_a_new_down_link_costs_no_scan():
    m, k = mgr()
    m.set_route("workloads", Route("10.1.0.5/32", dev="vB"))
    m.apply()
    del k.routes[route_key("10.1.0.5")]  # set down: the kernel dropped the route
    m.on_link_event("vB", present=True, up=False)
    assert m.dirty and route_key("10.1.0.5") not in m.actual()
    m.apply()  # written again (the double does not refuse a down link)
    m.on_link_event("vB", present=True, up=False)  # still down: already scanned
    assert not m.dirty
    m.on_link_event("vB", present=True, up=True)
    del k.routes[route_key("10.1.0.5")]
    m.on_link_event("vB", present=True, up=False)  # up, then down again: scanned again
    assert m.dirty
    m.apply()
    # A link just created (down) carries nothing: its events do not forget anything.
    m.set_route("workloads", Route("10.1.0.6/32", dev="vC"))
    m.on_link_event("vC", present=True, up=False, new=True)
    k.add_link("vC")
    m.on_link_event("vC", present=True, up=True)
    m.apply()
    assert not m.dirty and route_key("10.1.0.6") in m.actual()


def test_metric_change_deletes_then_adds():
    m, k = mgr()
    m.set_route("bgp", Route("10.2.0.0/24", gateways=("10.9.0.2",)))
    m.apply()
    m.set_route("bgp", Route("10.2.0.0/24", gateways=("10.9.0.2",), metric=50))
    st = m.apply()
    assert (st.added, st.deleted) == (1, 1) and k.routes[route_key("10.2.0.0/24")].metric == 50


def test_gateway_route_without_dev_matches_the_kernels_resolved_dev():
    m, k = mgr()
    want = Route("10.2.0.0/24", gateways=("10.9.0.2",))
    k.routes[want.key] = Route("10.2.0.0/24", gateways=("10.9.0.2",), dev="vA")
    m.set_route("bgp", want)
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 0, 0)


def test_failed_write_is_retried_on_resync():
    m, k = mgr()
    r = Route("10.1.0.5/32", dev="vA")
    k.fail[r.key] = errno.EINVAL
    m.set_route("workloads", r)
    assert m.apply().errors and r.key in m.failed
    del k.fail[r.key]
    m.resync()
    assert m.apply().added == 1 and not m.failed


def test_a_refused_replace_leaves_no_route_rather_than_the_old_one():
    """Fail closed: an egress default whose new next hop the kernel refuses (ENETUNREACH)
    must not keep leaving by the old next hop; it waits for a link, and comes back."""
    m, k = mgr()
    old = Route("0.0.0.0/0", table=201, gateways=("10.9.0.2",))
    m.set_route("egress", old)
    m.apply()
    new = Route("0.0.0.0/0", table=201, gateways=("10.99.109.1",))
    k.refuse[new.key] = errno.ENETUNREACH
    m.set_route("egress", new)
    st = m.apply()
    assert st.errors and st.deleted == 1 and new.key not in k.routes
    assert m.class_status("egress")[new.key].startswith("waiting for a link: replace")
    assert not m.dirty  # held: no retry loop
    del k.refuse[new.key]
    m.on_link_event("vA", present=True, up=True)  # a link came up: try again
    assert m.apply().added == 1 and k.routes[new.key] == new
    assert m.class_status("egress") == {new.key: None}


def test_update_routes_is_a_delta_like_set_route_and_remove_route():
    for with_workloads in (False, True):  # one class (the fast path) and several
        m, k = mgr()
        pod = Route("10.2.0.1/32", dev="vA")
        if with_workloads:
            m.set_routes("workloads", [pod])
        learned = [Route(f"10.2.0.{i}/32", gateways=("10.9.0.2",)) for i in range(1, 6)]
        learned.append(Route("fd00:2::/64", gateways=("fd00:9::2",)))
        m.update_routes("bgp", learned)
        st = m.apply()
        assert st.added == 6
        want = {r.key: r for r in learned}
        if with_workloads:
            want[pod.key] = pod  # the pod's /32 wins over the same prefix learned over BGP
        assert k.routes == want
        m.update_routes("bgp", [Route("10.2.0.2/32", gateways=("10.9.0.3",))],
                        removed=["10.2.0.3/32", route_key("fd00:2::/64"), learned[0]])
        st = m.apply()
        assert (st.replaced, st.deleted) == (1, 2 if with_workloads else 3)
        assert k.routes[route_key("10.2.0.2")].gateways == ("10.9.0.3",)
        assert set(k.routes) == {route_key(f"10.2.0.{i}") for i in (2, 4, 5)} | (
            {pod.key} if with_workloads else set())


def test_on_update_folds_route_deltas_and_ignores_other_messages():
    from tortie.routing.messages import RouteDelta, RulesUpdate

    m, k = mgr()
    pod = Route("10.1.0.5/32", dev="vA")
    learned = [Route(f"10.2.0.{i}/32", gateways=("10.9.0.2",)) for i in range(1, 4)]
    m.on_update(RouteDelta("workloads", (pod,)))
    m.on_update(RouteDelta("bgp", (*learned, Route("10.1.0.5/32", gateways=("10.9.0.3",)))))
    m.on_update(RulesUpdate("egress", frozenset()))  # not the route manager's
    m.on_update(object())
    st = m.apply()
    assert st.added == 4 and k.routes[pod.key] == pod  # workloads win the shared key
    m.on_update(RouteDelta("bgp", removed=(learned[0].key, route_key("10.1.0.5"))))
    m.on_update(RouteDelta("workloads", removed=(pod.key,)))
    st = m.apply()
    assert (st.added, st.replaced, st.deleted) == (0, 0, 2)
    assert set(k.routes) == {learned[1].key, learned[2].key}
    assert not m.dirty


def test_refused_and_waiting_routes_do_not_keep_the_manager_busy():
    m, k = mgr("vA")
    bad = Route("10.1.0.6/32", dev="vA")
    k.fail[bad.key] = errno.EINVAL
    m.set_routes("workloads", [bad, Route("10.1.0.7/32", dev="cali7")])
    st = m.apply()
    assert len(st.errors) == 1 and st.pending == 1
    assert not m.dirty and set(m.failed) == {bad.key}
    writes = k.writes
    m.set_route("bgp", Route("10.2.0.0/24", gateways=("10.9.0.2",)))
    assert m.apply().added == 1 and k.writes == writes + 1  # the held ones are not retried
    m.set_route("workloads", Route("10.1.0.6/32", dev="vB"))  # a change: tried again
    assert set(k.fail) == {bad.key} and m.dirty
