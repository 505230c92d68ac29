"""manifests/: every Kubernetes object valid against the API's own schema (strict:
no unknown fields), every tortie resource valid by tortie's own validation, and the etcd
wiring of issue 12: every component gets all members over https and the client
certificate from the tortie-etcd-certs Secret, which is required (not optional)."""

from __future__ import annotations

import glob
import os

import kubernetes_validate
import pytest
import yaml

from tortie.datastore.resources import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [(os.path.basename(path), doc) for path in sorted(glob.glob(os.path.join(ROOT, "manifests", "*.yaml")))
        for doc in yaml.safe_load_all(open(path)) if doc]


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_is_valid(name, doc):
    if doc["apiVersion"].startswith("tortie.io/"):
        validate(doc)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


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
