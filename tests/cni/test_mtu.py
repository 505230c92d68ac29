"""The network config's `mtu` per family: an IPv6 pod needs 1280 at least (RFC 8200; under
it the kernel silently takes IPv6 off the link). Refused in one line naming the field,
before anything is allocated or stored; an IPv4-only pod takes it."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from cni_helpers import NETWORK

from tortie.cni import protocol as p

ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"


@pytest.fixture
def pool6(cni_node):
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool6"},
                          "spec": {"cidr": "fd00:12::/64"}})


def add(node, pod_ns, cid, **conf):
    return node.exec_plugin("ADD", node.config("1.0.0", **conf), cid=cid, netns=pod_ns,
                            args=ARGS.format(pod="m", cid=cid))


def test_an_mtu_under_1280_for_an_ipv6_pool_is_refused_naming_the_field(cni_node, pool6):
    pod_ns, cid = cni_node.pod_ns(), uuid.uuid4().hex
    r = add(cni_node, pod_ns, cid, mtu=1200, ipam={"assign_ipv6": "true"})
    assert r.rc != 0
    err = r.json
    assert err["code"] == p.INVALID_CONFIG
    assert err["msg"].startswith("mtu: 1200") and "1280" in err["msg"] and "\n" not in err["msg"]
    # nothing stored, nothing wired
    assert cni_node.ipam.ips_by_handle(f"{NETWORK}.{cid}") == []
    assert cni_node.store.list("WorkloadEndpoint", "ns1") == []
    assert cni_node.veths() == []


def test_an_ipv4_only_pod_takes_an_mtu_under_1280_and_an_ipv6_pod_1280(cni_node, pool6):
    pod_ns = cni_node.pod_ns()
    r = add(cni_node, pod_ns, uuid.uuid4().hex, mtu=1200)
    assert r.rc == 0, r.stdout
    pod6 = cni_node.pod_ns()
    r6 = add(cni_node, pod6, uuid.uuid4().hex, mtu=1280, ipam={"assign_ipv6": "true"})
    assert r6.rc == 0, r6.stdout
    for ns, mtu, has6 in ((pod_ns, 1200, False), (pod6, 1280, True)):
        link = json.loads(subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "eth0"], capture_output=True,
                                         text=True, check=True).stdout)[0]
        assert link["mtu"] == mtu
        assert any(a["family"] == "inet6" and a["scope"] == "global" for a in link["addr_info"]) == has6


@pytest.mark.parametrize("raw, ipv6, want", [
    (None, True, 0), (0, True, 0), ("1500", True, 1500), (1280, True, 1280), (576, False, 576),
    (1279, True, "an IPv6 pool needs at least 1280"), (67, False, "68-65535"), (70000, False, "68-65535"),
    ("big", False, "is not a number"), (True, False, "is not a number"),
])
def test_check_mtu(raw, ipv6, want):
    if isinstance(want, int):
        assert p.check_mtu({"mtu": raw}, ipv6) == want
    else:
        with pytest.raises(p.CNIError) as e:
            p.check_mtu({"mtu": raw}, ipv6)
        assert want in e.value.msg and e.value.msg.startswith("mtu: ")
