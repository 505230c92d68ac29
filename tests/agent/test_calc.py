"""The calculation, from datastore keys to desired routes and exports: no kernel, no etcd."""

import json

from tortie.agent.calc import ClusterState
from tortie.agent.calc_desired import desired
from tortie.routing.model import Route

P = "/tortie/"


def put(state: ClusterState, key: str, obj) -> None:
    state.apply(P + key, json.dumps(obj).encode())


def pool(state, name, cidr, **spec):
    put(state, f"resources/ippool/{name}", {
        "apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
        "spec": {"cidr": cidr, **spec}})


def wep(state, ns, name, node, ip, iface):
    put(state, f"resources/workloadendpoint/{ns}/{name}", {
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"node": node, "pod": name, "containerID": "c-" + name, "endpoint": "eth0",
                 "interfaceName": iface, "ipNetworks": [ip], "orchestrator": "k8s"}})


def affinity(state, node, cidr, status="confirmed"):
    put(state, f"ipam/affinity/{node}/{cidr.replace('/', '-')}", {"state": status})


def make_state():
    s = ClusterState(prefix=P)
    pool(s, "default", "10.65.0.0/16")
    return s


def test_confirmed_blocks_get_blackholes_and_are_exported_pending_ones_not():
    s = make_state()
    affinity(s, "n1", "10.65.1.0/26")
    affinity(s, "n1", "10.65.2.0/26", "pending")
    affinity(s, "n2", "10.65.3.0/26")
    d = desired(s, "n1")
    assert d.block_routes == {Route(dst="10.65.1.0/26", type="blackhole")}
    assert d.exports == {"10.65.1.0/26"}


def test_local_workloads_get_link_routes_and_borrowed_addresses_are_exported():
    s = make_state()
    affinity(s, "n1", "10.65.1.0/26")
    affinity(s, "n2", "10.65.3.0/26")
    wep(s, "default", "own", "n1", "10.65.1.5/32", "tor1")
    wep(s, "default", "borrowed", "n1", "10.65.3.9/32", "tor2")
    wep(s, "default", "remote", "n2", "10.65.3.4/32", "tor3")
    d = desired(s, "n1")
    assert d.workload_routes == {
        Route(dst="10.65.1.5/32", dev="tor1", scope="link"),
        Route(dst="10.65.3.9/32", dev="tor2", scope="link"),
    }
    assert d.exports == {"10.65.1.0/26", "10.65.3.9/32"}


def test_pool_with_bgp_export_disabled_is_not_announced():
    s = ClusterState(prefix=P)
    pool(s, "quiet", "10.70.0.0/16", disableBGPExport=True)
    affinity(s, "n1", "10.70.1.0/26")
    d = desired(s, "n1")
    assert d.block_routes and not d.exports


def test_learned_routes_skip_own_blocks_and_own_next_hops_and_keep_ecmp():
    s = make_state()
    affinity(s, "n1", "10.65.1.0/26")
    learned = {
        "10.65.1.0/26": ("10.0.0.2",),  # our own block reflected back
        "10.65.3.0/26": ("10.0.0.3", "10.0.0.2"),  # ECMP
        "10.65.4.0/26": ("10.0.0.1",),  # next hop is us
        "10.65.1.7/32": ("10.0.0.3",),  # a pod on n3 borrowed from our block: /32 beats our blackhole
    }
    wep(s, "default", "borrower", "n3", "10.65.1.7/32", "cali3")
    d = desired(s, "n1", learned, frozenset({"10.0.0.1"}))
    assert d.bgp_routes == {
        Route(dst="10.65.3.0/26", gateways=("10.0.0.2", "10.0.0.3")),
        Route(dst="10.65.1.7/32", gateways=("10.0.0.3",)),
    }
    assert d.refused == {}


def test_learned_routes_never_take_over_local_pods_or_parts_of_our_blocks():
    """Issue 12 item 3: a peer's /32 of a local pod, a more specific of one of our blocks,
    a /32 in our block that no pod elsewhere holds: refused, and said why."""
    s = make_state()
    affinity(s, "n1", "10.65.1.0/26")
    wep(s, "default", "mine", "n1", "10.65.1.5/32", "cali1")
    wep(s, "default", "outside", "n1", "10.65.9.5/32", "cali2")  # borrowed by us from n2's block
    learned = {
        "10.65.1.5/32": ("10.0.0.9",),  # our pod's own address
        "10.65.9.5/32": ("10.0.0.9",),  # our borrowed pod's address
        "10.65.1.0/28": ("10.0.0.9",),  # a part of our block
        "10.65.1.8/32": ("10.0.0.9",),  # an address of our block no pod elsewhere holds
        "10.65.0.0/16": ("10.0.0.9",),  # less specific: our routes still win
        "10.65.9.0/26": ("10.0.0.2",),  # n2's block
    }
    d = desired(s, "n1", learned, frozenset({"10.0.0.1"}))
    assert {r.dst for r in d.bgp_routes} == {"10.65.0.0/16", "10.65.9.0/26"}
    assert d.refused == {"10.65.1.5/32": "a local pod's address", "10.65.9.5/32": "a local pod's address",
                         "10.65.1.0/28": "inside this node's block 10.65.1.0/26",
                         "10.65.1.8/32": "inside this node's block 10.65.1.0/26"}


def test_deletions_and_resync_clear_state():
    s = make_state()
    affinity(s, "n1", "10.65.1.0/26")
    s.apply(P + "ipam/affinity/n1/10.65.1.0-26", None)
    assert not desired(s, "n1").block_routes
    wep(s, "default", "a", "n1", "10.65.1.5/32", "tor1")
    s.clear()
    assert not desired(s, "n1").workload_routes


def test_unreadable_values_are_skipped_not_fatal():
    s = make_state()
    assert not s.apply(P + "resources/ippool/bad", b"{not json")
    assert "default" in s.pools


def test_policy_routing_only_while_a_pool_has_egress():
    from tortie.agent.calc_desired import PRIO_EGRESS, PRIO_EGRESS_FLOOR, PRIO_TO_POOLS, egress_plan
    from tortie.routing.model import Rule

    s = make_state()
    pool(s, "b", "10.66.0.0/16")
    assert not desired(s, "n1").rules
    pool(s, "a", "10.67.0.0/16", egress={"table": 101, "nextHop": "192.0.2.1"})
    d = desired(s, "n1")
    assert d.rules == {
        Rule(priority=PRIO_TO_POOLS, dst="10.65.0.0/16", table=254),
        Rule(priority=PRIO_TO_POOLS, dst="10.66.0.0/16", table=254),
        Rule(priority=PRIO_TO_POOLS, dst="10.67.0.0/16", table=254),
        Rule(priority=PRIO_EGRESS, src="10.67.0.0/16", table=101),
        Rule(priority=PRIO_EGRESS_FLOOR, src="10.67.0.0/16", action="unreachable"),  # fail closed
    }
    assert d.egress_routes == {Route(dst="0.0.0.0/0", table=101, gateways=("192.0.2.1",))}
    # A second pool on the same table with another next hop would leave by pool a's: it
    # gets the floor only (refused), and the plan says why.
    pool(s, "c", "10.68.0.0/16", egress={"table": 101, "nextHop": "192.0.2.9"})
    d = desired(s, "n1")
    assert Rule(priority=PRIO_EGRESS_FLOOR, src="10.68.0.0/16", action="unreachable") in d.rules
    assert not any(r.src == "10.68.0.0/16" and r.action == "lookup" for r in d.rules)
    (c,) = [p for p in egress_plan(s) if p.pool == "c"]
    assert not c.routes and c.problem == "table 101 is pool a's, with next hops 192.0.2.1"
    pool(s, "c", "10.68.0.0/16")
    pool(s, "a", "10.67.0.0/16", egress={"table": 101, "nextHop": "192.0.2.1", "interface": "eth1"})
    assert desired(s, "n1").egress_routes == {
        Route(dst="0.0.0.0/0", table=101, gateways=("192.0.2.1",), dev="eth1")}
    pool(s, "a", "10.67.0.0/16")  # egress removed
    d = desired(s, "n1")
    assert not d.rules and not d.egress_routes


def test_node_addresses_are_the_bgp_ones_and_every_listed_one():
    from tortie.agent.calc_desired import node_addresses

    s = make_state()
    put(s, "resources/node/n1", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n1"},
                                 "spec": {"bgp": {"ipv4Address": "10.99.101.11/24"},
                                          "addresses": [{"address": "10.99.101.11", "type": "CalicoNodeIP"},
                                                        {"address": "10.99.102.11", "type": "CalicoNodeIP"},
                                                        {"address": "fd00::11", "type": "InternalIP"}]}})
    put(s, "resources/node/n2", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n2"},
                                 "spec": {"bgp": {"ipv4Address": "10.99.101.12/24", "ipv6Address": "fd00::12/64"}}})
    assert node_addresses(s) == ["10.99.101.11", "10.99.101.12", "10.99.102.11", "fd00::11", "fd00::12"]


def node(state, name, addr):
    put(state, f"resources/node/{name}", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": name},
                                          "spec": {"bgp": {"ipv4Address": addr + "/24"}}})


def bgp_peer(state, name, ip, labels=None):
    put(state, f"resources/bgppeer/{name}", {
        "apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": name, "labels": labels or {}},
        "spec": {"peerIP": ip, "asNumber": 65000}})


def test_pool_bgp_peers_narrow_the_external_peers_and_keep_the_mesh():
    from tortie.agent.calc_desired import bgp_peers, export_policies
    from tortie.bgp.messages import ExportPolicy

    s = make_state()
    node(s, "n1", "10.0.0.1")
    node(s, "n2", "10.0.0.2")  # a mesh peer of n1
    bgp_peer(s, "tor1", "10.0.0.251", {"router": "tor1"})
    bgp_peer(s, "tor2", "10.0.0.252", {"router": "tor2"})
    pool(s, "a", "10.70.0.0/16", bgp={"peers": "router == 'tor1'", "communities": ["65010:7"], "asPathPrepend": 2},
         egress={"table": 101, "nextHop": "10.0.0.251", "address": "192.0.2.9"})
    pool(s, "b", "10.71.0.0/16", egress={"table": 102, "nextHop": "10.0.0.252", "address": "192.0.2.10"})
    pols = export_policies(s, bgp_peers(s, "n1"))
    assert pols == (
        ExportPolicy("10.70.0.0/16", frozenset({"10.0.0.2", "10.0.0.251"}), ("65010:7",), 2),
        ExportPolicy("192.0.2.9/32", frozenset({"10.0.0.251"}), ("65010:7",), 2),  # never to the mesh
        ExportPolicy("192.0.2.10/32", frozenset({"10.0.0.251", "10.0.0.252"})),  # every router
    )  # the default pool has no spec.bgp: no policy, every peer
    bgp_peer(s, "tor2", "10.0.0.252", {"router": "tor1"})  # labels are what selects
    assert export_policies(s, bgp_peers(s, "n1"))[0].peers == {"10.0.0.2", "10.0.0.251", "10.0.0.252"}


def test_egress_address_is_exported_while_a_local_pod_of_the_pool_lives():
    from tortie.agent.calc import Calculation
    from tortie.bgp.messages import ExportDelta
    from tortie.policy.messages import NatUpdate

    calc = Calculation("n1", prefix=P)
    calc.on_snapshot({f"{P}resources/ippool/a": json.dumps({
        "apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "a"},
        "spec": {"cidr": "10.70.0.0/16", "egress": {"table": 101, "nextHop": "10.0.0.251",
                                                    "address": "192.0.2.9"}}}).encode()})
    msgs = calc.take_messages()
    nat = next(m for m in msgs if isinstance(m, NatUpdate))
    assert nat.egress_addresses == {("10.70.0.0/16", "192.0.2.9")}
    assert Route(dst="192.0.2.9/32", type="blackhole") in calc.routes("egress").values()
    assert "192.0.2.9/32" not in calc.exports  # no pod of the pool here yet

    def put_wep(name, node_name, ip):
        key = f"{P}resources/workloadendpoint/default/{name}"
        calc.on_update(key, json.dumps({
            "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": name, "namespace": "default"},
            "spec": {"node": node_name, "pod": name, "containerID": "c" + name, "endpoint": "eth0",
                     "interfaceName": "tor" + name, "ipNetworks": [ip], "orchestrator": "k8s"}}).encode())

    put_wep("x", "n2", "10.70.0.9/32")  # another node's pod: not ours to announce
    assert "192.0.2.9/32" not in calc.exports
    put_wep("p", "n1", "10.70.0.5/32")
    put_wep("q", "n1", "10.70.0.6/32")
    assert ExportDelta(frozenset({"192.0.2.9/32", "10.70.0.5/32", "10.70.0.6/32"})) in calc.take_messages()
    calc.on_update(f"{P}resources/workloadendpoint/default/p", None)
    assert "192.0.2.9/32" in calc.exports  # q still holds it
    calc.on_update(f"{P}resources/workloadendpoint/default/q", None)
    assert ExportDelta(frozenset(), frozenset({"192.0.2.9/32", "10.70.0.5/32", "10.70.0.6/32"})) \
        in calc.take_messages()  # the last pod gone: withdrawn


def test_egress_address_of_a_pool_that_exports_nothing_is_not_announced():
    s = make_state()
    pool(s, "quiet", "10.70.0.0/16", disableBGPExport=True,
         egress={"table": 101, "nextHop": "10.0.0.251", "address": "192.0.2.9"})
    affinity(s, "n1", "10.70.1.0/26")
    wep(s, "default", "p", "n1", "10.70.1.5/32", "tor1")
    d = desired(s, "n1")
    assert not d.exports  # neither the block nor the egress address: disableBGPExport holds for both



def _peer(state, name, ip, labels, **spec):
    put(state, f"resources/bgppeer/{name}", {
        "apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": name, "labels": labels},
        "spec": {"peerIP": ip, "asNumber": 65000, **spec}})


def test_from_peers_takes_what_the_selected_peers_announce_into_the_pools_table_only():
    from tortie.agent.calc_desired import (
        PRIO_EGRESS,
        PRIO_EGRESS_FLOOR,
        egress_imports,
        egress_plan,
    )
    from tortie.routing.model import Rule

    s = make_state()
    put(s, "resources/node/n1", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n1"},
                                 "spec": {"bgp": {"ipv4Address": "10.99.101.11/24"}}})
    _peer(s, "tor1-n1", "10.99.101.1", {"router": "tor1"})
    _peer(s, "tor2-n1", "10.99.102.1", {"router": "tor2"}, bfd={"minTx": 100, "minRx": 100, "multiplier": 3})
    pool(s, "a", "10.67.0.0/16", egress={"table": 101, "fromPeers": "router == 'tor1'"})
    pool(s, "b", "10.68.0.0/16", egress={"table": 102, "fromPeers": "has(router)", "fallback": "main",
                                         "prefixes": ["0.0.0.0/0", "192.0.2.0/24"]})
    # what the speaker must set apart: per peer, the prefixes some pool takes from it
    assert egress_imports(s, "n1") == {"10.99.101.1": {"0.0.0.0/0", "192.0.2.0/24"},
                                       "10.99.102.1": {"0.0.0.0/0", "192.0.2.0/24"}}
    # nothing announced yet: pool a refused (floor), pool b to the main table (no floor)
    d = desired(s, "n1")
    assert not d.egress_routes
    assert Rule(priority=PRIO_EGRESS_FLOOR, src="10.67.0.0/16", action="unreachable") in d.rules
    assert not [r for r in d.rules if r.src == "10.68.0.0/16"]
    (a, b) = egress_plan(s, node="n1")
    assert a.problem == "no next hop: no BGP peer matching \"router == 'tor1'\" announces 0.0.0.0/0"
    # tor1 announces a default: pool a's table and pool b's; tor2 (BFD not Up yet) counts for nothing
    learned = {"10.99.101.1": {"0.0.0.0/0": "10.99.101.1"},
               "10.99.102.1": {"0.0.0.0/0": "10.99.102.1", "192.0.2.0/24": "10.99.102.1"}}
    d = desired(s, "n1", egress_learned=learned)
    assert d.egress_routes == {Route(dst="0.0.0.0/0", table=101, gateways=("10.99.101.1",)),
                               Route(dst="0.0.0.0/0", table=102, gateways=("10.99.101.1",))}
    assert not d.bgp_routes  # the main table never sees it
    assert Rule(priority=PRIO_EGRESS, src="10.67.0.0/16", table=101) in d.rules
    (a, b) = egress_plan(s, node="n1", learned=learned)
    assert b.missing == ("192.0.2.0/24",) and b.next_hops == ("10.99.101.1",)
    # tor2's BFD session Up: ECMP over both for the default, and its own prefix
    d = desired(s, "n1", bfd_up=frozenset({"10.99.102.1"}), egress_learned=learned)
    assert d.egress_routes == {Route(dst="0.0.0.0/0", table=101, gateways=("10.99.101.1",)),
                               Route(dst="0.0.0.0/0", table=102, gateways=("10.99.101.1", "10.99.102.1")),
                               Route(dst="192.0.2.0/24", table=102, gateways=("10.99.102.1",))}
    # tor1 withdraws: pool a fails closed again, pool b keeps tor2
    learned = {"10.99.102.1": learned["10.99.102.1"]}
    d = desired(s, "n1", bfd_up=frozenset({"10.99.102.1"}), egress_learned=learned)
    assert {r.table for r in d.egress_routes} == {102}
    assert Rule(priority=PRIO_EGRESS_FLOOR, src="10.67.0.0/16", action="unreachable") in d.rules
    # a selector that matches no peer of this node says so
    pool(s, "a", "10.67.0.0/16", egress={"table": 101, "fromPeers": "router == 'tor9'"})
    (a, _) = egress_plan(s, node="n1", learned=learned)
    assert a.problem == "no BGP peer of this node matches fromPeers \"router == 'tor9'\""
