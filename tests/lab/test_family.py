"""The lab's address families: the IPv6 twins of the plan, the routers' IPv6 halves, the
BGPPeers and the pods' IPAM config (pure: no kernel)."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from tortie.errors import ValidationError
from tortie.lab import family, routers, topology
from tortie.lab.state import Pod


def test_ipv6_twins_of_the_plan_are_one_to_one():
    assert family.v6("10.99.0.2/24") == "fd99::2/64"
    assert family.v6("10.99.3.1") == "fd99:0:3::1"
    plan = topology.make_plan("lab1", 3, "bird", ip_family="dual")
    every = [family.v6(a) for a in (plan.ctl_address, plan.ext_address, plan.tors[0].address,
                                    *(u.address for n in plan.nodes for u in n.uplinks),
                                    *(u.far_address for n in plan.nodes for u in n.uplinks))]
    assert len(set(every)) == len(every)
    assert family.addresses("10.99.1.2/24", "dual") == ["10.99.1.2/24", "fd99:0:1::2/64"]
    assert family.addresses("10.99.1.2/24", "ipv6") == ["fd99:0:1::2/64"]
    assert family.addresses("10.99.1.2/24", "ipv4") == ["10.99.1.2/24"]


def test_the_ipv4_lab_is_what_it_was():
    plan = topology.make_plan("lab1", 2, "bird")
    assert plan.ip_family == "ipv4" and plan.versions == (4,)
    assert plan.etcd_endpoint == "http://10.99.0.2:2379"
    assert family.addr_lines("10.99.1.2/24", "eth0", "ipv4") == ["addr add 10.99.1.2/24 dev eth0"]
    assert family.default_lines(("10.99.1.1",), "ipv4") == ["route add default via 10.99.1.1"]
    assert family.default_lines(("10.99.101.1", "10.99.102.1"), "ipv4") == [
        "route add default nexthop via 10.99.101.1 nexthop via 10.99.102.1"]
    assert family.node_env("10.99.1.2/24", "ipv4") == {"TORTIE_NODE_IP": "10.99.1.2/24"}
    bird = routers.bird_config(plan, plan.tors[0], "/l")
    frr = routers.frr_config(plan, plan.tors[0], "/l")
    assert "ipv6" not in bird and "fd99" not in bird and "ipv6" not in frr and "fd99" not in frr
    peers = [r for r in routers.bgp_resources(plan, topology.DEFAULT_POOL_CIDR) if r["kind"] == "BGPPeer"]
    assert [p["metadata"]["name"] for p in peers] == ["tor-node1", "tor-node2"]


def test_dual_and_ipv6_labs_address_etcd_nodes_and_routes_per_family():
    dual = topology.make_plan("lab1", 2, "bird", ip_family="dual")
    assert dual.etcd_endpoint == "http://10.99.0.2:2379"  # etcd stays on IPv4 where there is IPv4
    assert family.addr_lines("10.99.1.2/24", "eth0", "dual") == [
        "addr add 10.99.1.2/24 dev eth0", "addr add fd99:0:1::2/64 dev eth0 nodad"]
    assert family.default_lines(("10.99.1.1",), "dual") == [
        "route add default via 10.99.1.1", "route add ::/0 via fd99:0:1::1"]
    assert family.node_env("10.99.1.2/24", "dual") == {"TORTIE_NODE_IP": "10.99.1.2/24",
                                                      "TORTIE_NODE_IP6": "fd99:0:1::2/64"}
    v6 = topology.make_plan("lab1", 2, "frr", ip_family="ipv6")
    assert v6.etcd_endpoint == "http://[fd99::2]:2379"
    assert family.node_env("10.99.1.2/24", "ipv6") == {"TORTIE_NODE_IP6": "fd99:0:1::2/64"}
    assert family.default_lines(("10.99.1.1",), "ipv6") == ["route add ::/0 via fd99:0:1::1"]


def test_routers_peer_over_ipv6_per_family():
    plan = topology.make_plan("lab1", 2, "bird", ip_family="dual")
    bird = routers.bird_config(plan, plan.tors[0], "/l")
    assert "protocol bgp node1 from node {" in bird and "protocol bgp node1_v6 from node6 {" in bird
    assert "  local fd99:0:1::1 as 65000;\n  neighbor fd99:0:1::2 as 64513;" in bird
    assert "protocol kernel kernel6" in bird
    frr = routers.frr_config(plan, plan.tors[0], "/l")
    assert " neighbor fd99:0:2::2 remote-as 64514" in frr
    v4_af = frr.split(" address-family ipv4 unicast")[1].split("exit-address-family")[0]
    v6_af = frr.split(" address-family ipv6 unicast")[1].split("exit-address-family")[0]
    assert "no neighbor fd99:0:1::2 activate" in v4_af and "  neighbor fd99:0:1::2 activate" in v6_af
    only6 = topology.make_plan("lab1", 2, "bird", ip_family="ipv6")
    bird6 = routers.bird_config(only6, only6.tors[0], "/l")
    assert "protocol bgp node1 from" not in bird6 and "protocol bgp node1_v6 from node6" in bird6
    frr6 = routers.frr_config(only6, only6.tors[0], "/l")
    assert "neighbor 10.99.1.2" not in frr6 and " neighbor fd99:0:1::2 remote-as 64513" in frr6


def test_bgp_peers_per_family_with_their_accepted_prefixes():
    plan = topology.make_plan("lab1", 1, "bird", ip_family="dual")
    peers = {r["metadata"]["name"]: r["spec"] for r in routers.bgp_resources(plan, "10.65.0.0/16", False, "fd65::/48")
             if r["kind"] == "BGPPeer"}
    assert peers["tor-node1"]["peerIP"] == "10.99.1.1" and peers["tor-node1"]["acceptPrefixes"] == [routers.POD_SPACE]
    assert peers["tor-node1-v6"]["peerIP"] == "fd99:0:1::1"
    assert peers["tor-node1-v6"]["acceptPrefixes"] == [routers.POD_SPACE6]
    outside = {r["metadata"]["name"]: r["spec"] for r in routers.bgp_resources(plan, None, False, "2001:db8::/48")
               if r["kind"] == "BGPPeer"}
    assert outside["tor-node1-v6"]["acceptPrefixes"] == [routers.POD_SPACE6, "2001:db8::/48"]
    only6 = topology.make_plan("lab1", 1, "bird", ip_family="ipv6")
    assert [r["metadata"]["name"] for r in routers.bgp_resources(only6) if r["kind"] == "BGPPeer"] == ["tor-node1-v6"]


def test_ipam_config_and_pod_addresses_by_family():
    assert family.ipam_config("dual") == {"type": "tortie-ipam", "assign_ipv4": True, "assign_ipv6": True}
    assert family.ipam_config("ipv6", {"p6": 6}) == {"type": "tortie-ipam", "assign_ipv4": False,
                                                     "assign_ipv6": True, "ipv6_pools": ["p6"]}
    assert family.ipam_config("dual", {"a": 4, "b6": 6, "c": 4}) == {
        "type": "tortie-ipam", "assign_ipv4": True, "assign_ipv6": True, "ipv4_pools": ["a", "c"], "ipv6_pools": ["b6"]}
    pod = Pod("default", "a", "node1", "x-pod", "c", address="10.65.0.1", addresses=["10.65.0.1", "fd65::1"])
    assert (pod.address_of(4), pod.address_of(6)) == ("10.65.0.1", "fd65::1")
    old = Pod("default", "a", "node1", "x-pod", "c", address="10.65.0.1")  # recorded before dual-stack
    assert (old.address_of(4), old.address_of(6)) == ("10.65.0.1", None)


@pytest.mark.parametrize("kw, field", [
    (dict(tor="none", ip_family="ipv6", etcd_members=3), "ip-family"),
    (dict(tor="none", ip_family="ipv6", etcd_tls=True), "ip-family"),
    (dict(tor="none", ip_family="ipv5"), "ip-family"),
])
def test_combinations_not_supported_yet_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValidationError) as e:
        topology.make_plan("lab1", 2, **kw)
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("args, field", [
    (["--ip-family", "ipv6", "--etcd-members", "3"], "ip-family"),
    (["--ip-family", "dual", "--cni", "ptp"], "cni"),
])
def test_up_refuses_what_ipv6_does_not_support_yet_in_one_line_and_makes_nothing(args, field, capsys):
    from tortie.lab import cli, nsutil, state

    name = f"fam{uuid.uuid4().hex[:8]}"
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["up", "--name", name, *args]) == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # not left raising KeyboardInterrupt in this process
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tortie-lab: {field}: ") and "\n" not in err, err
    assert not os.path.exists(state.lab_dir(name))
    assert not [n for n in nsutil.netns_list() if topology.is_lab_netns(name, n)]
