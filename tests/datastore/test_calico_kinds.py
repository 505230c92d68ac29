"""Calico's policy kinds: what validation accepts (normalized) and what it refuses, in one
line naming the field. The lab test (tests/e2e/test_calico_policy.py) shows nothing is
stored; these run without etcd."""

import copy
import re

import pytest

from tortie.datastore import resources as res
from tortie.errors import ValidationError

GNP = {"apiVersion": "tortie.io/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "g"},
       "spec": {"order": 10, "selector": "app == 'web' && has(tier)",
                "ingress": [{"action": "Deny", "protocol": "TCP", "source": {"selector": "role in {'a', 'b'}"},
                             "destination": {"ports": [80, "8000:8080", "http"], "notPorts": [8001]}},
                            {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
                            {"action": "Pass", "protocol": 47, "source": {"nets": ["10.0.0.0/8"]}}]}}


def test_accepted_and_normalized():
    v = res.GlobalNetworkPolicy.from_resource(GNP)
    assert v.order == 10.0 and v.tier == "default" and v.policy_types == ("Ingress",)
    deny, icmp, gre = v.ingress
    assert [(p.protocol, p.port, p.end_port) for p in deny.ports] == [("TCP", 80, None), ("TCP", 8000, 8080),
                                                                      ("TCP", "http", None)]
    assert deny.not_ports[0].port == 8001 and deny.peers[0].namespace_selector is not None  # global: any namespace
    assert icmp.protocol == "ICMP" and (icmp.icmp_type, icmp.icmp_code) == (8, 0)
    assert gre.protocol == "47" and gre.peers[0].cidr == "10.0.0.0/8"
    np = {"apiVersion": "tortie.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
          "spec": {"egress": [{"action": "Allow"}]}}
    assert res.validate(np)["spec"]["types"] == ["Egress"]
    assert res.kind_of(res.validate(np)).key == "networkpolicy.tortie.io"  # apart from the Kubernetes kind


@pytest.mark.parametrize("change,field", [
    (lambda s: s["ingress"][0].update(action="Reject"), "spec.ingress[0].action"),
    (lambda s: s.update(selector="app ==="), "spec.selector"),
    (lambda s: s.update(order="10"), "spec.order"),
    (lambda s: s.update(order=True), "spec.order"),
    (lambda s: s["ingress"][0]["destination"].update(ports=["90:80"]), "spec.ingress[0].destination.ports[0]"),
    (lambda s: s["ingress"][1].update(icmp={"code": 1}), "spec.ingress[1].icmp.code"),
    (lambda s: s["ingress"][2].update(icmp={"type": 1}), "spec.ingress[2].icmp"),
    (lambda s: s["ingress"][2].update(destination={"ports": [80]}), "spec.ingress[2].destination.ports[0]"),
    (lambda s: s["ingress"][0]["source"].update(ports=[1]), "spec.ingress[0].source.ports"),
    (lambda s: s["ingress"][0]["destination"].update(selector="all()"), "spec.ingress[0].destination.selector"),
    (lambda s: s["ingress"][0]["destination"].update(notPorts=["http"]), "spec.ingress[0].destination.notPorts"),
    (lambda s: s["ingress"][2]["source"].update(selector="all()"), "spec.ingress[2].source.nets"),
    (lambda s: s.update(preDNAT=True), "spec.applyOnForward"),
    (lambda s: s.update(preDNAT=True, applyOnForward=True, egress=[{"action": "Allow"}]), "spec.egress"),
    (lambda s: s.update(doNotTrack=True), "spec.applyOnForward"),
    (lambda s: s.update(doNotTrack=True, preDNAT=True, applyOnForward=True), "spec.preDNAT"),
    (lambda s: s.update(applyOnForward="yes"), "spec.applyOnForward"),
    (lambda s: s.update(types=["Ingress", "Ingress"]), "spec.types"),
    (lambda s: s.update(serviceAccountSelector="x"), "spec.serviceAccountSelector"),
])
def test_refused_in_one_line_naming_the_field(change, field):
    doc = copy.deepcopy(GNP)
    change(doc["spec"])
    with pytest.raises(ValidationError) as e:
        res.validate(doc)
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value), str(e.value)


def test_host_endpoint_and_tier():
    hep = {"apiVersion": "tortie.io/v1", "kind": "HostEndpoint", "metadata": {"name": "h", "labels": {"r": "u"}},
           "spec": {"node": "node1", "interfaceName": "*", "expectedIPs": ["10.99.1.2"]}}
    v = res.HostEndpoint.from_resource(hep)
    assert (v.node, v.interface_name, v.expected_ips) == ("node1", "*", ("10.99.1.2",))
    for change, field in ((lambda s: s.pop("interfaceName"), "spec.interfaceName"),
                          (lambda s: s.update(expectedIPs=["nope"]), "spec.expectedIPs[0]"),
                          (lambda s: s.update(profiles=["p"]), "spec.profiles")):
        doc = copy.deepcopy(hep)
        change(doc["spec"])
        with pytest.raises(ValidationError, match=re.escape(field)):
            res.validate(doc)
    with pytest.raises(ValidationError, match=r"spec\.order"):
        res.validate({"apiVersion": "tortie.io/v1", "kind": "Tier", "metadata": {"name": "t"}, "spec": {"order": "x"}})
