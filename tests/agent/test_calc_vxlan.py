"""The VXLAN plan from datastore state: devices, remote VTEPs and routes per mode; no kernel."""

import json

from tortie.agent.calc import ClusterState
from tortie.agent.calc_vxlan import DEVICE, VXLAN_CLASS, VxlanCalc, VxlanUpdate, plan, vtep_mac
from tortie.routing.messages import RouteDelta
from tortie.routing.model import Route

P = "/tortie/"


def put(state, key, obj):
    state.apply(P + key, json.dumps(obj).encode() if obj is not None else None)


def pool(state, mode, name="default", cidr="10.65.0.0/16", **spec):
    put(state, f"resources/ippool/{name}", {"apiVersion": "tortie.io/v1", "kind": "IPPool",
                                           "metadata": {"name": name},
                                           "spec": {"cidr": cidr, "vxlanMode": mode, **spec}})


def node(state, name, addr, tunnel=None, **spec):
    if tunnel:
        spec["ipv4VXLANTunnelAddr"] = tunnel
    put(state, f"resources/node/{name}", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": name},
                                         "spec": {"bgp": {"ipv4Address": addr}, **spec}})


def affinity(state, name, cidr, status="confirmed"):
    put(state, f"ipam/affinity/{name}/{cidr.replace('/', '-')}", {"state": status})


def three_nodes(mode):
    """n1 and n2 on 10.99.0.0/24, n3 on 10.99.200.0/24, a block each."""
    s = ClusterState(prefix=P)
    pool(s, mode)
    node(s, "n1", "10.99.0.11/24", "10.65.1.0")
    node(s, "n2", "10.99.0.12/24", "10.65.2.0")
    node(s, "n3", "10.99.200.13/24", "10.65.3.0")
    for i in (1, 2, 3):
        affinity(s, f"n{i}", f"10.65.{i}.0/26")
    affinity(s, "n3", "10.65.4.0/26", "pending")  # never routed
    return s


def test_always_routes_every_remote_block_through_the_tunnel():
    update, routes = plan(three_nodes("Always"), "n1")
    (dev,) = update.devices
    assert (dev.name, dev.vni, dev.local, dev.mac, dev.mtu, dev.address) == (
        DEVICE[4], 4096, "10.99.0.11", vtep_mac("n1"), 1450, "10.65.1.0")
    assert sorted((v.node, v.tunnel, v.underlay) for _, v in update.vteps) == [
        ("n2", "10.65.2.0", "10.99.0.12"), ("n3", "10.65.3.0", "10.99.200.13")]
    assert set(routes.values()) == {
        Route("10.65.2.0/26", dev=DEVICE[4], gateways=("10.65.2.0",), onlink=True),
        Route("10.65.3.0/26", dev=DEVICE[4], gateways=("10.65.3.0",), onlink=True)}


def test_cross_subnet_encapsulates_only_towards_the_other_subnet():
    _, routes = plan(three_nodes("CrossSubnet"), "n1")
    assert set(routes.values()) == {
        Route("10.65.2.0/26", gateways=("10.99.0.12",)),
        Route("10.65.3.0/26", dev=DEVICE[4], gateways=("10.65.3.0",), onlink=True)}


def test_never_and_no_tunnel_address_mean_no_overlay():
    update, routes = plan(three_nodes("Never"), "n1")
    assert update == VxlanUpdate((), ()) and routes == {}
    s = three_nodes("Always")
    node(s, "n1", "10.99.0.11/24")  # its tunnel address not allocated (yet)
    update, routes = plan(s, "n1")
    assert update.devices == () and routes == {}


def test_mtu_overrides_node_before_pool_before_uplink():
    s = three_nodes("Always")
    pool(s, "Always", vxlanMTU=1400)
    assert plan(s, "n1", uplink_mtu=9000)[0].devices[0].mtu == 1400
    node(s, "n1", "10.99.0.11/24", "10.65.1.0", vxlanMTU=1300, vxlanTunnelMACAddr="02:00:00:00:00:01")
    dev = plan(s, "n1")[0].devices[0]
    assert (dev.mtu, dev.mac) == (1300, "02:00:00:00:00:01")
    pool(s, "Always")
    node(s, "n1", "10.99.0.11/24", "10.65.1.0")
    assert plan(s, "n1", uplink_mtu=9000)[0].devices[0].mtu == 8950


def test_vtep_mac_is_stable_unicast_and_local():
    mac = vtep_mac("node1")
    assert mac == vtep_mac("node1") != vtep_mac("node2")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2


def test_calc_sends_only_what_changed_and_a_mode_switch_moves_routes():
    s = three_nodes("CrossSubnet")
    calc = VxlanCalc("n1")
    first = calc.update(s)
    assert isinstance(first[0], VxlanUpdate) and isinstance(first[1], RouteDelta)
    assert first[1].route_class == VXLAN_CLASS and len(first[1].routes) == 2
    assert calc.update(s) == []  # nothing noted: nothing recomputed
    calc.note("resources/workloadendpoint/default/x")
    assert calc.update(s) == []
    pool(s, "Always")
    calc.note("resources/ippool/default")
    (delta,) = calc.update(s)  # the device and VTEPs are the same; one route moved
    assert delta.routes == (Route("10.65.2.0/26", dev=DEVICE[4], gateways=("10.65.2.0",), onlink=True),)
    pool(s, "Never")
    calc.note("resources/ippool/default")
    msgs = calc.update(s)
    assert msgs[0] == VxlanUpdate((), ()) and len(msgs[1].removed) == 2


def test_pod_mtu_only_for_vxlan_pools():
    s = three_nodes("Always")
    pool(s, "Never", name="plain", cidr="10.70.0.0/16")
    calc = VxlanCalc("n1", uplink_mtu=1500)
    assert calc.pod_mtu(s, ["10.65.1.5"]) == 1450
    assert calc.pod_mtu(s, ["10.70.0.5"]) == 0


def test_ipv6_pools_get_their_own_device():
    s = ClusterState(prefix=P)
    pool(s, "Always", name="v6", cidr="fd00:65::/48", blockSize=122)
    for i in (1, 2):
        put(s, f"resources/node/n{i}", {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": f"n{i}"},
                                        "spec": {"bgp": {"ipv6Address": f"fd00:99::{i}/64"},
                                                 "ipv6VXLANTunnelAddr": f"fd00:65::{i}:0"}})
        affinity(s, f"n{i}", f"fd00:65::{i}:0/122")
    update, routes = plan(s, "n1")
    (dev,) = update.devices
    assert (dev.name, dev.family, dev.local, dev.mtu, dev.address) == (DEVICE[6], 6, "fd00:99::1", 1430, "fd00:65::1:0")
    assert list(routes.values()) == [Route("fd00:65::2:0/122", dev=DEVICE[6], gateways=("fd00:65::2:0",), onlink=True)]


def test_borrowed_addresses_get_host_routes_to_their_node():
    s = three_nodes("Always")
    # n3 borrowed 10.65.1.9 from n1's block and 10.65.2.7 from n2's; n2's own pod needs nothing.
    for name, node_, ip in (("b1", "n3", "10.65.1.9/32"), ("b2", "n3", "10.65.2.7/32"), ("own", "n2", "10.65.2.5/32")):
        put(s, f"resources/workloadendpoint/default/{name}", {
            "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": name, "namespace": "default"},
            "spec": {"node": node_, "pod": name, "containerID": "c" + name, "ipNetworks": [ip]}})
    _, routes = plan(s, "n1")
    tunnel3 = dict(dev=DEVICE[4], gateways=("10.65.3.0",), onlink=True)
    assert Route("10.65.1.9/32", **tunnel3) in routes.values()  # from our own block: beats the blackhole
    assert Route("10.65.2.7/32", **tunnel3) in routes.values()
    assert not any(r.dst == "10.65.2.5/32" for r in routes.values())
    calc = VxlanCalc("n1")
    calc.update(s)
    calc.note("resources/workloadendpoint/default/b1")
    assert calc.dirty
