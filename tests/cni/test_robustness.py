"""Concurrency, a restarted CNI server, and etcd out of reach."""

from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

from cni_helpers import tcp_reachable


def _args(pod: str) -> str:
    return f"K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod}"


def test_concurrent_adds_of_distinct_pods(cni_node):
    pods = [(uuid.uuid4().hex, cni_node.pod_ns()) for _ in range(12)]
    with ThreadPoolExecutor(len(pods)) as ex:
        calls = list(ex.map(lambda cp: cni_node.exec_plugin("ADD", cni_node.config(), cid=cp[0], netns=cp[1],
                                                            args=_args(cp[0][:8])), pods))
    assert all(c.rc == 0 for c in calls), [c.stdout for c in calls if c.rc]
    ips = [c.json["ips"][0]["address"] for c in calls]
    assert len(set(ips)) == len(pods)
    assert sorted(a + "/32" for a in cni_node.allocations()) == sorted(ips)
    assert len(cni_node.veths()) == len(pods) and len(cni_node.weps()) == len(pods)
    assert tcp_reachable(pods[0][1], ips[-1].split("/")[0], pods[-1][1])
    with ThreadPoolExecutor(len(pods)) as ex:
        dels = list(ex.map(lambda cp: cni_node.exec_plugin("DEL", cni_node.config(), cid=cp[0], netns=cp[1],
                                                           args=_args(cp[0][:8])), pods))
    assert all(c.rc == 0 for c in dels)
    assert cni_node.veths() == [] and cni_node.allocations() == [] and cni_node.weps() == []


def test_concurrent_adds_of_one_container_are_serialized(cni_node):
    cid, pod_ns = uuid.uuid4().hex, cni_node.pod_ns()
    with ThreadPoolExecutor(6) as ex:
        calls = list(ex.map(lambda _: cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns,
                                                           args=_args("same")), range(6)))
    assert all(c.rc == 0 for c in calls), [c.stdout for c in calls if c.rc]
    assert len({json.dumps(c.json, sort_keys=True) for c in calls}) == 1
    assert len(cni_node.allocations()) == 1 and len(cni_node.veths()) == 1


def test_restarted_server_keeps_pods_and_adopts_them(cni_node):
    cid, pod_ns = uuid.uuid4().hex, cni_node.pod_ns()
    first = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns, args=_args("keep")).json
    ip = first["ips"][0]["address"].split("/")[0]
    cni_node.stop_server()
    assert tcp_reachable(cni_node.ns, ip, pod_ns)  # the pod works with no server running
    cni_node.start_server()
    chk = cni_node.exec_plugin("CHECK", cni_node.config(prevResult=first), cid=cid, netns=pod_ns)
    assert chk.rc == 0, chk.stdout
    again = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns, args=_args("keep"))
    assert again.json == first
    assert cni_node.exec_plugin("DEL", cni_node.config(), cid=cid, netns=pod_ns, args=_args("keep")).rc == 0
    assert cni_node.allocations() == []


def test_etcd_unreachable_is_try_again_later(cni_node):
    cid, pod_ns = uuid.uuid4().hex, cni_node.pod_ns()
    cni_node.relay.close()
    r = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns, args=_args("web"))
    assert r.rc != 0
    assert r.json["code"] == 11, r.stdout
    s = cni_node.exec_plugin("STATUS", cni_node.config("1.1.0"))
    assert s.rc != 0 and s.json["code"] == 50
    assert cni_node.veths() == []
    links = subprocess.run(["ip", "-n", pod_ns, "-o", "link"], capture_output=True, text=True).stdout
    assert "eth0" not in links
