"""compute_peers: mesh, global/per-node/selector BGPPeers, route reflectors (pure)."""

from __future__ import annotations

from tortie.bgp.peers import Peer, compute_peers
from tortie.datastore.resources import BGPConfiguration, BGPPeer, Node


def node(name, v4, *, labels=None, v6=None, asn=None, rr=None) -> Node:
    bgp = {"ipv4Address": v4}
    if v6:
        bgp["ipv6Address"] = v6
    if asn:
        bgp["asNumber"] = asn
    if rr:
        bgp["routeReflectorClusterID"] = rr
    return Node.from_resource({"apiVersion": "tortie.io/v1", "kind": "Node",
                               "metadata": {"name": name, "labels": labels or {}}, "spec": {"bgp": bgp}})


def bgp_peer(name, **spec) -> BGPPeer:
    return BGPPeer.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": name},
                                  "spec": spec})


def config(**spec) -> BGPConfiguration:
    return BGPConfiguration.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration",
                                           "metadata": {"name": "default"}, "spec": spec})


A = node("a", "10.0.0.1/24", labels={"rack": "r1"})
B = node("b", "10.0.0.2/24", labels={"rack": "r1"})
C = node("c", "10.0.0.3/24", labels={"rack": "r2"}, asn=64600)
NODES = [A, B, C]


def by_addr(peers: list[Peer]) -> dict[str, Peer]:
    return {p.address: p for p in peers}


def test_mesh_default_on_with_passive_rule():
    peers = by_addr(compute_peers(B, NODES, [], config()))
    assert set(peers) == {"10.0.0.1", "10.0.0.3"}
    assert all(p.kind == "mesh" for p in peers.values())
    # of each pair, the side whose peer has the higher address is passive
    assert peers["10.0.0.3"].passive and not peers["10.0.0.1"].passive
    assert peers["10.0.0.1"].as_number == 64512 and peers["10.0.0.3"].as_number == 64600
    # and the other side of each pair does the opposite: exactly one dials
    for other in (A, C):
        back = by_addr(compute_peers(other, NODES, [], config()))["10.0.0.2"]
        assert back.passive != peers[other.ipv4].passive


def test_mesh_off_and_cluster_as():
    assert compute_peers(A, NODES, [], config(nodeToNodeMeshEnabled=False)) == []
    peers = compute_peers(A, NODES, [], config(asNumber=65001))
    assert by_addr(peers)["10.0.0.2"].as_number == 65001


def test_mesh_dual_stack_peers_per_family():
    a = node("a", "10.0.0.1/24", v6="fd00::1/64")
    b = node("b", "10.0.0.2/24", v6="fd00::2/64")
    c = node("c", "10.0.0.3/24")  # no IPv6: no v6 session
    peers = by_addr(compute_peers(a, [a, b, c], [], config()))
    assert set(peers) == {"10.0.0.2", "10.0.0.3", "fd00::2"}
    assert peers["fd00::2"].passive  # fd00::2 > fd00::1


def test_global_peer_with_timers_password_and_filter():
    tor = bgp_peer("tor", peerIP="10.0.0.254:1179", asNumber=65000, password="pw", holdTime=30,
                   keepAliveTime=10, acceptPrefixes=["10.50.0.0/16"])
    peers = by_addr(compute_peers(A, NODES, [tor], config(nodeToNodeMeshEnabled=False)))
    p = peers["10.0.0.254"]
    assert (p.kind, p.port, p.as_number, p.password, p.hold_time, p.keepalive) == (
        "global", 1179, 65000, "pw", 30, 10)
    assert p.external and p.accepts("10.50.3.0/24") and not p.accepts("10.60.0.0/24")
    assert not p.accepts("10.0.0.0/8")  # wider than what is accepted


def test_per_node_and_selector_peers():
    one = bgp_peer("only-b", peerIP="10.0.0.250", asNumber=65000, node="b")
    rack = bgp_peer("rack1", peerIP="10.0.0.251", asNumber=65000, nodeSelector='rack == "r1"')
    cfg = config(nodeToNodeMeshEnabled=False)
    assert set(by_addr(compute_peers(A, NODES, [one, rack], cfg))) == {"10.0.0.251"}
    b = by_addr(compute_peers(B, NODES, [one, rack], cfg))
    assert set(b) == {"10.0.0.250", "10.0.0.251"} and {p.kind for p in b.values()} == {"node"}
    assert compute_peers(C, NODES, [one, rack], cfg) == []


def test_peer_selector_between_nodes():
    # rack r1 nodes peer with the nodes of rack r2 (node-to-node, so not filtered)
    sel = bgp_peer("r1-to-r2", nodeSelector='rack == "r1"', peerSelector='rack == "r2"')
    peers = by_addr(compute_peers(A, NODES, [sel], config(nodeToNodeMeshEnabled=False)))
    assert set(peers) == {"10.0.0.3"}
    p = peers["10.0.0.3"]
    assert p.kind == "node" and not p.external and p.accepts("10.99.0.0/26") and p.passive
    c = by_addr(compute_peers(C, NODES, [sel], config(nodeToNodeMeshEnabled=False)))
    assert c == {}  # the selector is one-directional, like Calico's


def test_route_reflectors():
    r1 = node("r1", "10.0.0.10/24", rr="1.0.0.1")
    r2 = node("r2", "10.0.0.11/24", rr="1.0.0.1")
    nodes = [A, B, r1, r2]
    cfg = config(nodeToNodeMeshEnabled=False)
    rr = by_addr(compute_peers(r1, nodes, [], cfg))
    assert rr["10.0.0.11"].kind == "reflector" and not rr["10.0.0.11"].route_reflector_client
    assert rr["10.0.0.1"].kind == "rr-client" and rr["10.0.0.1"].route_reflector_client
    assert set(rr) == {"10.0.0.1", "10.0.0.2", "10.0.0.11"}
    client = by_addr(compute_peers(A, nodes, [], cfg))
    assert set(client) == {"10.0.0.10", "10.0.0.11"} and {p.kind for p in client.values()} == {"reflector"}
    # with the mesh on, clients still mesh among themselves, reflectors leave the mesh
    meshed = by_addr(compute_peers(A, nodes, [], config()))
    assert meshed["10.0.0.2"].kind == "mesh" and meshed["10.0.0.10"].kind == "reflector"
    assert "10.0.0.1" in by_addr(compute_peers(r1, nodes, [], config()))
    assert by_addr(compute_peers(r1, nodes, [], config()))["10.0.0.1"].kind == "rr-client"


def test_mesh_wins_over_duplicate_bgppeer():
    dup = bgp_peer("dup", peerIP="10.0.0.2", asNumber=64512)
    peers = compute_peers(A, NODES, [dup], config())
    assert [p.kind for p in peers if p.address == "10.0.0.2"] == ["mesh"]


def test_own_address_and_missing_family_skipped():
    me = bgp_peer("self", peerIP="10.0.0.1", asNumber=64512)
    v6 = bgp_peer("v6", peerIP="fd00::99", asNumber=65000)
    assert compute_peers(A, NODES, [me, v6], config(nodeToNodeMeshEnabled=False)) == []
