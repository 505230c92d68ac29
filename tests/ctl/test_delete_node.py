"""`tortiectl delete node` frees what the node held, as calicoctl does."""

from tortie.ctl.main import main
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore


def test_deleting_a_node_releases_its_endpoints_addresses_and_blocks(etcd, etcd_config, capsys):
    args = ["--etcd-endpoints", ",".join(etcd_config.endpoints), "--etcd-prefix", etcd_config.prefix]
    store, ipam = ResourceStore(etcd), IPAM(etcd)
    store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "p"},
                 "spec": {"cidr": "10.80.0.0/16"}})
    for node in ("gone", "stays"):
        store.apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": node}, "spec": {}})
        ip = ipam.auto_assign(f"k8s-pod-network.c-{node}", node)[0]
        store.apply({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                     "metadata": {"name": f"w-{node}", "namespace": "default"},
                     "spec": {"node": node, "pod": f"p-{node}", "containerID": f"c-{node}",
                              "endpoint": "eth0", "orchestrator": "k8s", "ipNetworks": [f"{ip}/32"]}})
    assert main([*args, "delete", "node", "gone"]) == 0
    assert "released 1 workload endpoint(s), 1 address(es), 1 block(s)" in capsys.readouterr().out
    assert [b.node for b in ipam.all_blocks()] == ["stays"]
    assert [w["spec"]["node"] for w in store.list("workloadendpoint")] == ["stays"]
    assert ipam.ips_by_handle("k8s-pod-network.c-gone") == []
    report = ipam.check()
    for leak in ("leaked_allocations", "orphan_blocks", "orphan_affinities", "stale_pending"):
        assert report[leak] == [], leak
    assert report["summary"]["allocations"] == 1
