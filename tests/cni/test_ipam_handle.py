"""Issue 12, finding 1: a pod of a CNI network not named `k8s-pod-network` is no leak.

The CNI server records the handle of the pod's addresses in its WorkloadEndpoint
(`spec.ipamHandle`); `tortiectl ipam check` matches allocations against it, and
`ipam release --from-report` frees an address only if no WorkloadEndpoint names its
handle -- even from a report that lists it. Real plugin exec, CNI server and etcd.
"""

from __future__ import annotations

import io
import json
import uuid

from tortie.ctl.main import main

NETWORK = "blue-net"


def _tortiectl(etcd_config, *argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    flags = ["--etcd-endpoints", ",".join(etcd_config.endpoints), "--etcd-prefix", etcd_config.prefix]
    rc = main([*flags, *argv], out=out, err=err)
    assert rc == 0, err.getvalue()
    return out.getvalue()


def _add(node, pod: str) -> tuple[str, str]:
    cid = uuid.uuid4().hex
    r = node.exec_plugin("ADD", {**node.config(), "name": NETWORK}, cid=cid, netns=node.pod_ns(),
                         args=f"K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod}")
    assert r.rc == 0, r.stdout + r.stderr
    return cid, r.json["ips"][0]["address"].split("/")[0]


def test_pod_of_another_network_is_not_a_leak_and_keeps_its_address(cni_node, etcd_config, tmp_path):
    node = cni_node
    node.store.apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": node.name}})
    cid, first = _add(node, "web-1")
    [wep] = node.weps()
    assert wep["spec"]["ipamHandle"] == f"{NETWORK}.{cid}"

    report_path = tmp_path / "report.json"
    out = _tortiectl(etcd_config, "ipam", "check", "-o", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["leaked_allocations"] == [], out
    assert "No leaks found." in out

    # A report that lists the live address anyway (written before the endpoint was, or
    # by an older tortiectl): releasing from it must leave the address with its pod.
    report["leaked_allocations"] = [{
        "ip": first, "block": next(b.cidr for b in node.ipam.blocks() if any(h.ip == first for h in b.held())),
        "handle": f"{NETWORK}.{cid}", "node": node.name, "namespace": "ns1", "pod": "web-1",
        "reasons": ["no-workloadendpoint"]}]
    report["clean"] = False
    report_path.write_text(json.dumps(report))
    out = _tortiectl(etcd_config, "ipam", "release", "--from-report", str(report_path))
    assert "released" not in out.replace("Nothing to release", "")
    assert first in node.allocations()

    _cid2, second = _add(node, "web-2")
    assert second != first
