"""pod_pools against the fake API server through the official client."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from doubles.apiserver_fake import namespace, pod
from kubernetes import client as k8s

from tortie.errors import DatastoreUnavailable, NotFound, ValidationError
from tortie.kube.podinfo import IPV4_POOLS, IPV6_POOLS, core_api_from_env, pod_pools


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: str


@pytest.fixture
def core(kube_client):
    return k8s.CoreV1Api(kube_client)


def test_pod_annotation_wins_per_family(fake_api, core):
    fake_api.add(namespace("prod", annotations={IPV4_POOLS: json.dumps(["ns-pool"]),
                                                IPV6_POOLS: json.dumps(["fd00:1::/120"])}))
    fake_api.add(pod("prod", "web", annotations={IPV4_POOLS: json.dumps(["blue", "10.1.0.0/16"])}))
    assert pod_pools("prod", "web", core) == (["blue", "10.1.0.0/16"], ["fd00:1::/120"])
    fake_api.add(pod("prod", "plain"))
    assert pod_pools("prod", "plain", core) == (["ns-pool"], ["fd00:1::/120"])


def test_no_annotations_anywhere(fake_api, core):
    fake_api.add(namespace("dev"))
    fake_api.add(pod("dev", "p"))
    assert pod_pools("dev", "p", core) == ([], [])


def test_cidrs_resolved_to_pool_names(fake_api, core):
    fake_api.add(namespace("dev"))
    fake_api.add(pod("dev", "p", annotations={IPV4_POOLS: '["10.1.0.0/16", "red"]'}))
    pools = [Pool("blue", "10.1.0.0/16"), Pool("v6", "fd00::/120")]
    assert pod_pools("dev", "p", core, pools=pools) == (["blue", "red"], [])
    fake_api.add(pod("dev", "q", annotations={IPV4_POOLS: '["10.9.0.0/16"]'}))
    with pytest.raises(ValidationError, match=r"no IPPool has CIDR 10\.9\.0\.0/16"):
        pod_pools("dev", "q", core, pools=pools)


@pytest.mark.parametrize("value, error", [
    ("not json", "is not a JSON list"),
    ('{"a": 1}', "must be a JSON list"),
    ('["fd00::/64"]', "is not an IPv4 CIDR"),
    ('["10.0.0.0/33"]', "neither a pool name nor a CIDR"),
])
def test_malformed_annotation_names_the_field(fake_api, core, value, error):
    fake_api.add(namespace("dev"))
    fake_api.add(pod("dev", "p", annotations={IPV4_POOLS: value}))
    with pytest.raises(ValidationError, match=error) as exc:
        pod_pools("dev", "p", core)
    assert exc.value.field == IPV4_POOLS


def test_missing_pod_and_unreachable_api(fake_api, core):
    with pytest.raises(NotFound):
        pod_pools("dev", "nope", core)
    cfg = k8s.Configuration(host="http://127.0.0.1:9")  # discard port: nothing listens
    cfg.retries = 0
    with pytest.raises(DatastoreUnavailable):
        pod_pools("dev", "p", k8s.CoreV1Api(k8s.ApiClient(cfg)))


def test_core_api_from_env(fake_api):
    assert core_api_from_env({}) is None
    api = core_api_from_env({"TORTIE_K8S_API": fake_api.url + "/"})
    fake_api.add(namespace("dev"))
    fake_api.add(pod("dev", "p", annotations={IPV6_POOLS: '["v6"]'}))
    assert pod_pools("dev", "p", api) == ([], ["v6"])
    with pytest.raises(ValidationError) as exc:  # in-cluster claimed, but no service account files
        core_api_from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert exc.value.field == "TORTIE_K8S_API"
