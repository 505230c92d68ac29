"""The controller end to end: the fake API server on one side, real etcd on the other."""

from __future__ import annotations

import json
import time

from doubles.apiserver_fake import namespace, network_policy, node, pod
from kubehelpers import wait_for

from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound
from tortie.kube.mirror import MIRROR_ANNOTATION

POLICY = {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                       "ports": [{"protocol": "TCP", "port": 5432}]}]}


def _get(store: ResourceStore, kind: str, name: str, ns: str | None = None) -> dict | None:
    try:
        return store.get(kind, name, ns)
    except NotFound:
        return None


def _labels(store, kind, name, ns=None):
    r = _get(store, kind, name, ns)
    return None if r is None else r["metadata"].get("labels", {})


def _pool(store: ResourceStore, name: str = "pool1", cidr: str = "10.244.0.0/16") -> None:
    store.create({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
                  "spec": {"cidr": cidr, "blockSize": 26}})


def _cluster(etcd, fake_api, *pods: str) -> tuple[ResourceStore, IPAM]:
    """A pool, Kubernetes node1 and these pods of namespace default on it."""
    store, ipam = ResourceStore(etcd), IPAM(etcd)
    _pool(store)
    fake_api.add(node("node1"))
    for name in pods:
        fake_api.add(pod("default", name))
    return store, ipam


def _wep(store: ResourceStore, ns: str, name: str, pod_name: str, node_name: str = "node1",
         labels: dict | None = None, container: str = "c1") -> dict:
    return store.create({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                         "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                         "spec": {"node": node_name, "pod": pod_name, "containerID": container,
                                  "ipNetworks": ["10.244.0.5/32"]}})


def test_namespaces_and_policies_mirrored_updated_and_removed(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    fake_api.add(namespace("prod", {"env": "prod"}))
    fake_api.add(network_policy("prod", "db-ingress", POLICY))
    ctl = run_controller()

    ns = store.get("Namespace", "prod")
    assert ns["apiVersion"] == "v1" and ns["metadata"]["labels"] == {"env": "prod"}
    assert ns["metadata"]["annotations"][MIRROR_ANNOTATION] == "kubernetes"
    assert "status" not in ns
    pol = store.get("NetworkPolicy", "db-ingress", "prod")
    assert pol["apiVersion"] == "networking.k8s.io/v1"
    assert pol["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert "uid" not in json.dumps(pol["spec"])

    # Changes arrive through the watch.
    fake_api.label("Namespace", "prod", {"env": "production"})
    fake_api.add(namespace("dev"))
    changed = dict(POLICY, ingress=[{"ports": [{"protocol": "UDP", "port": 53}]}])
    fake_api.modify(network_policy("prod", "db-ingress", changed))
    wait_for(lambda: _labels(store, "Namespace", "prod") == {"env": "production"}, what="namespace relabel")
    wait_for(lambda: _get(store, "Namespace", "dev"), what="namespace dev")
    wait_for(lambda: store.get("NetworkPolicy", "db-ingress", "prod")["spec"]["ingress"]
             == [{"ports": [{"protocol": "UDP", "port": 53}]}], what="policy change")

    # A resync with nothing changed writes nothing...
    writes, resyncs = ctl.writes, ctl.resyncs
    rv = store.get("Namespace", "prod")["metadata"]["resourceVersion"]
    ctl.request_resync()
    wait_for(lambda: ctl.resyncs > resyncs, what="resync")
    assert store.get("Namespace", "prod")["metadata"]["resourceVersion"] == rv
    assert ctl.writes == writes
    # ...and repairs a copy edited behind its back.
    edited = store.get("Namespace", "prod")
    edited["metadata"]["labels"] = {"env": "tampered"}
    store.apply(edited)
    ctl.request_resync()
    wait_for(lambda: _labels(store, "Namespace", "prod") == {"env": "production"}, what="drift repaired")

    fake_api.delete("NetworkPolicy", "db-ingress", "prod")
    fake_api.delete("Namespace", "dev")
    wait_for(lambda: _get(store, "NetworkPolicy", "db-ingress", "prod") is None, what="policy deleted")
    wait_for(lambda: _get(store, "Namespace", "dev") is None, what="namespace deleted")
    assert _get(store, "Namespace", "prod") is not None


def test_resync_after_410_removes_stale_and_keeps_user_resources(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    # A policy a user applied with tortiectl: not the controller's to delete.
    store.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "by-hand", "namespace": "prod"}, "spec": {"podSelector": {}}})
    fake_api.add(namespace("keep"))
    fake_api.add(namespace("gone"))
    ctl = run_controller(retry_interval=1.0)  # the changes below land while it waits to reconnect
    assert _get(store, "Namespace", "gone") is not None
    lists = ctl.reflectors["Namespace"].lists

    # The controller loses its watch while the namespace is deleted and history is compacted:
    # the re-watch gets 410 Gone, the relist no longer has it, and the stale copy goes.
    fake_api.drop_watches()
    fake_api.delete("Namespace", "gone")
    fake_api.add(namespace("new"))
    fake_api.compact()
    wait_for(lambda: ctl.reflectors["Namespace"].lists > lists, what="relist after 410")
    wait_for(lambda: _get(store, "Namespace", "gone") is None, what="stale namespace removed")
    wait_for(lambda: _get(store, "Namespace", "new"), what="new namespace")
    assert _get(store, "Namespace", "keep") is not None
    assert _get(store, "NetworkPolicy", "by-hand", "prod") is not None


def test_stale_copies_from_before_start_are_removed(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    store.apply({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "old", "annotations": {MIRROR_ANNOTATION: "kubernetes"}}})
    store.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mine"}})
    run_controller()
    assert _get(store, "Namespace", "old") is None
    assert _get(store, "Namespace", "mine") is not None


def test_node_labels_mirrored_without_touching_bgp_spec(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    store.create({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "node1"},
                  "spec": {"bgp": {"ipv4Address": "10.99.1.2/24", "asNumber": 64513}}})
    fake_api.add(node("node1", {"zone": "a", "kubernetes.io/hostname": "node1"}))
    fake_api.add(node("node2", {"zone": "b"}))
    run_controller()

    n1 = store.get("Node", "node1")
    assert n1["metadata"]["labels"] == {"zone": "a", "kubernetes.io/hostname": "node1"}
    assert n1["spec"]["bgp"] == {"ipv4Address": "10.99.1.2/24", "asNumber": 64513}
    assert store.get("Node", "node2")["metadata"]["labels"] == {"zone": "b"}

    fake_api.label("Node", "node1", {"zone": "c"})
    wait_for(lambda: _labels(store, "Node", "node1") == {"zone": "c"}, what="node relabel")
    assert store.get("Node", "node1")["spec"]["bgp"]["asNumber"] == 64513


def test_pod_labels_reach_existing_workload_endpoint(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    _wep(store, "prod", "node1-k8s-web-eth0", "web", labels={"tortie.io/namespace": "prod", "stale": "x"})
    _wep(store, "prod", "node1-k8s-other-eth0", "other", container="c2")
    fake_api.add(pod("prod", "web", {"app": "web", "tier": "front"}))
    ctl = run_controller(gc_grace=3600)  # the endpoint without a pod stays for this test

    assert _labels(store, "WorkloadEndpoint", "node1-k8s-web-eth0", "prod") == {
        "app": "web", "tier": "front", "tortie.io/namespace": "prod"}
    assert _labels(store, "WorkloadEndpoint", "node1-k8s-other-eth0", "prod") == {}  # no such pod

    fake_api.label("Pod", "web", {"app": "web"}, "prod")
    wait_for(lambda: _labels(store, "WorkloadEndpoint", "node1-k8s-web-eth0", "prod")
             == {"app": "web", "tortie.io/namespace": "prod"}, what="pod relabel")

    # An endpoint the CNI server creates after the pod's labels are known gets them too.
    fake_api.add(pod("prod", "late", {"app": "late"}))
    wait_for(lambda: ("prod", "late") in ctl.pods, what="pod seen")
    _wep(store, "prod", "node1-k8s-late-eth0", "late", container="c3")
    wait_for(lambda: _labels(store, "WorkloadEndpoint", "node1-k8s-late-eth0", "prod") == {"app": "late"},
             what="labels on a new endpoint")
    assert store.get("WorkloadEndpoint", "node1-k8s-late-eth0", "prod")["spec"]["containerID"] == "c3"


def _ports(store, name, ns):
    r = _get(store, "WorkloadEndpoint", name, ns)
    return None if r is None else r["spec"].get("ports", [])


def test_pod_named_ports_reach_its_workload_endpoint(etcd, fake_api, run_controller):
    """spec.containers[*].ports[*] with a name become the endpoint's spec.ports (what
    NetworkPolicy named ports resolve against); unnamed ones are left out."""
    store = ResourceStore(etcd)
    _wep(store, "prod", "node1-k8s-web-eth0", "web")
    fake_api.add(pod("prod", "web", {"app": "web"}, ports=[
        [{"name": "http", "containerPort": 8080}, {"containerPort": 9999}],
        [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]]))
    run_controller(gc_grace=3600)
    want = [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "http", "protocol": "TCP", "port": 8080}]
    wait_for(lambda: _ports(store, "node1-k8s-web-eth0", "prod") == want, what="ports mirrored")
    assert _labels(store, "WorkloadEndpoint", "node1-k8s-web-eth0", "prod") == {"app": "web"}

    fake_api.modify(pod("prod", "web", {"app": "web"}, ports=[[{"name": "http", "containerPort": 80}]]))
    wait_for(lambda: _ports(store, "node1-k8s-web-eth0", "prod") == [{"name": "http", "protocol": "TCP", "port": 80}],
             what="ports changed")
    fake_api.modify(pod("prod", "web", {"app": "web"}))
    wait_for(lambda: _ports(store, "node1-k8s-web-eth0", "prod") == [], what="ports removed")


def test_node_deletion_releases_its_blocks(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    ipam = IPAM(etcd)
    _pool(store)
    for name in ("node1", "node2"):
        fake_api.add(node(name))
    fake_api.add(pod("default", "p1", node_name="node1"))
    ctl = run_controller()
    ipam.auto_assign("k8s-pod-network.c1", "node1", attrs={"namespace": "default", "pod": "p1"})
    ipam.auto_assign("k8s-pod-network.c2", "node2", attrs={"namespace": "default", "pod": "p2"})
    fake_api.add(pod("default", "p2", node_name="node2"))
    assert [b.node for b in ipam.node_blocks("node1")] == ["node1"]
    wait_for(lambda: ("default", "p2") in ctl.pods, what="pod p2 seen")

    fake_api.delete("Node", "node1")
    wait_for(lambda: _get(store, "Node", "node1") is None, what="tortie node deleted")
    wait_for(lambda: not ipam.node_blocks("node1"), what="node1 blocks released")
    assert not [k for k in etcd.get_prefix(etcd.config.prefix + "ipam/affinity/node1/")[0]]
    # Its pod's address stays allocated (the pod still exists), in a block without affinity.
    assert ipam.ips_by_handle("k8s-pod-network.c1")
    assert len(ipam.node_blocks("node2")) == 1


def test_leaked_address_of_deleted_pod_is_reaped_after_grace(etcd, fake_api, run_controller):
    _, ipam = _cluster(etcd, fake_api, "alive", "doomed")
    ctl = run_controller(gc_interval=0.2, gc_grace=1.5)
    alive = ipam.auto_assign("k8s-pod-network.a", "node1", attrs={"namespace": "default", "pod": "alive"})
    doomed = ipam.auto_assign("k8s-pod-network.d", "node1", attrs={"namespace": "default", "pod": "doomed"})
    other = ipam.auto_assign("k8s-pod-network.x", "node1")  # not a pod's: never reaped
    rounds = ctl.gc_rounds
    wait_for(lambda: ctl.gc_rounds >= rounds + 3, what="gc rounds")
    assert ipam.ips_by_handle("k8s-pod-network.d") == doomed  # its pod exists

    deleted_at = time.monotonic()
    fake_api.delete("Pod", "doomed", "default")
    wait_for(lambda: not ipam.ips_by_handle("k8s-pod-network.d"), timeout=10, what="leak reaped")
    # Released, but not before the grace period had passed (a stall only makes this later).
    assert time.monotonic() - deleted_at >= 1.5
    assert ipam.ips_by_handle("k8s-pod-network.a") == alive
    assert ipam.ips_by_handle("k8s-pod-network.x") == other
    assert ctl.gc.released_total == 1


def test_reconnects_after_dropped_watch(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    ctl = run_controller()
    watches = fake_api.watch_requests
    fake_api.drop_watches()
    # Each of the four reflectors resumes its watch (without a relist).
    assert fake_api.wait_for_watches(watches + 4, timeout=10)
    fake_api.add(namespace("after-drop", {"x": "y"}))
    wait_for(lambda: _get(store, "Namespace", "after-drop"), what="namespace after reconnect")
    assert all(r.lists == 1 for r in ctl.reflectors.values())
    assert all(r.reconnects >= 1 for r in ctl.reflectors.values())


def test_controller_survives_watches_cut_repeatedly(etcd, fake_api, run_controller):
    """Changes made while every watch is being cut, again and again, still all arrive."""
    store = ResourceStore(etcd)
    run_controller()
    for i in range(10):
        fake_api.add(namespace(f"ns{i}"))
        fake_api.drop_watches()
    wait_for(lambda: all(_get(store, "Namespace", f"ns{i}") for i in range(10)), timeout=30,
             what="all namespaces")


def test_an_object_tortie_rejects_is_skipped_not_fatal(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    fake_api.add(network_policy("prod", "bad", {"podSelector": {}, "policyTypes": ["Sideways"]}))
    fake_api.add(network_policy("prod", "good"))
    ctl = run_controller()
    assert _get(store, "NetworkPolicy", "bad", "prod") is None
    assert _get(store, "NetworkPolicy", "good", "prod") is not None
    assert not ctl.dirty["NetworkPolicy"]  # not retried forever
    fake_api.modify(network_policy("prod", "bad"))  # fixed: now it goes through
    wait_for(lambda: _get(store, "NetworkPolicy", "bad", "prod"), what="fixed policy mirrored")


def _http_get(port: int, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_ready_only_once_in_sync(etcd, fake_api, run_controller):
    # No API server behind this address: alive, never ready, the watches report the error.
    lost = run_controller(wait_synced=False, k8s_api="http://127.0.0.1:9", health="127.0.0.1:0")
    port = wait_for(lambda: lost.health_port, what="health port")
    wait_for(lambda: lost.reflectors["Node"].reconnects, what="a failed list")
    assert _http_get(port, "/liveness")[0] == 200
    code, body = _http_get(port, "/readiness")
    assert code == 503 and body["ready"] is False
    assert body["components"]["watch-node"]["lastError"]

    ctl = run_controller(health="127.0.0.1:0")
    code, body = _http_get(ctl.health_port, "/readiness")
    assert code == 200 and body["components"]["datastore"]["live"]
    assert _http_get(ctl.health_port, "/nope")[0] == 404


def test_endpoint_of_a_vanished_pod_is_removed_then_its_address(etcd, fake_api, run_controller):
    """A node died before CNI DEL ran: the pod is gone from Kubernetes but its endpoint and
    address are still in the datastore. Both go, the endpoint first, each after the grace."""
    store, ipam = _cluster(etcd, fake_api, "live", "ghost")
    for name, cid in (("live", "c-live"), ("ghost", "c-ghost")):
        ipam.auto_assign(f"k8s-pod-network.{cid}", "node1", attrs={"namespace": "default", "pod": name})
        _wep(store, "default", f"node1-k8s-{name}-eth0", name, container=cid)
    store.create({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",  # not Kubernetes': kept
                  "metadata": {"name": "vm1", "namespace": "default"},
                  "spec": {"node": "node1", "orchestrator": "openstack", "workload": "vm1", "pod": "vm1"}})
    ctl = run_controller(gc_interval=0.2, gc_grace=1.0)
    deleted_at = time.monotonic()
    fake_api.delete("Pod", "ghost", "default")
    wait_for(lambda: _get(store, "WorkloadEndpoint", "node1-k8s-ghost-eth0", "default") is None,
             what="endpoint of the vanished pod removed")
    wait_for(lambda: not ipam.ips_by_handle("k8s-pod-network.c-ghost"), timeout=10, what="its address released")
    assert time.monotonic() - deleted_at >= 2.0  # two grace periods: endpoint, then address
    assert _get(store, "WorkloadEndpoint", "node1-k8s-live-eth0", "default") is not None
    assert ipam.ips_by_handle("k8s-pod-network.c-live")
    assert _get(store, "WorkloadEndpoint", "vm1", "default") is not None
    assert ctl.gc.released_total == 1
