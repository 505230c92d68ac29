"""The lab's datastore helpers against the shared real etcd (no lab needed)."""

from __future__ import annotations

import pytest

from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound
from tortie.lab import dsops


def _wep(ns: str, name: str, pod: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"node": "node1", "pod": pod, "ipNetworks": ["10.65.0.7/32"]}}


def test_bootstrap_creates_pool_and_ipamconfig_once(etcd):
    store = ResourceStore(etcd)
    assert dsops.bootstrap(store, "10.65.0.0/16", 26) == {"ippool": True, "ipamconfig": True}
    assert dsops.bootstrap(store, "10.65.0.0/16", 26) == {"ippool": False, "ipamconfig": False}
    pool = store.get("IPPool", "default-ipv4")
    assert pool["spec"]["cidr"] == "10.65.0.0/16" and pool["spec"]["blockSize"] == 26
    store.get("IPAMConfig", "default")


def test_find_and_label_a_pods_endpoint(etcd):
    store = ResourceStore(etcd)
    store.create(_wep("default", "node1-k8s-a-eth0", "a", {"app": "web", "old": "x"}))
    store.create(_wep("default", "node1-k8s-ab-eth0", "ab"))
    store.create(_wep("other", "node1-k8s-a-eth0", "a", {"app": "db"}))
    assert dsops.find_wep(store, "default", "a")["metadata"]["name"] == "node1-k8s-a-eth0"
    assert dsops.find_wep(store, "default", "zz") is None

    labels = dsops.set_labels(store, "default", "a", {"tier": "front", "app": "api"}, ["old", "absent"])
    assert labels == {"app": "api", "tier": "front"}
    assert dsops.find_wep(store, "default", "a")["metadata"]["labels"] == labels
    # The pod of the same name in another namespace and the other pod are untouched.
    assert dsops.find_wep(store, "other", "a")["metadata"]["labels"] == {"app": "db"}
    assert dsops.find_wep(store, "default", "ab")["metadata"]["labels"] == {}
    with pytest.raises(NotFound):
        dsops.set_labels(store, "default", "zz", {"a": "b"}, [])
