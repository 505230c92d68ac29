"""Issue 13 acceptance, dual-stack: a 3-node lab with IPv4 and IPv6 on every link and in
every pod, behind BIRD and behind FRR. Every pod, node and the outside host reach every
pod over both families (TCP and UDP), the routers hold the nodes' IPv6 blocks (learned
over the IPv6 sessions), `ipam show` shows both pools, and a NetworkPolicy ipBlock with an
IPv6 CIDR holds. One lab per router kind, shared by the module's tests.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest
from lab_fixtures import PROBE, eventually, netpol

pytestmark = pytest.mark.slow

NODES = ("node1", "node2", "node3")
_script = os.path.join(os.path.dirname(sys.executable), "tortie-lab")
CLI = [_script] if os.access(_script, os.X_OK) else [sys.executable, "-m", "tortie.lab"]


def wait_matrix(lab, family: int, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        m = lab.matrix(family=family)
        if m.ok or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


@pytest.fixture(scope="module", params=["bird", "frr"])
def lab(request, lab_factory):
    lab = lab_factory(nodes=3, tor=request.param, ip_family="dual")
    for i, node in enumerate(NODES, 1):
        lab.pod_add(node, f"default/p{i}", labels={"app": f"p{i}"})
    yield lab
    lab.down()


def test_every_pod_has_one_address_of_each_family_ipv4_first(lab):
    for p in lab.state().pods.values():
        v4, v6 = (ipaddress.ip_address(a) for a in p.addresses)
        assert (v4.version, v6.version) == (4, 6), p.addresses
        assert v6 in ipaddress.ip_network("fd65::/48") and p.address == str(v4)


@pytest.mark.parametrize("family", [4, 6])
def test_full_matrix_over_both_families_tcp_udp_and_the_outside_host(lab, family):
    m = wait_matrix(lab, family)
    assert m.ok, m.render()
    assert {"node1", "node2", "node3", "ext"} <= set(m.sources)
    assert {r.proto for r in m.results} == {"tcp", "udp"}
    want = {p.address_of(family) for p in lab.state().pods.values()}
    assert {r.addr for r in m.results} == want  # probed at the addresses of this family
    assert len([r for r in m.results if r.src == "ext"]) == 2 * len(want)


def test_the_router_holds_every_ipv6_block_via_its_node(lab):
    plan = lab.plan()
    tor = plan.tors[0]
    via = {f"fd99:0:{i}::2": n.name for i, n in enumerate(plan.nodes, 1)}
    out = lab.exec(tor.name, ["ip", "-6", "-j", "route", "show"], capture_output=True, text=True, check=True).stdout
    held = {r["dst"]: via.get(r.get("gateway")) for r in json.loads(out) if r.get("dst", "").startswith("fd65:")}
    for p in lab.state().pods.values():
        owner = [node for dst, node in held.items()
                 if ipaddress.ip_address(p.address_of(6)) in ipaddress.ip_network(dst)]
        assert owner == [p.node], (p.ref, held)
    assert all(ipaddress.ip_network(dst).prefixlen == 122 for dst in held)  # the blocks, aggregated
    # over the IPv6 sessions: both families' sessions are up on the router
    sessions = lab.bgp_sessions()[tor.name]
    assert sessions == {**{n: "Established" for n in NODES}, **{f"{n}_v6": "Established" for n in NODES}}


def test_ipam_show_shows_both_pools(lab):
    rows = {line.split()[0]: line.split() for line in lab.ctl("ipam", "show").stdout.splitlines()[1:] if line.strip()}
    assert rows["default-ipv4"][1] == "10.65.0.0/16" and rows["default-ipv6"][1] == "fd65::/48"
    assert rows["default-ipv6"][2] == "/122"
    assert rows["default-ipv4"][4] == rows["default-ipv6"][4] == "3"  # one address per pod each


@pytest.fixture
def policies(lab):
    made = []

    def apply(doc: dict) -> None:
        lab.ctl("apply", "-f", "-", input=json.dumps(doc))
        made.append(doc["metadata"]["name"])

    yield apply
    for name in made:
        lab.ctl("delete", "networkpolicy", name, "-n", "default", "--ignore-not-found")
    assert eventually(lambda: lab.matrix(family=6, timeout=PROBE).ok and lab.matrix(timeout=PROBE).ok, True, 5)


def test_networkpolicy_ipblock_with_an_ipv6_cidr_holds(lab, policies):
    p2 = lab.pod("default/p2").address_of(6)
    policies(netpol("default", "p3-in", podSelector={"matchLabels": {"app": "p3"}}, policyTypes=["Ingress"],
                    ingress=[{"from": [{"ipBlock": {"cidr": "fd65::/48", "except": [f"{p2}/128"]}}],
                              "ports": [{"port": 80}]}]))

    def reach(src: str, family: int, port: int = 80) -> bool:
        return lab.probe(src, "default/p3", port, family=family, timeout=PROBE).ok

    assert eventually(lambda: reach("default/p2", 6), False)  # the except
    assert reach("default/p1", 6)  # inside the block, another node
    assert not reach("default/p1", 6, 81)  # port 80 only
    assert not reach("default/p1", 4)  # an IPv6 block lets no IPv4 in
    assert not reach("ext", 6)  # the outside host is outside the block
    assert lab.probe("default/p3", "default/p2", family=6, timeout=PROBE).ok  # egress stays open


def test_cli_pod_add_prints_both_addresses_and_probes_either_family(lab):
    name = lab.name
    r = subprocess.run([*CLI, "--name", name, "pod", "add", "node2", "default/cli"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        lines = r.stdout.split()
        assert [ipaddress.ip_address(a).version for a in lines] == [4, 6]
        assert lines == lab.pod("default/cli").addresses
        for flag in (["--family", "6"], ["-6"], ["--family", "4"], []):
            p = subprocess.run([*CLI, "--name", name, "probe", "ext", "default/cli", "80", "--udp", *flag],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr
            assert (lines[1] if flag and flag[-1].endswith("6") else lines[0]) in p.stdout
    finally:
        lab.pod_del("default/cli")


def test_networkpolicy_pod_selector_peers_hold_over_ipv6(lab, policies):
    policies(netpol("default", "p1-from-p2", podSelector={"matchLabels": {"app": "p1"}}, policyTypes=["Ingress"],
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "p2"}}}]}]))

    def reach(src: str, family: int) -> bool:
        return lab.probe(src, "default/p1", 80, family=family, timeout=PROBE).ok

    assert eventually(lambda: reach("default/p3", 6), False)
    assert not reach("default/p3", 4)
    assert reach("default/p2", 6) and reach("default/p2", 4)  # the peer pod, by each of its addresses


def test_a_pod_naming_only_an_ipv4_pool_takes_ipv6_from_the_default_pool(lab):
    lab.ctl("apply", "-f", "-", input=json.dumps({"apiVersion": "tortie.io/v1", "kind": "IPPool",
                                                  "metadata": {"name": "extra4"},
                                                  "spec": {"cidr": "10.72.0.0/24", "blockSize": 28}}))
    try:
        lab.pod_add("node3", "default/x4", pool="extra4")
        v4, v6 = (ipaddress.ip_address(a) for a in lab.pod("default/x4").addresses)
        assert v4 in ipaddress.ip_network("10.72.0.0/24") and v6 in ipaddress.ip_network("fd65::/48")
        for family in (4, 6):  # the new block's route reaches the router and the other nodes
            assert eventually(lambda f=family: lab.probe("default/p1", "default/x4", family=f, timeout=PROBE).ok,
                              True, 10), family
        with pytest.raises(Exception, match="no IPPool 'nope'"):
            lab.pod_add("node3", "default/x5", pool="nope")
    finally:
        lab.pod_del("default/x4")
        lab.ctl("delete", "ippool", "extra4", check=False)


def test_networkpolicy_named_port_holds_over_ipv6(lab, policies):
    lab.pod_add("node1", "default/named", labels={"app": "named"}, ports=[{"name": "web", "protocol": "TCP",
                                                                          "port": 81}])
    try:
        policies(netpol("default", "named-in", podSelector={"matchLabels": {"app": "named"}},
                        policyTypes=["Ingress"], ingress=[{"ports": [{"port": "web"}]}]))

        def reach(port: int, family: int) -> bool:
            return lab.probe("default/p2", "default/named", port, family=family, timeout=PROBE).ok

        assert eventually(lambda: reach(80, 6), False)  # not the named port
        assert reach(81, 6) and reach(81, 4)  # "web" is 81, over either family
        assert not reach(80, 4)
    finally:
        lab.ctl("delete", "networkpolicy", "named-in", "-n", "default", "--ignore-not-found")
        lab.pod_del("default/named")
