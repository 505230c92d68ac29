"""The agent's view of policies: datastore keys folded into ClusterState, then the filter."""

import json

from tortie.agent.calc import ClusterState
from tortie.agent.calc_desired import network_policy
from tortie.policy.netpol import INGRESS, allows

P = "/tortie/"


def put(state, key, obj):
    return state.apply(P + key, json.dumps(obj).encode())


def wep(state, ns, name, node, ip, **labels):
    put(state, f"resources/workloadendpoint/{ns}/{name}", {
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"node": node, "interfaceName": f"tor{name}", "ipNetworks": [ip]}})


def test_policies_and_namespaces_are_kept_and_forgotten():
    s = ClusterState(prefix=P)
    wep(s, "prod", "web", "n1", "10.65.0.1/32")
    wep(s, "dev", "tool", "n2", "10.65.1.1/32")
    assert network_policy(s, "n1").pods == ()
    assert put(s, "resources/networkpolicy/prod/allow-dev", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-dev", "namespace": "prod"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "dev"}}}]}]}})
    f = network_policy(s, "n1")
    assert [p.interface for p in f.pods] == ["torweb"]
    assert not allows(f, "torweb", INGRESS, "10.65.1.1")  # dev has no labels yet
    assert put(s, "resources/namespace/dev", {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": "dev", "labels": {"team": "dev"}}})
    assert allows(network_policy(s, "n1"), "torweb", INGRESS, "10.65.1.1")
    assert network_policy(s, "n2").pods == ()  # the policy's pods live on n1

    assert s.apply(P + "resources/namespace/dev", None)
    assert not allows(network_policy(s, "n1"), "torweb", INGRESS, "10.65.1.1")
    assert s.apply(P + "resources/networkpolicy/prod/allow-dev", None)
    assert network_policy(s, "n1").pods == ()
    s.clear()
    assert not s.policies and not s.namespaces


def test_an_invalid_policy_is_skipped_not_fatal():
    s = ClusterState(prefix=P)
    assert not put(s, "resources/networkpolicy/prod/bad", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "prod"}, "spec": {"policyTypes": ["Sideways"]}})
    assert s.policies == {}
