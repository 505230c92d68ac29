"""Issue 9 item 1: tortie-controller mirrors Services and EndpointSlices from the
Kubernetes API (list/watch, relist after 410) into etcd, as given; one the datastore
refuses is skipped, not stored half-read."""

from __future__ import annotations

import time

from kubehelpers import wait_for

from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound
from tortie.kube.mirror import MIRROR_ANNOTATION


def _service(name: str, ns: str = "shop", **spec) -> dict:
    body = {"type": "LoadBalancer", "selector": {"app": name}, "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20"], "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080,
                                                     "protocol": "TCP"}],
            "sessionAffinity": "None", "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}
    body.update(spec)
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": body,
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}}


def _slice(name: str, service: str, *addresses: str, ns: str = "shop") -> dict:
    return {"kind": "EndpointSlice", "metadata": {"name": name, "namespace": ns,
                                                  "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]}


def _get(store, kind, name, ns="shop"):
    try:
        return store.get(kind, name, ns)
    except NotFound:
        return None


def test_services_and_slices_mirrored_updated_removed_and_relisted(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    store.create({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                  "spec": {"cidr": "10.244.0.0/16"}})
    fake_api.add(_service("web"))
    fake_api.add(_slice("web-x1", "web", "10.244.0.5", "10.244.1.7"))
    run_controller()
    svc = wait_for(lambda: _get(store, "Service", "web"), what="service mirrored")
    assert svc["metadata"]["annotations"][MIRROR_ANNOTATION] == "kubernetes"
    assert svc["spec"]["ports"][0]["nodePort"] == 30080
    assert svc["status"] == {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}
    eps = wait_for(lambda: _get(store, "EndpointSlice", "web-x1"), what="slice mirrored")
    assert [e["addresses"] for e in eps["endpoints"]] == [["10.244.0.5"], ["10.244.1.7"]]

    fake_api.modify(_slice("web-x1", "web", "10.244.0.5"))
    wait_for(lambda: len((_get(store, "EndpointSlice", "web-x1") or {}).get("endpoints", ())) == 1,
             what="endpoint removal mirrored")
    # history compacted while the watch is cut: the relist still brings the change
    fake_api.drop_watches()
    fake_api.compact()
    fake_api.modify(_service("web", sessionAffinity="ClientIP"))
    wait_for(lambda: (_get(store, "Service", "web") or {}).get("spec", {}).get("sessionAffinity") == "ClientIP",
             what="change after 410 mirrored")
    # outside every pool: Kubernetes takes it, tortie does not (logged, nothing stored)
    fake_api.add(_slice("web-bad", "web", "192.0.2.99"))
    fake_api.modify(_slice("web-x1", "web", "10.244.0.5", "10.244.2.2"))  # same kind, after it in the pass
    wait_for(lambda: len((_get(store, "EndpointSlice", "web-x1") or {}).get("endpoints", ())) == 2,
             what="the next slice mirrored")
    assert _get(store, "EndpointSlice", "web-bad") is None
    fake_api.delete("Service", "web", "shop")
    wait_for(lambda: _get(store, "Service", "web") is None, what="service removal mirrored")
    fake_api.delete("EndpointSlice", "web-x1", "shop")
    wait_for(lambda: _get(store, "EndpointSlice", "web-x1") is None, what="slice removal mirrored")


def test_a_service_applied_with_tortiectl_is_never_deleted(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    mine = _service("lab-only")
    mine.pop("status")
    store.create({"apiVersion": "v1", **mine})
    ctl = run_controller()
    wait_for(lambda: ctl.resyncs >= 1, what="a resync pass")
    assert _get(store, "Service", "lab-only") is not None


def test_load_balancer_addresses_assigned_from_the_load_balancer_pool(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    store.create({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "lbs"},
                  "spec": {"cidr": "10.97.0.0/24", "allowedUses": ["LoadBalancer"]}})
    bare = _service("web")
    bare.pop("status")
    fake_api.add(bare)
    fake_api.add({**_service("asks", loadBalancerIP="10.97.0.5", clusterIP="10.96.0.21", clusterIPs=["10.96.0.21"]),
                  "status": {}})
    fake_api.add({**_service("other", loadBalancerClass="example.com/lb", clusterIP="10.96.0.22",
                             clusterIPs=["10.96.0.22"]), "status": {}})
    fake_api.add({**_service("outside", loadBalancerIP="192.0.2.1", clusterIP="10.96.0.23",
                             clusterIPs=["10.96.0.23"]), "status": {}})
    run_controller()

    def lb(name):
        return ((fake_api.get("Service", name, "shop").get("status") or {}).get("loadBalancer") or {}).get("ingress")

    assert wait_for(lambda: lb("web"), what="an address for web") == [{"ip": "10.97.0.1", "ipMode": "VIP"}]
    assert wait_for(lambda: lb("asks"), what="the address asked for") == [{"ip": "10.97.0.5", "ipMode": "VIP"}]
    # mirrored into the datastore like any other change, so the nodes serve and announce it
    wait_for(lambda: ((_get(store, "Service", "web") or {}).get("status") or {}).get("loadBalancer"),
             what="the address mirrored")
    time.sleep(1.0)
    assert lb("other") is None  # another load balancer's class: not ours
    assert lb("outside") is None  # in no LoadBalancer pool: refused (logged), nothing written
