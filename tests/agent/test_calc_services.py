"""The Services part of the calculation: after any sequence of Service and EndpointSlice
events, the messages taken so far, folded, equal a fresh recompute (`svc_model.proxy_state`),
and the choice of backends follows kube-proxy's rules."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.agent.calc import Calculation
from tortie.agent.calc_desired import desired
from tortie.datastore import keys
from tortie.policy.svc_model import HealthCheckUpdate, ServicePortUpdate, health_checks, proxy_state

PREFIX = "/tortie/"
NODE = "node1"


def _svc_key(ns, name):
    return PREFIX + keys.resource_key("service", name, ns)


def _slice_key(ns, name):
    return PREFIX + keys.resource_key("endpointslice", name, ns)


def service(name, ns="shop", *, etp=None, itp="Cluster", kind="LoadBalancer", affinity=False, hc=None,
            cluster_ip="10.96.0.10", ports=((80, "TCP"),)) -> dict:
    spec = {"type": kind, "selector": {"app": name}, "clusterIP": cluster_ip, "internalTrafficPolicy": itp,
            "ports": [{"name": f"p{i}", "port": p, "protocol": proto, "targetPort": 8000 + i,
                       **({"nodePort": 30000 + i} if kind != "ClusterIP" else {})}
                      for i, (p, proto) in enumerate(ports)]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if hc:
        spec["healthCheckNodePort"] = hc
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name, svc, eps, ns="shop", nports=1) -> dict:
    """eps: (address, node, ready, serving, terminating)"""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "nodeName": n,
                           "conditions": {"ready": r, "serving": s, "terminating": t}} for a, n, r, s, t in eps],
            "ports": [{"name": f"p{i}", "port": 8000 + i, "protocol": "TCP"} for i in range(nports)]}


def _fold(calc: Calculation, emitted: dict, health: dict) -> None:
    for m in calc.take_messages():
        if isinstance(m, ServicePortUpdate):
            if m.state is None:
                emitted.pop(m.key, None)
            else:
                emitted[m.key] = m.state
        elif isinstance(m, HealthCheckUpdate):
            if m.local_endpoints is None:
                health.pop(m.port, None)
            else:
                health[m.port] = (m.service, m.local_endpoints)


def _reference(calc: Calculation) -> tuple[dict, dict]:
    st_ = calc.state
    want_health: dict = {}
    by = {}
    for (ns, _), s in st_.slices.items():
        by.setdefault((ns, s.service), []).append(s)
    for k, svc in st_.services.items():
        want_health.update(health_checks(svc, by.get(k, ()), NODE))
    return proxy_state(st_.services, st_.slices, NODE), want_health


def test_backend_choice_follows_kube_proxy():
    calc = Calculation(NODE, prefix=PREFIX)
    calc.on_snapshot({})
    calc.take_messages()
    calc.on_update(_svc_key("shop", "web"), json.dumps(service("web", etp="Local", hc=31000)).encode())
    eps = [("10.65.0.1", NODE, True, True, False), ("10.65.1.1", "node2", True, True, False),
           ("10.65.0.2", NODE, False, True, True)]  # terminating, still serving
    calc.on_update(_slice_key("shop", "web-1"), json.dumps(endpoint_slice("web-1", "web", eps)).encode())
    emitted, health = {}, {}
    _fold(calc, emitted, health)
    st_ = emitted["shop/web/tcp/80/v4"]
    assert [b.address for b in st_.cluster_backends] == ["10.65.0.1", "10.65.1.1"]  # ready ones only
    assert [b.address for b in st_.external_backends] == ["10.65.0.1"]  # Local: this node's
    assert st_.node_port == 30000 and st_.external_local
    assert health == {31000: ("shop/web", 1)}
    # the ready ones go: the terminating one that still serves is used (no ready one left)
    eps2 = [("10.65.0.2", NODE, False, True, True), ("10.65.1.2", "node2", False, False, True)]
    calc.on_update(_slice_key("shop", "web-1"), json.dumps(endpoint_slice("web-1", "web", eps2)).encode())
    _fold(calc, emitted, health)
    st_ = emitted["shop/web/tcp/80/v4"]
    assert [b.address for b in st_.cluster_backends] == ["10.65.0.2"]
    assert health == {31000: ("shop/web", 0)}  # only ready endpoints count for the health check
    calc.on_update(_svc_key("shop", "web"), None)
    _fold(calc, emitted, health)
    assert emitted == {} and health == {}
    # internalTrafficPolicy Local, the only endpoint elsewhere: none here, but not "no endpoints"
    calc.on_update(_svc_key("shop", "web"), json.dumps(service("web", itp="Local", kind="ClusterIP")).encode())
    calc.on_update(_slice_key("shop", "web-1"), json.dumps(endpoint_slice(
        "web-1", "web", [("10.65.1.1", "node2", True, True, False)])).encode())
    _fold(calc, emitted, health)
    st_ = emitted["shop/web/tcp/80/v4"]
    assert st_.cluster_backends == () and st_.elsewhere and st_.has_endpoints


SERVICES = st.sampled_from(["web", "db"])
EPS = st.lists(st.tuples(st.sampled_from(["10.65.0.1", "10.65.0.2", "10.65.1.1"]),
                         st.sampled_from([NODE, "node2"]), st.booleans(), st.booleans(), st.booleans()),
               max_size=3)
EVENTS = st.one_of(
    st.tuples(st.just("svc"), SERVICES, st.sampled_from([None, "Cluster", "Local"]),
              st.sampled_from(["Cluster", "Local"]), st.booleans(), st.sampled_from([1, 2])),
    st.tuples(st.just("svc-del"), SERVICES),
    st.tuples(st.just("slice"), st.sampled_from(["s1", "s2", "s3"]), SERVICES, EPS, st.sampled_from([1, 2])),
    st.tuples(st.just("slice-del"), st.sampled_from(["s1", "s2", "s3"])),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("ranges"), st.booleans(), st.booleans()),
)


def bgp_config(clusters: bool, lbs: bool) -> dict:
    spec = {}
    if clusters:
        spec["serviceClusterIPs"] = [{"cidr": "10.96.0.0/16"}]
    if lbs:
        spec["serviceLoadBalancerIPs"] = [{"cidr": "10.97.0.0/24"}]
    return {"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": spec}


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENTS, max_size=12))
def test_incremental_equals_recompute(events):
    calc = Calculation(NODE, prefix=PREFIX)
    calc.on_snapshot({})
    emitted, health = {}, {}
    store: dict[str, bytes] = {}

    def put(key, value):
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
        calc.on_update(key, value)

    for ev in events:
        if ev[0] == "svc":
            _, name, etp, itp, aff, nports = ev
            doc = service(name, etp=etp, itp=itp, affinity=aff, hc=31000 + (name == "db") if etp == "Local" else None,
                          cluster_ip="10.96.0.10" if name == "web" else "10.96.0.11",
                          ports=((80, "TCP"), (81, "TCP"))[:nports], kind="LoadBalancer" if etp else "ClusterIP")
            put(_svc_key("shop", name), json.dumps(doc).encode())
        elif ev[0] == "svc-del":
            put(_svc_key("shop", ev[1]), None)
        elif ev[0] == "slice":
            _, sname, svc, eps, nports = ev
            put(_slice_key("shop", sname), json.dumps(endpoint_slice(sname, svc, eps, nports=nports)).encode())
        elif ev[0] == "slice-del":
            put(_slice_key("shop", ev[1]), None)
        elif ev[0] == "ranges":
            put(PREFIX + keys.resource_key("bgpconfiguration", "default"), json.dumps(bgp_config(*ev[1:])).encode())
        else:
            calc.on_snapshot(dict(store))
        _fold(calc, emitted, health)
        want, want_health = _reference(calc)
        assert emitted == want
        assert health == want_health
        assert calc.exports == desired(calc.state, NODE).exports


def test_local_service_announced_only_where_it_has_a_ready_endpoint():
    calc = Calculation(NODE, prefix=PREFIX)
    calc.on_snapshot({PREFIX + keys.resource_key("bgpconfiguration", "default"):
                      json.dumps(bgp_config(True, True)).encode()})
    assert {"10.96.0.0/16", "10.97.0.0/24"} <= calc.exports
    doc = service("web", etp="Local", hc=31000)
    doc["status"] = {"loadBalancer": {"ingress": [{"ip": "10.97.0.5"}]}}
    calc.on_update(_svc_key("shop", "web"), json.dumps(doc).encode())
    assert "10.97.0.5/32" not in calc.exports
    eps = [("10.65.0.1", NODE, True, True, False)]
    calc.on_update(_slice_key("shop", "w1"), json.dumps(endpoint_slice("w1", "web", eps)).encode())
    assert {"10.97.0.5/32", "10.96.0.10/32"} <= calc.exports
    eps = [("10.65.0.1", "node2", True, True, False)]
    calc.on_update(_slice_key("shop", "w1"), json.dumps(endpoint_slice("w1", "web", eps)).encode())
    assert "10.97.0.5/32" not in calc.exports and "10.97.0.0/24" in calc.exports
