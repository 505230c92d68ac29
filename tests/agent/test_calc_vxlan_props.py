"""VxlanCalc's promise: after any sequence of datastore changes, the routes its deltas add
up to and the last VxlanUpdate it sent equal a fresh `plan()` of the same state."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.agent.calc import ClusterState
from tortie.agent.calc_vxlan import VxlanCalc, VxlanUpdate, plan
from tortie.routing.messages import RouteDelta

P = "/tortie/"
NODES = ("n1", "n2", "n3")
ADDR = {"n1": "10.99.0.11/24", "n2": "10.99.0.12/24", "n3": "10.99.200.13/24"}

MOSTLY = st.sampled_from([True, True, True, False])  # nodes mostly there, with a tunnel address
pool_ev = st.tuples(st.just("pool"), st.sampled_from(["Never", "Always", "Always", "CrossSubnet", "CrossSubnet", None]))
node_ev = st.tuples(st.just("node"), st.sampled_from(NODES), MOSTLY, MOSTLY)
aff_ev = st.tuples(st.just("affinity"), st.sampled_from(NODES), st.integers(0, 5),
                   st.sampled_from(["confirmed", "pending", None]))
wep_ev = st.tuples(st.just("wep"), st.sampled_from(NODES), st.integers(0, 5), st.integers(1, 60), st.booleans())


BASELINE = [("pool", "CrossSubnet"), *(("node", n, True, True) for n in NODES),
            *(("affinity", n, i, "confirmed") for i, n in enumerate(NODES)),
            ("wep", "n3", 0, 9, True)]  # n3's pod borrowed 10.65.0.9 from n1's block


def apply(state: ClusterState, calc: VxlanCalc, ev) -> None:
    kind = ev[0]
    if kind == "pool":
        key = "resources/ippool/p"
        value = None if ev[1] is None else {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "p"},
                                            "spec": {"cidr": "10.65.0.0/16", "vxlanMode": ev[1]}}
    elif kind == "node":
        _, name, present, tunnel = ev
        key = f"resources/node/{name}"
        spec = {"bgp": {"ipv4Address": ADDR[name]}}
        if tunnel:
            spec["ipv4VXLANTunnelAddr"] = f"10.65.{NODES.index(name)}.1"
        value = {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": name}, "spec": spec} \
            if present else None
    elif kind == "affinity":
        _, name, block, status = ev
        key = f"ipam/affinity/{name}/10.65.{block}.0-26"
        value = None if status is None else {"state": status}
    else:
        _, name, block, host, present = ev
        key = f"resources/workloadendpoint/default/w{block}-{host}"
        value = {"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                 "metadata": {"name": f"w{block}-{host}", "namespace": "default"},
                 "spec": {"node": name, "containerID": "c", "ipNetworks": [f"10.65.{block}.{host}/32"]}} \
            if present else None
    state.apply(P + key, None if value is None else json.dumps(value).encode())
    calc.note(key)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.one_of(pool_ev, node_ev, aff_ev, wep_ev), st.booleans()), max_size=40),
       st.sampled_from(NODES))
def test_accumulated_messages_equal_a_fresh_plan(events, me):
    state, calc = ClusterState(prefix=P), VxlanCalc(me)
    routes: dict = {}
    last = None
    # From a cluster already using VXLAN (every node a VTEP, a block each), so that any
    # single change matters; the flags say after which changes the agent flushes.
    events = [*((ev, False) for ev in BASELINE), *events]
    for i, (ev, flush) in enumerate(events):
        apply(state, calc, ev)
        if not flush and i != len(events) - 1:
            continue  # several changes between flushes, as the agent's loop batches them
        for msg in calc.update(state):
            if isinstance(msg, VxlanUpdate):
                last = msg
            else:
                assert isinstance(msg, RouteDelta)
                for k in msg.removed:
                    routes.pop(k, None)
                routes.update((r.key, r) for r in msg.routes)
        want, want_routes = plan(state, me)
        assert last == want and routes == want_routes
