"""Issue 13 item 2: IPv6-only nodes (`--ip-family ipv6`). No IPv4 address on any node,
router, etcd or the outside host: BGP runs over IPv6 and carries IPv6 routes, and each
node's router ID is derived from its name (Calico's `hash` behaviour), since there is no
IPv4 address to take it from. One lab behind BIRD, one behind FRR, one full mesh.
"""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from tortie.agent import router_id
from tortie.lab import routers

pytestmark = pytest.mark.slow

NODES = ("node1", "node2", "node3")


def wait_for(check, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def status(lab) -> dict[str, dict]:
    return {d["node"]: d for d in json.loads(lab.ctl("node", "status", "-o", "json").stdout)}


@pytest.fixture(scope="module", params=["bird", "frr", "none"])
def lab(request, lab_factory):
    lab = lab_factory(nodes=3, tor=request.param, ip_family="ipv6")
    for i, node in enumerate(NODES, 1):
        lab.pod_add(node, f"default/p{i}")
    yield lab
    lab.down()


def test_nothing_of_the_lab_has_an_ipv4_address(lab):
    plan = lab.plan()
    for who in (*NODES, "ext", "ctl", *(t.name for t in plan.tors), *lab.state().pods):
        out = lab.exec(who, ["ip", "-4", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
        assert [a["local"] for i in json.loads(out) for a in i.get("addr_info", []) if a["local"] != "127.0.0.1"] == [], who
    assert lab.status()["etcd_endpoints"] == ["http://[fd99::2]:2379"]
    for p in lab.state().pods.values():
        assert [ipaddress.ip_address(a).version for a in p.addresses] == [6]


def test_bgp_over_ipv6_with_derived_router_ids(lab):
    assert wait_for(lambda: all(d["peers"] and all(p["state"] == "established" for p in d["peers"])
                                for d in status(lab).values()) and len(status(lab)) == 3, 20), status(lab)
    docs = status(lab)
    for node in NODES:
        d = docs[node]
        assert d["router_id"] == router_id.from_name(node)  # derived: no IPv4 address to take
        assert all(ipaddress.ip_address(p["peer"]).version == 6 for p in d["peers"])
        assert all(p["prefixes_received"] >= 1 for p in d["peers"]) if lab.plan().tors else True
    assert len({d["router_id"] for d in docs.values()}) == 3
    plan = lab.plan()
    if plan.tors and plan.tors[0].kind == "bird":  # the router sees each node's derived ID in its OPEN
        tor = plan.tors[0]
        for node in NODES:
            out = lab.birdc(tor.name, "show", "protocols", "all", f"{node}{routers.V6_SUFFIX}")
            assert f"Neighbor ID:      {router_id.from_name(node)}" in out, out
            assert "Channel ipv6" in out and "Channel ipv4" not in out
    elif plan.tors:
        tor = plan.tors[0]
        r = routers.vtysh(tor.netns, lab._router(tor).rdir, "show bgp neighbors json")
        seen = {addr: n.get("remoteRouterId") for addr, n in json.loads(r.stdout).items()}
        assert seen == {f"fd99:0:{i}::2": router_id.from_name(n) for i, n in enumerate(NODES, 1)}, seen
    else:  # the mesh: every node peers with every other over IPv6
        for node in NODES:
            assert sorted(p["peer"] for p in docs[node]["peers"]) == sorted(
                f"fd99::{10 + i}" for i, n in enumerate(NODES, 1) if n != node)


def test_every_pod_node_and_the_outside_host_reach_every_pod_over_ipv6(lab):
    m = wait_for(lambda: (lambda m: m if m.ok else None)(lab.matrix()), 20) or lab.matrix()
    assert m.ok, m.render()
    assert "ext" in m.sources and {r.proto for r in m.results} == {"tcp", "udp"}
    assert all(":" in r.addr for r in m.results)
    # the routes between nodes are learned over BGP (IPv6 next hops), not on-link
    for node in NODES:
        out = lab.exec(node, ["ip", "-6", "-j", "route", "show", "proto", "77"], capture_output=True, text=True,
                       check=True).stdout
        learned = [r for r in json.loads(out) if r.get("gateway")]
        assert len(learned) == 2 and all(ipaddress.ip_address(r["gateway"]).version == 6 for r in learned), out
