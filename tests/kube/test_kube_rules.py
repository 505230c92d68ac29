"""Pure rules: what the controller writes for a Kubernetes object, and which leaks it frees."""

from __future__ import annotations

import pytest

from tortie.datastore.resources import validate
from tortie.errors import ValidationError
from tortie.kube import mirror
from tortie.kube.controller import ControllerConfig
from tortie.kube.gc import select_leaks

K8S_POLICY = {
    "kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
    "metadata": {"name": "p", "namespace": "prod", "uid": "u-1", "resourceVersion": "77", "generation": 2,
                 "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"team": "a"},
                 "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "note": "x"},
                 "managedFields": [{"manager": "kubectl"}]},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    "status": {},
}


def test_mirrored_policy_keeps_intent_and_drops_bookkeeping():
    out = mirror.mirrored(K8S_POLICY, "NetworkPolicy")
    assert out == {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "p", "namespace": "prod", "labels": {"team": "a"},
                                "annotations": {"note": "x", mirror.MIRROR_ANNOTATION: "kubernetes"}},
                   "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert mirror.is_mirrored(validate(out))


def test_mirrored_namespace_and_same_ignores_store_bookkeeping():
    ns = {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "dev", "uid": "x"},
          "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
    desired = validate(mirror.mirrored(ns, "Namespace"))
    stored = {**desired, "metadata": {**desired["metadata"], "uid": "other", "resourceVersion": "9",
                                      "creationTimestamp": "2026-01-01T00:00:00Z"}}
    assert mirror.same(stored, desired)
    relabelled = mirror.with_labels(stored, {"a": "b"})
    assert not mirror.same(relabelled, desired)
    assert not mirror.same(None, desired)
    assert not mirror.is_mirrored({"metadata": {"name": "dev"}})


def test_node_resource_replaces_labels_only():
    current = {"apiVersion": "tortie.io/v1", "kind": "Node",
               "metadata": {"name": "n1", "labels": {"old": "1"}, "resourceVersion": "5"},
               "spec": {"bgp": {"asNumber": 64513}}}
    out = mirror.node_resource("n1", {"zone": "a"}, current)
    assert out["metadata"] == {"name": "n1", "labels": {"zone": "a"}, "resourceVersion": "5"}
    assert out["spec"] == {"bgp": {"asNumber": 64513}}
    assert mirror.node_resource("n2", {}, None)["metadata"] == {"name": "n2", "labels": {}}
    assert "labels" not in mirror.node_resource("n1", {}, current)["metadata"]


def test_wep_labels_are_the_pods_plus_system_labels():
    current = {"tortie.io/namespace": "prod", "projectcalico.org/orchestrator": "k8s", "app": "old",
               "gone": "x"}
    assert mirror.wep_labels(current, {"app": "new"}) == {
        "tortie.io/namespace": "prod", "projectcalico.org/orchestrator": "k8s", "app": "new"}


def _leak(pod, ip, handle=None, ns="default"):
    return {"ip": ip, "block": "10.0.0.0/26", "handle": handle or f"h-{pod}", "node": "n1",
            "namespace": ns, "pod": pod, "reasons": ["no-workloadendpoint"]}


def test_select_leaks_waits_out_the_grace_period():
    report = {"leaked_allocations": [_leak("gone", "10.0.0.1"), _leak("alive", "10.0.0.2"),
                                     _leak("", "10.0.0.3", handle="not-a-pod")]}
    live = {("default", "alive")}
    first = select_leaks(report, live, {}, now=100.0, grace=10.0)
    assert first.release == [] and first.first_seen == {("h-gone", "10.0.0.1"): 100.0}
    early = select_leaks(report, live, first.first_seen, now=109.0, grace=10.0)
    assert early.release == [] and early.first_seen == first.first_seen
    due = select_leaks(report, live, early.first_seen, now=110.0, grace=10.0)
    assert [x["ip"] for x in due.release] == ["10.0.0.1"] and due.first_seen == {}


def test_select_leaks_forgets_a_candidate_whose_pod_appeared():
    report = {"leaked_allocations": [_leak("p", "10.0.0.1")]}
    seen = select_leaks(report, set(), {}, now=0.0, grace=5.0).first_seen
    assert seen
    assert select_leaks(report, {("default", "p")}, seen, now=10.0, grace=5.0) == \
        select_leaks(report, {("default", "p")}, {}, now=10.0, grace=5.0)
    # Back to a candidate later: the grace period starts over.
    again = select_leaks(report, set(), {}, now=10.0, grace=5.0)
    assert again.release == [] and again.first_seen == {("h-p", "10.0.0.1"): 10.0}


def test_config_from_env():
    cfg = ControllerConfig.from_env({"TORTIE_K8S_API": "http://127.0.0.1:1", "TORTIE_ETCD_PREFIX": "/x/",
                                     "TORTIE_CONTROLLER_GC_GRACE": "12.5"})
    assert cfg.k8s_api == "http://127.0.0.1:1" and cfg.etcd.prefix == "/x/" and cfg.gc_grace == 12.5
    assert cfg.gc_interval == 300.0 and cfg.kubeconfig is None
    with pytest.raises(ValidationError) as exc:
        ControllerConfig.from_env({"TORTIE_CONTROLLER_GC_INTERVAL": "soon"})
    assert exc.value.field == "TORTIE_CONTROLLER_GC_INTERVAL"
