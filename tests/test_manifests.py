"""manifests/: every Kubernetes object valid against the API's own schema (strict: no
unknown fields), every tortie resource valid by tortie's own validation; the etcd wiring
(every component gets all members over https and the client certificate from the
tortie-etcd-certs Secret, which is required); and the controller's Deployment can run as
it says: two replicas electing a leader through a Lease its RBAC lets it get, create and
update, with settings the controller accepts."""

from __future__ import annotations

import glob
import os

import kubernetes_validate
import pytest
import yaml

from tortie.datastore.resources import validate
from tortie.kube.leader import LeaderElectionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [(os.path.basename(path), doc) for path in sorted(glob.glob(os.path.join(ROOT, "manifests", "*.yaml")))
        for doc in yaml.safe_load_all(open(path)) if doc]


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_is_valid(name, doc):
    if doc["apiVersion"].startswith("tortie.io/"):
        validate(doc)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _k8s_docs() -> list[dict]:
    return [d for _, d in DOCS if not d["apiVersion"].startswith("tortie.io/")]  # tortiectl's, not the API's


def test_every_component_gets_every_etcd_member_and_the_client_certificate():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in DOCS}
    secret = docs[("Secret", "tortie-etcd-certs")]
    assert set(secret["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}
    endpoints = docs[("ConfigMap", "tortie-config")]["data"]["etcd_endpoints"].split(",")
    assert len(endpoints) == 3 and all(e.startswith("https://") for e in endpoints)
    workloads = [d for d in docs.values() if d["kind"] in ("DaemonSet", "Deployment")]
    assert {d["metadata"]["name"] for d in workloads} == {"tortie-node", "tortie-controller"}
    for d in workloads:
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["TORTIE_ETCD_ENDPOINTS"]["valueFrom"]["configMapKeyRef"]["key"] == "etcd_endpoints"
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/tortie/etcd")
            source = volumes[mount["name"]]["secret"]
            assert source["secretName"] == "tortie-etcd-certs" and not source.get("optional")
            files = {"CA": "ca.crt", "CERT": "tls.crt", "KEY": "tls.key"}
            assert {k: env[f"TORTIE_ETCD_{k}"]["value"] for k in files} == {
                k: f"/etc/tortie/etcd/{f}" for k, f in files.items()}


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
