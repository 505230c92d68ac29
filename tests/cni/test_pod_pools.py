"""Issue 5, item 3: a pod asks for its pool -- in the network config's IPAM section, or
(when the agent has a Kubernetes API) by the `tortie.io/ipv4pools` annotation on the pod
or its namespace. Issue 10: the same read of the pod gives its endpoint the named
container ports (else `args.cni.ports` does). Real plugin exec, real CNI server, real etcd; the Kubernetes API is
the fake HTTP server, reached from inside the node namespace through a relay."""

from __future__ import annotations

import ipaddress
import json
import uuid

import pytest
from cni_helpers import POOL_CIDR, NsRelay
from doubles.apiserver_fake import FakeAPIServer, namespace, pod

POOL2 = "10.245.0.0/16"
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"


@pytest.fixture
def node2pools(cni_node):
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool2"},
                          "spec": {"cidr": POOL2, "blockSize": 26}})
    return cni_node


def _add(node, ns: str, name: str, **conf) -> str:
    cid = uuid.uuid4().hex
    r = node.exec_plugin("ADD", node.config(**conf), cid=cid, netns=node.pod_ns(),
                         args=ARGS.format(ns=ns, pod=name, cid=cid))
    assert r.rc == 0, r.stdout + r.stderr
    return r.json["ips"][0]["address"].split("/")[0]


def _wep_of(node, pod_name: str) -> dict:
    return next(w for w in node.weps() if w["spec"].get("pod") == pod_name)


def test_named_ports_from_args_cni(node2pools):
    node = node2pools
    ports = [{"name": "http", "port": 80}, {"name": "dns", "protocol": "UDP", "containerPort": 53}]
    _add(node, "ns1", "web", args={"cni": {"ports": ports}})
    assert _wep_of(node, "web")["spec"]["ports"] == [{"name": "dns", "protocol": "UDP", "port": 53},
                                                     {"name": "http", "protocol": "TCP", "port": 80}]
    cid = uuid.uuid4().hex
    r = node.exec_plugin("ADD", node.config(args={"cni": {"ports": [{"name": "HTTP", "port": 80}]}}), cid=cid,
                         netns=node.pod_ns(), args=ARGS.format(ns="ns1", pod="bad", cid=cid))
    assert r.rc != 0 and "args.cni.ports" in r.stdout, r.stdout


def _in(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def test_network_config_names_the_pool(node2pools):
    assert _in(_add(node2pools, "ns1", "plain"), POOL_CIDR)  # first pool by default
    ipam = {"type": "tortie-ipam", "ipv4_pools": ["pool2"]}
    assert _in(_add(node2pools, "ns1", "by-name", ipam=ipam), POOL2)
    assert _in(_add(node2pools, "ns1", "by-cidr", ipam={**ipam, "ipv4_pools": [POOL2]}), POOL2)


def test_annotation_on_pod_or_namespace(node2pools):
    node = node2pools
    with FakeAPIServer() as api:
        relay = NsRelay(node.ns, ("127.0.0.1", int(api.url.rsplit(":", 1)[1])))
        try:
            node.stop_server()
            node.etcd_env["TORTIE_K8S_API"] = relay.endpoint
            node.start_server()
            ann = {"tortie.io/ipv4pools": json.dumps(["pool2"])}
            api.add(namespace("ns1"))
            api.add(namespace("ns2", annotations=ann))
            api.add(pod("ns1", "plain"))
            api.add(pod("ns1", "annotated", annotations=ann))
            api.add(pod("ns1", "by-cidr", annotations={"tortie.io/ipv4pools": json.dumps([POOL2])}))
            api.add(pod("ns2", "inherits"))
            api.add(pod("ns2", "overrides", annotations={"tortie.io/ipv4pools": json.dumps(["pool1"])}))
            api.add(pod("ns1", "beats-config", annotations=ann))
            api.add(pod("ns1", "serves", ports=[[{"name": "http", "containerPort": 8080}, {"containerPort": 9}]]))
            _add(node, "ns1", "serves")
            assert _wep_of(node, "serves")["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
            assert _in(_add(node, "ns1", "plain"), POOL_CIDR)
            assert _in(_add(node, "ns1", "annotated"), POOL2)
            assert _in(_add(node, "ns1", "by-cidr"), POOL2)
            assert _in(_add(node, "ns2", "inherits"), POOL2)
            assert _in(_add(node, "ns2", "overrides"), POOL_CIDR)
            # The annotation overrides the network config (as Calico's does).
            assert _in(_add(node, "ns1", "beats-config", ipam={"type": "tortie-ipam", "ipv4_pools": ["pool1"]}),
                       POOL2)
            # A malformed annotation fails the ADD and names the annotation; nothing is allocated.
            api.add(pod("ns1", "bad", annotations={"tortie.io/ipv4pools": "pool2"}))
            before = sorted(node.allocations())
            cid = uuid.uuid4().hex
            r = node.exec_plugin("ADD", node.config(), cid=cid, netns=node.pod_ns(),
                                 args=ARGS.format(ns="ns1", pod="bad", cid=cid))
            assert r.rc != 0 and "tortie.io/ipv4pools" in r.stdout, r.stdout
            assert sorted(node.allocations()) == before
        finally:
            node.stop_server()
            node.etcd_env.pop("TORTIE_K8S_API", None)
            relay.close()
