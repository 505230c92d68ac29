"""A dual-stack pod's pools per family (Calico's ipam ipv4_pools / ipv6_pools): a family's
list picks that family's pools only; a family without a list takes the node's pools."""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from cni_helpers import POOL_CIDR

ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"
POOL2, POOL6A, POOL6B = "10.245.0.0/16", "fd00:21::/64", "fd00:22::/64"


@pytest.fixture
def pools(cni_node):
    for name, cidr in (("pool2", POOL2), ("v6a", POOL6A), ("v6b", POOL6B)):
        cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
                              "spec": {"cidr": cidr}})


def add(node, **ipam):
    cid = uuid.uuid4().hex
    r = node.exec_plugin("ADD", node.config("1.0.0", ipam={"type": "tortie-ipam", "assign_ipv6": "true", **ipam}),
                         cid=cid, netns=node.pod_ns(), args=ARGS.format(pod=cid[:8], cid=cid))
    assert r.rc == 0, r.stdout
    return [ipaddress.ip_interface(i["address"]).ip for i in r.json["ips"]]


def test_ipv4_pools_alone_leave_ipv6_to_the_nodes_pools(cni_node, pools):
    v4, v6 = add(cni_node, ipv4_pools=["pool2"])
    assert v4 in ipaddress.ip_network(POOL2)
    assert v6.version == 6 and any(v6 in ipaddress.ip_network(c) for c in (POOL6A, POOL6B))


def test_each_family_takes_its_own_list(cni_node, pools):
    v4, v6 = add(cni_node, ipv4_pools=["pool1"], ipv6_pools=["v6b"])
    assert v4 in ipaddress.ip_network(POOL_CIDR) and v6 in ipaddress.ip_network(POOL6B)
    v4, v6 = add(cni_node, ipv6_pools=[POOL6A])  # by CIDR; IPv4 from the node's pools
    assert v6 in ipaddress.ip_network(POOL6A) and v4.version == 4


def test_a_pool_of_the_other_family_in_a_list_serves_nothing(cni_node, pools):
    cid = uuid.uuid4().hex
    r = cni_node.exec_plugin("ADD", cni_node.config("1.0.0", ipam={"type": "tortie-ipam", "assign_ipv6": "true",
                                                                    "ipv6_pools": ["pool2"]}),
                             cid=cid, netns=cni_node.pod_ns(), args=ARGS.format(pod="x", cid=cid))
    assert r.rc != 0 and "pool2" in r.json["msg"]
    assert cni_node.ipam.ips_by_handle(f"k8s-pod-network.{cid}") == []  # the IPv4 it took is given back
