"""Dual-stack across two subnets (`up --subnets 2 --ip-family dual`, and `ipv6`): the plain router
between the segments forwards IPv6 as well as IPv4 but peers with nobody, so pods across
it do not reach each other until their pools ask for VXLAN (CrossSubnet); then every pod,
node and the outside host reach every pod over both families, IPv6 through the IPv6
VXLAN device (an IPv6 underlay). The IPv6-only lab does the same with no IPv4 anywhere.
"""

from __future__ import annotations

import json
import time

import pytest

from tortie.lab import family

pytestmark = pytest.mark.slow

NODES = ("node1", "node2", "node3")  # node3 on the second segment


def set_vxlan(lab, mode: str) -> None:
    for name in (family.POOL_NAMES[v] for v in lab.plan().versions):
        doc = json.loads(lab.ctl("get", "ippool", name, "-o", "json").stdout)
        doc = doc["items"][0] if "items" in doc else doc
        doc["metadata"] = {"name": name}
        doc["spec"]["vxlanMode"] = mode
        lab.ctl("apply", "-f", "-", input=json.dumps(doc))


def matrix_ok(lab, fam: int, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        m = lab.matrix(family=fam, timeout=0.5)
        if m.ok or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


@pytest.fixture(scope="module", params=["dual", "ipv6"])
def lab(request, lab_factory):
    lab = lab_factory(nodes=3, subnets=2, ip_family=request.param)
    for i, node in enumerate(NODES, 1):
        lab.pod_add(node, f"default/p{i}")
    yield lab
    lab.down()


def test_the_router_forwards_ipv6_between_the_segments_but_no_pod_route(lab):
    third = lab.plan().nodes[2]
    assert third.uplinks[0].address.startswith("10.99.200.")  # the plan's (IPv4) form of it
    node3_v6 = family.v6(third.ip)
    # a port nothing listens on over IPv6: node3's kernel refusing it is the proof it came across
    probe = (f"import socket\ntry: socket.create_connection(('{node3_v6}', 9), 3)\n"
             "except ConnectionRefusedError: print('refused')")
    r = lab.exec("node1", ["python3", "-c", probe], capture_output=True, text=True)
    assert r.stdout.strip() == "refused", r.stdout + r.stderr
    for fam in lab.plan().versions:
        assert not lab.probe("default/p1", "default/p3", family=fam, timeout=0.5).ok  # no overlay yet
        assert lab.probe("default/p1", "default/p2", family=fam).ok  # same segment: routed by BGP


def test_crosssubnet_vxlan_carries_both_families(lab):
    set_vxlan(lab, "CrossSubnet")
    try:
        for fam in lab.plan().versions:
            m = matrix_ok(lab, fam, 20)
            assert m.ok, m.render()
            assert "ext" in m.sources and {r.proto for r in m.results} == {"tcp", "udp"}
        for node in NODES:
            out = lab.exec(node, ["ip", "-d", "-j", "link", "show", "vxlan-v6.tortie"], capture_output=True,
                           text=True, check=True).stdout
            link = json.loads(out)[0]
            local = link["linkinfo"]["info_data"]["local6"]
            assert local == family.v6(lab.node(node).ip), link  # the IPv6 underlay
    finally:
        set_vxlan(lab, "Never")
