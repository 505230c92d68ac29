"""Issue 9 item 1: `v1 Service` and `discovery.k8s.io/v1 EndpointSlice` through tortiectl,
kept as given after validation. What tortie accepts the API server's own schema accepts
too (kubernetes-validate, strict); bad input is one line naming the field and nothing
stored."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

POOL = {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
        "spec": {"cidr": "10.70.0.0/16"}}
SERVICE = {
    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"type": "LoadBalancer", "selector": {"app": "web", "tier": "front"}, "clusterIP": "10.96.0.10",
             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                       {"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "sig", "port": 3868, "protocol": "SCTP", "targetPort": "diameter"}],
             "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
             "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
             "externalIPs": ["192.0.2.10"]},
    "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}},
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.70.0.5"], "conditions": {"ready": True}, "nodeName": "node1",
                   "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}},
                  {"addresses": ["10.70.1.9"], "conditions": {"ready": False, "serving": True, "terminating": True}}],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}


def _upstream_ok(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _snapshot(etcd) -> dict:
    kvs, _ = etcd.get_prefix(etcd.config.prefix)
    return {kv.key: kv.value for kv in kvs}


def _apply(ctl, *docs: dict) -> tuple[int, str, str]:
    return ctl("apply", "-f", ctl.file(yaml.safe_dump_all(docs)))


def test_service_and_slice_round_trip_as_given(ctl, etcd):
    _upstream_ok(SERVICE)
    _upstream_ok(SLICE)
    ctl.ok("apply", "-f", ctl.file(yaml.safe_dump(POOL)))
    rc, out, err = _apply(ctl, SERVICE, SLICE)
    assert rc == 0, err
    assert "service/shop/web" in out and "endpointslice/shop/web-abc" in out
    svc = ctl.json("get", "service", "web", "-n", "shop")
    assert svc["spec"]["ports"][0]["targetPort"] == 8080 and svc["spec"]["ports"][1]["targetPort"] == 53
    assert svc["status"] == SERVICE["status"]
    assert svc["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 60}}
    eps = ctl.json("get", "endpointslice", "web-abc", "-n", "shop")
    assert eps["endpoints"] == SLICE["endpoints"] and eps["ports"] == SLICE["ports"] and "spec" not in eps
    # what tortie stored and gives back is still what the API server would accept
    for doc in (svc, eps):
        clean = copy.deepcopy(doc)
        clean["metadata"] = {k: v for k, v in clean["metadata"].items()
                             if k in ("name", "namespace", "labels", "annotations")}
        _upstream_ok(clean)
    table = ctl.ok("get", "services", "-A")
    assert "10.96.0.10" in table and "198.51.100.7" in table and "80:30080/TCP" in table
    assert "web-abc" in ctl.ok("get", "eps", "-n", "shop")
    again = _apply(ctl, SERVICE, SLICE)
    assert again[0] == 0 and "unchanged" in again[1], again
    assert "deleted" in ctl.ok("delete", "service", "web", "-n", "shop")
    assert "deleted" in ctl.ok("delete", "endpointslice", "web-abc", "-n", "shop")
    rc, _, err = ctl("get", "service", "web", "-n", "shop")
    assert rc != 0 and "not found" in err


def _svc(**spec) -> dict:
    doc = copy.deepcopy(SERVICE)
    doc.pop("status")
    doc["spec"].update(spec)
    return doc


def _slice(**top) -> dict:
    doc = copy.deepcopy(SLICE)
    doc.update(top)
    return doc


BAD = [
    ("unknown type", _svc(type="Balanced"), "spec.type", False),
    ("port out of range", _svc(ports=[{"port": 70000}]), "spec.ports[0].port", False),
    ("port zero", _svc(ports=[{"port": 0}]), "spec.ports[0].port", False),
    ("node port outside the range", _svc(ports=[{"port": 80, "nodePort": 80}]), "spec.ports[0].nodePort", False),
    ("unknown protocol", _svc(ports=[{"port": 80, "protocol": "ICMP"}]), "spec.ports[0].protocol", False),
    ("selector as a string", _svc(selector="app=web"), "spec.selector", True),
    ("selector with matchLabels", _svc(selector={"matchLabels": {"app": "web"}}), "spec.selector", True),
    ("selector with a bad label value", _svc(selector={"app": "web site"}), "spec.selector", False),
    ("two unnamed ports", _svc(ports=[{"port": 80}, {"port": 81}]), "spec.ports", False),
    ("affinity timeout too long", _svc(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90000}}),
     "timeoutSeconds", False),
    ("Local on a ClusterIP", _svc(type="ClusterIP", externalIPs=None, healthCheckNodePort=None,
                                  ports=[{"port": 80}]), "spec.externalTrafficPolicy", False),
    ("source ranges (not done yet)", _svc(loadBalancerSourceRanges=["10.0.0.0/8"]),
     "spec.loadBalancerSourceRanges", False),
    ("bad cluster IP", _svc(clusterIP="10.96.0.300"), "spec.clusterIP", False),
    ("unknown field", _svc(color="blue"), "spec.color", True),
]


@pytest.mark.parametrize("what,doc,field,upstream_refuses", BAD, ids=[b[0] for b in BAD])
def test_bad_service_is_one_line_and_nothing_stored(ctl, etcd, what, doc, field, upstream_refuses):
    doc = {k: v for k, v in doc.items()}
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    if upstream_refuses:  # the schema alone already says no: we agree with the API server
        with pytest.raises(kubernetes_validate.ValidationError):
            _upstream_ok(doc)
    before = _snapshot(etcd)
    rc, out, err = _apply(ctl, doc)
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("tortiectl: ") and field in err, err
    assert _snapshot(etcd) == before


BAD_SLICES = [
    ("address outside every pool", _slice(endpoints=[{"addresses": ["192.0.2.50"]}]),
     "endpoints[0].addresses[0]"),
    ("address of the wrong family", _slice(endpoints=[{"addresses": ["fd00::1"]}]), "endpoints[0].addresses[0]"),
    ("unknown address type", _slice(addressType="IPX"), "addressType"),
    ("no service-name label", {**_slice(), "metadata": {"name": "x", "namespace": "shop"}}, "metadata.labels"),
    ("port out of range", _slice(ports=[{"port": 99999}]), "ports[0].port"),
]


@pytest.mark.parametrize("what,doc,field", BAD_SLICES, ids=[b[0] for b in BAD_SLICES])
def test_bad_endpoint_slice_is_one_line_and_nothing_stored(ctl, etcd, what, doc, field):
    ctl.ok("apply", "-f", ctl.file(yaml.safe_dump(POOL)))
    before = _snapshot(etcd)
    rc, out, err = _apply(ctl, doc)
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("tortiectl: ") and field in err, err
    assert _snapshot(etcd) == before


def test_slice_may_name_a_node_address(ctl, etcd):
    """A host-network endpoint (the API server's own Service) is a node's address."""
    node = {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "node1"},
            "spec": {"bgp": {"ipv4Address": "192.0.2.50/24"}}}
    ctl.ok("apply", "-f", ctl.file(yaml.safe_dump(node)))
    rc, _, err = _apply(ctl, _slice(endpoints=[{"addresses": ["192.0.2.50"]}]))
    assert rc == 0, err
