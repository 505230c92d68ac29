"""manifests/: every Kubernetes object validates against the API schema, and the
controller's Deployment can run as it says: two replicas electing a leader through a Lease
its RBAC lets it get, create and update, with settings the controller accepts."""

from __future__ import annotations

import glob
import os

import kubernetes_validate
import pytest
import yaml

from tortie.kube.leader import LeaderElectionConfig

MANIFESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests")


def _docs() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml"))):
        with open(path) as f:
            out += [d for d in yaml.safe_load_all(f) if d]
    return out


def _k8s_docs() -> list[dict]:
    return [d for d in _docs() if not d["apiVersion"].startswith("tortie.io/")]  # tortiectl's, not the API's


@pytest.mark.parametrize("doc", _k8s_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_objects_validate(doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _one(kind: str, name: str) -> dict:
    return next(d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def _grants(role: dict, resource: str, name: str) -> set[str]:
    """The verbs a Role grants on one named object of a coordination.k8s.io resource."""
    return {verb for rule in role["rules"] if "coordination.k8s.io" in rule["apiGroups"]
            and resource in rule["resources"] and name in rule.get("resourceNames", [name])
            for verb in rule["verbs"]}


def test_controller_replicas_may_elect_a_leader():
    deploy = _one("Deployment", "tortie-controller")
    ns = deploy["metadata"]["namespace"]
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 2
    container = next(c for c in pod["containers"] if c["name"] == "tortie-controller")
    env = {}
    for e in container["env"]:  # the downward API's values as the kubelet fills them in
        ref = (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = {"metadata.namespace": ns, "metadata.name": "tortie-controller-6d9f-x2k4"}.get(ref,
                                                                                                 e.get("value"))
    leader = LeaderElectionConfig.from_env({k: v for k, v in env.items() if v is not None})
    assert leader.enabled and leader.namespace == ns
    assert env["HOSTNAME"].startswith("tortie-controller-")  # the pod's name, not the node's

    # RBAC: the Deployment's service account may get, create and update that Lease.
    account = pod["serviceAccountName"]
    roles = {b["roleRef"]["name"] for b in _k8s_docs() if b["kind"] == "RoleBinding"
             and b["metadata"]["namespace"] == ns
             and {"kind": "ServiceAccount", "name": account, "namespace": ns} in b["subjects"]}
    verbs = set().union(*(_grants(_one("Role", r), "leases", leader.name) for r in roles))
    assert {"get", "create", "update"} <= verbs
    # Host network: two replicas on one node would share its ports.
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in anti)
