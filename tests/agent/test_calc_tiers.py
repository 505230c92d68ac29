"""Calico policies in the calculation: evaluation order across tiers, kept current event by
event (the property test in test_calc_props.py mixes these in at random; these cases make
sure the rarer ones happen: a Tier's order changing, a namespace relabelled under a global
policy's namespaceSelector, a pod joining a notSelector)."""

from __future__ import annotations

import json

from tortie.agent.calc import Calculation
from tortie.agent.calc_desired import network_policy
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.policy.messages import EndpointFilterUpdate, PolicyUpdate

P = "/tortie/"
ME = "n1"


def doc(kind, name, spec, ns=None, labels=None, api="tortie.io/v1"):
    meta = {"name": name, **({"namespace": ns} if ns else {}), **({"labels": labels} if labels else {})}
    d = {"apiVersion": api, "kind": kind, "metadata": meta}
    if spec is not None:
        d["spec"] = spec
    return json.dumps(res.validate(d)).encode()


def wep(name, ip, app, ns="x"):
    key = P + keys.resource_key("workloadendpoint", name, ns)
    return key, doc("WorkloadEndpoint", name, {"node": ME, "interfaceName": f"tor{name}", "ipNetworks": [ip]},
                    ns, {"app": app})


class Fed:
    def __init__(self, items: dict) -> None:
        self.calc = Calculation(ME, prefix=P)
        self.calc.on_snapshot(items)
        self.pods: dict = {}
        self.policies: dict = {}
        self.take()

    def take(self) -> None:
        for m in self.calc.take_messages():
            if isinstance(m, EndpointFilterUpdate):
                if m.filter is None:
                    self.pods.pop(m.interface)
                else:
                    self.pods[m.interface] = m.filter
            elif isinstance(m, PolicyUpdate):
                if m.policy is None:
                    self.policies.pop(m.key)
                else:
                    self.policies[m.key] = m.policy

    def update(self, key: str, value: bytes | None) -> None:
        self.calc.on_update(key, value)
        self.take()
        full = network_policy(self.calc.state, ME)
        assert self.pods == {f.interface: f for f in full.pods}
        assert self.policies == {p.key: p for p in full.policies}


def gnp(name, tier, order, **spec):
    return P + keys.resource_key("globalnetworkpolicy", name), doc(
        "GlobalNetworkPolicy", name, {"tier": tier, "order": order, "selector": "all()", **spec})


def test_tier_order_change_reorders_every_pod():
    items = dict([wep("a", "10.65.0.1/32", "web"), gnp("g1", "sec", 1, ingress=[{"action": "Pass"}]),
                  gnp("g2", "ops", 1, ingress=[{"action": "Deny"}])])
    items[P + keys.resource_key("tier", "sec")] = doc("Tier", "sec", {"order": 10})
    items[P + keys.resource_key("tier", "ops")] = doc("Tier", "ops", {"order": 20})
    fed = Fed(items)
    assert fed.pods["tora"].ingress == ("*/GlobalNetworkPolicy:g1", "*/GlobalNetworkPolicy:g2")
    assert fed.pods["tora"].ingress_tiers == (1, 1)
    fed.update(P + keys.resource_key("tier", "ops"), doc("Tier", "ops", {"order": 5}))
    assert fed.pods["tora"].ingress == ("*/GlobalNetworkPolicy:g2", "*/GlobalNetworkPolicy:g1")
    # a Kubernetes policy joins the default tier (order 1,000,000): last
    np_key = P + keys.resource_key("networkpolicy", "k", "x")
    fed.update(np_key, doc("NetworkPolicy", "k", {"podSelector": {}}, "x", api="networking.k8s.io/v1"))
    assert fed.pods["tora"].ingress == ("*/GlobalNetworkPolicy:g2", "*/GlobalNetworkPolicy:g1", "x/k")
    assert fed.pods["tora"].ingress_tiers == (1, 1, 1)
    fed.update(P + keys.resource_key("tier", "ops"), None)  # no order: after every ordered tier
    assert fed.pods["tora"].ingress == ("*/GlobalNetworkPolicy:g1", "x/k", "*/GlobalNetworkPolicy:g2")


def test_namespace_relabelled_under_a_global_namespace_selector():
    ns_key = P + keys.resource_key("namespace", "x")
    items = dict([wep("a", "10.65.0.1/32", "web"),
                  gnp("g", "default", 1, namespaceSelector="team == 'red'", ingress=[{"action": "Deny"}])])
    fed = Fed(items)
    assert "tora" not in fed.pods
    fed.update(ns_key, doc("Namespace", "x", None, labels={"team": "red"}, api="v1"))
    assert fed.pods["tora"].ingress == ("*/GlobalNetworkPolicy:g",)
    fed.update(ns_key, doc("Namespace", "x", None, labels={"team": "blue"}, api="v1"))
    assert "tora" not in fed.pods


def test_pod_joining_a_not_selector_changes_the_rule():
    items = dict([wep("a", "10.65.0.1/32", "web"), wep("b", "10.65.0.2/32", "db"),
                  gnp("g", "default", 1, selector="app == 'web'",
                      ingress=[{"action": "Allow", "source": {"selector": "all()", "notSelector": "app == 'db'"}}])])
    fed = Fed(items)
    allow = fed.policies["*/GlobalNetworkPolicy:g"].ingress[0]
    assert allow.not_peers == ("10.65.0.2/32",)
    fed.update(*wep("c", "10.65.0.3/32", "db"))
    assert fed.policies["*/GlobalNetworkPolicy:g"].ingress[0].not_peers == ("10.65.0.2/31",)
    fed.update(*wep("b", "10.65.0.2/32", "web"))
    assert fed.policies["*/GlobalNetworkPolicy:g"].ingress[0].not_peers == ("10.65.0.3/32",)


def test_host_endpoints_take_global_policies_and_deny_by_default():
    hep_key = P + keys.resource_key("hostendpoint", "n1-eth0")
    items = dict([gnp("uplink", "default", 1, selector="role == 'uplink'", ingress=[{"action": "Deny"}]),
                  gnp("ns-bound", "default", 1, selector="all()", namespaceSelector="all()",
                      ingress=[{"action": "Deny"}])])
    fed = Fed(items)
    fed.update(hep_key, doc("HostEndpoint", "n1-eth0", {"node": ME, "interfaceName": "eth0"}))
    f = fed.pods["host:eth0"]
    assert f.host and f.ingress == () and f.egress == ()  # selected by nothing: denied (Calico)
    fed.update(hep_key, doc("HostEndpoint", "n1-eth0", {"node": ME, "interfaceName": "eth0"},
                            labels={"role": "uplink"}))
    assert fed.pods["host:eth0"].ingress == ("*/GlobalNetworkPolicy:uplink",)  # a namespaceSelector: pods only
    assert "hostfwd:eth0" not in fed.pods  # forwarded traffic: no applyOnForward policy, not filtered
    fed.update(*gnp("uplink", "default", 1, selector="role == 'uplink'", applyOnForward=True,
                    ingress=[{"action": "Deny"}]))
    assert fed.pods["hostfwd:eth0"].ingress == ("*/GlobalNetworkPolicy:uplink",)
    assert fed.pods["hostfwd:eth0"].egress is None  # no egress policy forwards: not filtered
    assert fed.pods["host:eth0"].egress == ()  # the host's own: denied
    fed.update(*gnp("uplink", "default", 1, selector="role == 'uplink'", applyOnForward=True, preDNAT=True,
                    ingress=[{"action": "Deny"}]))
    assert fed.pods["hostpre:eth0"].ingress == ("*/GlobalNetworkPolicy:uplink",)
    assert fed.pods["hostpre:eth0"].egress is None
    assert "hostfwd:eth0" not in fed.pods and fed.pods["host:eth0"].ingress == ()  # its own stage only
    fed.update(*gnp("uplink", "default", 1, selector="role == 'uplink'", applyOnForward=True, doNotTrack=True,
                    types=["Ingress", "Egress"], ingress=[{"action": "Allow"}], egress=[{"action": "Allow"}]))
    raw = fed.pods["hostraw:eth0"]
    assert raw.ingress == raw.egress == ("*/GlobalNetworkPolicy:uplink",)
    assert "hostpre:eth0" not in fed.pods and fed.pods["host:eth0"].ingress == ()
    fed.update(*gnp("uplink", "default", 1, selector="role == 'none'", ingress=[{"action": "Deny"}]))
    assert not {"hostfwd:eth0", "hostpre:eth0", "hostraw:eth0"} & set(fed.pods)
    assert fed.pods["host:eth0"].ingress == ()
    fed.update(hep_key, doc("HostEndpoint", "n1-eth0", {"node": "n2", "interfaceName": "eth0"}))
    assert "host:eth0" not in fed.pods  # another node's
