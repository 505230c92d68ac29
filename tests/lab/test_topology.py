"""The lab's address plan, naming and record: pure functions, no kernel."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from tortie.errors import ValidationError
from tortie.lab import state, topology
from tortie.lab.probe import Matrix, ProbeResult


def test_plan_addresses_and_names():
    plan = topology.make_plan("lab1", 3)
    assert [n.name for n in plan.nodes] == ["node1", "node2", "node3"]
    assert [n.netns for n in plan.nodes] == ["lab1-node1", "lab1-node2", "lab1-node3"]
    assert [n.address for n in plan.nodes] == ["10.99.0.11/24", "10.99.0.12/24", "10.99.0.13/24"]
    assert plan.ctl_netns == "lab1-ctl" and plan.net_netns == "lab1-net"
    assert plan.etcd_endpoint == "http://10.99.0.2:2379"
    assert len({n.ip for n in plan.nodes} | {plan.ctl_address.split("/")[0]}) == 4
    assert plan.netns_names() == ["lab1-net", "lab1-ctl", "lab1-ext", "lab1-node1", "lab1-node2", "lab1-node3"]
    # no router: the outside host enters through node1
    assert (plan.ext_address, plan.core_gateways) == ("10.99.0.3/24", ("10.99.0.11",))


def test_plan_with_three_etcd_members_over_tls():
    plan = topology.make_plan("lab1", 2, "bird", 2, etcd_members=3, etcd_tls=True)
    assert [(m.name, m.netns, m.address) for m in plan.members] == [
        ("n1", "lab1-etcd1", "10.99.0.6/24"), ("n2", "lab1-etcd2", "10.99.0.7/24"), ("n3", "lab1-etcd3", "10.99.0.8/24")]
    assert plan.etcd_endpoints == tuple(f"https://10.99.0.{i}:2379" for i in (6, 7, 8))
    # no address of the core segment twice (routers, ctl, the outside host, members)
    core = [plan.ctl_address, plan.ext_address, *(t.address for t in plan.tors), *(m.address for m in plan.members)]
    assert len(set(core)) == len(core)
    assert {"lab1-etcd1", "lab1-etcd2", "lab1-etcd3"} <= set(plan.netns_names())
    assert all(topology.is_lab_netns("lab1", m.netns) for m in plan.members)
    # the record of a lab made before members existed reads back as one member in ctl
    old = topology.plan_from_dict({k: v for k, v in asdict(topology.make_plan("lab1", 1)).items()
                                   if k not in ("etcd_members", "etcd_tls")})
    assert [(m.name, m.netns) for m in old.members] == [("n1", "lab1-ctl")]
    assert topology.plan_from_dict(asdict(plan)) == plan
    with pytest.raises(ValidationError, match="etcd-members"):
        topology.make_plan("lab1", 1, etcd_members=2)


@pytest.mark.parametrize("name", ["", "Tortie", "my-lab", "1lab", "a" * 17, "x/y"])
def test_bad_lab_names(name):
    with pytest.raises(ValidationError):
        topology.make_plan(name, 1)


@pytest.mark.parametrize("nodes,tor,uplinks", [
    (0, "none", 1), (topology.MAX_NODES + 1, "none", 1), (1, "cisco", 1), (1, "none", 2), (1, "bird", 3)])
def test_bad_plans(nodes, tor, uplinks):
    with pytest.raises(ValidationError):
        topology.make_plan("lab", nodes, tor, uplinks)


def test_plan_with_two_uplinks():
    plan = topology.make_plan("lab1", 3, "frr", uplinks=2)
    assert [(t.name, t.netns, t.address, t.as_number) for t in plan.tors] == [
        ("tor1", "lab1-tor1", "10.99.0.1/24", 65000), ("tor2", "lab1-tor2", "10.99.0.5/24", 65001)]
    assert [s.subnet for s in plan.segments] == ["10.99.101.0/24", "10.99.102.0/24"]
    n3 = plan.nodes[2]
    assert [(u.ifname, u.address, u.gateway, u.bridge) for u in n3.uplinks] == [
        ("eth0", "10.99.101.13/24", "10.99.101.1", "up1"), ("eth1", "10.99.102.13/24", "10.99.102.1", "up2")]
    assert n3.address == "10.99.101.13/24" and n3.gateways == ("10.99.101.1", "10.99.102.1")
    assert plan.core_gateways == ("10.99.0.1", "10.99.0.5")
    assert [u.ip for _, u in plan.links_of("tor2")] == ["10.99.102.11", "10.99.102.12", "10.99.102.13"]
    addrs = [u.address for n in plan.nodes for u in n.uplinks] + [t.address for t in plan.tors]
    addrs += [plan.ctl_address, plan.ext_address, *(t.segment_address for t in plan.tors)]
    assert len(set(addrs)) == len(addrs)
    # The record's JSON form gives the same plan back.
    from dataclasses import asdict
    assert topology.plan_from_dict(asdict(plan)) == plan
    flat = topology.make_plan("lab1", 2)
    assert topology.plan_from_dict(asdict(flat)) == flat


def test_pod_names():
    assert topology.split_pod("default/a") == ("default", "a")
    assert topology.split_pod("web") == ("default", "web")
    for bad in ("Default/a", "ns/", "ns/a_b", "a/b/c"):
        with pytest.raises(ValidationError):
            topology.split_pod(bad)
    assert topology.pod_netns("lab", "default", "a") == "lab-pod-default-a"
    long = topology.pod_netns("lab", "kube-system", "x" * 50)
    assert long.startswith("lab-pod-") and len(long) <= 48
    assert long != topology.pod_netns("lab", "kube-system", "x" * 49)


def test_lab_namespace_matching_never_takes_another_labs():
    for ns in ("lab-ctl", "lab-net", "lab-node12", "lab-pod-default-a", "lab-tor", "lab-ext"):
        assert topology.is_lab_netns("lab", ns)
    for ns in ("lab2-ctl", "labx-node1", "lab-nodes", "lab", "other-lab-ctl", "tt-lab-ctl"):
        assert not topology.is_lab_netns("lab", ns)


def test_state_round_trip():
    st = state.LabState(name="lab", dir="/run/x/lab", plan={"a": 1}, netns=["lab-net"])
    st.procs.append(state.Proc(role="etcd", pid=10, start=99, netns="lab-ctl", log="/l", cmd=("etcd",)))
    st.pods["default/a"] = state.Pod("default", "a", "node1", "lab-pod-default-a", "c1",
                                     address="10.65.0.1", labels={"app": "web"})
    back = state.LabState.from_json(st.to_json())
    assert back == st
    assert back.proc("etcd").pid == 10 and back.proc("nope") is None


def test_matrix_cells_and_verdict():
    def r(src, dst, proto, ok):
        return ProbeResult(src=src, dst=dst, addr="10.0.0.1", port=80, proto=proto, ok=ok)
    m = Matrix(("node1", "a"), ("a", "b"), 80, (
        r("node1", "a", "tcp", True), r("node1", "a", "udp", True),
        r("node1", "b", "tcp", True), r("node1", "b", "udp", False),
        r("a", "a", "tcp", True), r("a", "a", "udp", True),
        r("a", "b", "tcp", False), r("a", "b", "udp", False),
    ))
    assert not m.ok and len(m.failures) == 3
    assert m.cell("node1", "a") == "ok" and m.cell("node1", "b") == "tcp only"
    assert m.cell("a", "b") == "FAIL"
    text = m.render()
    assert "5/8 probes answered, 3 failed" in text
    assert text.splitlines()[2].split() == ["node1", "ok", "tcp", "only"]


def test_plan_with_a_router():
    plan = topology.make_plan("lab1", 2, "bird")
    tor = plan.tors[0]
    assert (tor.kind, tor.netns, tor.address, tor.as_number) == ("bird", "lab1-tor", "10.99.0.1/24", 65000)
    assert (plan.ext_netns, plan.ext_address, plan.core_gateways) == ("lab1-ext", "10.99.0.3/24", ("10.99.0.1",))
    n1, n2 = plan.nodes
    assert (n1.address, n1.gateways, n1.as_number) == ("10.99.1.2/24", ("10.99.1.1",), 64513)
    assert (n2.address, n2.gateways, n2.as_number) == ("10.99.2.2/24", ("10.99.2.1",), 64514)
    assert (n2.uplinks[0].far_netns, n2.uplinks[0].far_address) == ("lab1-tor", "10.99.2.1/24")
    assert [n.name for n, _ in plan.links_of("tor")] == ["node1", "node2"]
    assert set(plan.netns_names()) == {"lab1-net", "lab1-ctl", "lab1-tor", "lab1-ext", "lab1-node1", "lab1-node2"}
    assert topology.make_plan("lab1", 2, "frr").tors[0].kind == "frr"


def test_router_config_and_bgp_resources():
    from tortie.datastore.resources import validate
    from tortie.lab import routers

    plan = topology.make_plan("lab1", 2, "bird")
    conf = routers.bird_config(plan, plan.tors[0], "/x.log")
    assert "protocol bgp node2 from node {\n  local 10.99.2.1 as 65000;\n  neighbor 10.99.2.2 as 64514;" in conf
    frr = routers.frr_config(topology.make_plan("lab1", 2, "frr"), plan.tors[0], "/x.log")
    assert " neighbor 10.99.2.2 remote-as 64514\n neighbor 10.99.2.2 update-source 10.99.2.1" in frr
    assert "router bgp 65000" in frr and "no bgp ebgp-requires-policy" in frr
    res = routers.bgp_resources(plan)
    for r in res:
        validate(r)  # the datastore accepts every one
    peers = {r["spec"]["node"]: r["spec"] for r in res if r["kind"] == "BGPPeer"}
    assert peers["node1"]["peerIP"] == "10.99.1.1" and peers["node2"]["asNumber"] == 65000
    assert peers["node1"]["acceptPrefixes"] == [routers.POD_SPACE]
    assert routers.bgp_resources(plan, "192.168.0.0/16")[1 + 2]["spec"]["acceptPrefixes"] == [
        routers.POD_SPACE, "192.168.0.0/16"]
    # MD5 passwords per node on the router's side
    assert '  neighbor 10.99.2.2 as 64514;\n  password "pw2";\n}' in routers.bird_config(
        plan, plan.tors[0], "/x.log", {"node2": "pw2"})
    assert " neighbor 10.99.1.2 password pw1\n" in routers.frr_config(plan, plan.tors[0], "/x.log", {"node1": "pw1"})
    with pytest.raises(ValidationError):
        routers.check_password('a"b')
    default = next(r for r in res if r["metadata"]["name"] == "default")
    assert default["spec"]["nodeToNodeMeshEnabled"] is False
    # each BGPPeer says which router it is (IPPool egress.fromPeers selects by it)
    assert {r["metadata"]["labels"]["router"] for r in res if r["kind"] == "BGPPeer"} == {"tor"}
    # prefixes the router originates (`router announce`): to the nodes only, not its kernel
    assert "protocol static announced" not in conf
    announcing = routers.bird_config(plan, plan.tors[0], "/x.log", announce=("0.0.0.0/0",))
    assert "protocol static announced { ipv4; route 0.0.0.0/0 blackhole; }" in announcing
    assert 'export where source = RTS_BGP || proto = "announced"; next hop self;' in announcing
    assert "ipv4 { import none; export where source = RTS_BGP; };" in announcing  # the kernel protocol
    assert routers.bgp_resources(topology.make_plan("lab1", 2)) == []


def test_reflector_labs_turn_the_mesh_off_and_make_the_last_nodes_reflectors():
    from tortie.datastore.kinds import validate
    from tortie.lab.cluster import Lab, reflector_resources

    plan = topology.make_plan("lab1", 5, "none")
    res = reflector_resources(plan, 2)
    assert res[0]["kind"] == "BGPConfiguration" and res[0]["spec"] == {"nodeToNodeMeshEnabled": False}
    assert [r["metadata"]["name"] for r in res[1:]] == ["node4", "node5"]
    for r in res:
        validate(r)
    assert reflector_resources(plan, 0) == []
    for nodes, tor, k in ((5, "none", 5), (5, "bird", 1), (1, "none", 1)):
        with pytest.raises(ValidationError, match="reflectors"):
            Lab.up("lab1", nodes, tor, reflectors=k)
