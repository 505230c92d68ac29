"""Validation of Kubernetes `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`.

The API server's own rules for the fields tortie's proxy reads (types, port ranges,
protocols, label selectors, traffic policies, affinity), with its defaulting, so a copy
kept in etcd means what it means in a cluster. Fields the proxy cannot honour yet are
refused in one line naming them, never stored and ignored. Whether an EndpointSlice's
addresses lie in a pool is the store's check (`store._check_endpoint_slice`): it needs
the pools.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from tortie.datastore.fields import DNS_SUBDOMAIN, PORT_NAME, Fields, label_map, parse_ip, string
from tortie.errors import ValidationError

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")
# Kubernetes' default --service-node-port-range
NODE_PORT_RANGE = (30000, 32767)
AFFINITY_DEFAULT_TIMEOUT = 10800  # seconds, as Kubernetes defaults it
AFFINITY_MAX_TIMEOUT = 86400
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_SLICE_ENDPOINTS = 1000  # the API server's limit per EndpointSlice


def _target_port(p: Fields, where: str) -> None:
    value = p.raw("targetPort")
    if value is None:
        p.keep("targetPort", p.out["port"])  # defaulted to port, as the API server does
    elif isinstance(value, str):
        if value.isdigit():  # "8080": an IntOrString given as string
            p.obj = {**p.obj, "targetPort": int(value)}
            p.int("targetPort", 1, 65535)
        else:
            p.str("targetPort", pattern=PORT_NAME)
    else:
        p.int("targetPort", 1, 65535)


def service_spec(f: Fields, meta: dict) -> None:
    kind = f.str("type", default="ClusterIP", choices=SERVICE_TYPES)
    ports: list[dict] = []

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("name", pattern=PORT_NAME)
        p.str("protocol", default="TCP", choices=PROTOCOLS)
        p.int("port", 1, 65535, required=True)
        _target_port(p, where)
        node_port = p.int("nodePort", *NODE_PORT_RANGE)
        if node_port is not None and kind not in ("NodePort", "LoadBalancer"):
            raise ValidationError(f"only type NodePort or LoadBalancer may have one (type is {kind})",
                                  field=f"{where}.nodePort")
        p.str("appProtocol", max_len=253)
        out = p.done()
        ports.append(out)
        return out

    f.list("ports", port)
    if kind != "ExternalName" and not ports:
        raise ValidationError("must name at least one port", field="spec.ports")
    if len(ports) > 1 and any("name" not in p for p in ports):
        raise ValidationError("every port needs a name when there are several", field="spec.ports")
    seen: set = set()
    for i, p in enumerate(ports):
        for key, what in (((p["port"], p["protocol"]), "port and protocol"), (p.get("name"), "name")):
            if key is None:
                continue
            if (what, key) in seen:
                raise ValidationError(f"repeats the {what} of another port", field=f"spec.ports[{i}]")
            seen.add((what, key))
    node_ports = [(p["nodePort"], p["protocol"]) for p in ports if "nodePort" in p]
    if len(set(node_ports)) != len(node_ports):
        raise ValidationError("two ports have the same nodePort and protocol", field="spec.ports")

    if f.raw("selector") is not None:
        f.keep("selector", label_map(f.raw("selector"), "spec.selector"))

    def ip(v: Any, where: str) -> str:
        return str(parse_ip(string(v, where), where))

    cluster_ips = f.list("clusterIPs", lambda v, where: v if v == "None" else ip(v, where))
    cluster_ip = f.raw("clusterIP")
    if cluster_ip is not None and cluster_ip not in ("None", ""):
        f.ip("clusterIP")
    elif cluster_ip == "None":
        f.keep("clusterIP", "None")
        if kind != "ClusterIP":
            raise ValidationError(f"headless (None) is only for type ClusterIP (type is {kind})",
                                  field="spec.clusterIP")
    if cluster_ips and f.out.get("clusterIP") not in (None, cluster_ips[0]):
        raise ValidationError("must equal clusterIPs[0]", field="spec.clusterIP")
    if cluster_ips and "clusterIP" not in f.out:
        f.keep("clusterIP", cluster_ips[0])
    if cluster_ips and len({ipaddress.ip_address(a).version for a in cluster_ips if a != "None"}) < \
            len([a for a in cluster_ips if a != "None"]):
        raise ValidationError("may hold one address per family", field="spec.clusterIPs")
    # ipFamilies/ipFamilyPolicy, publishNotReadyAddresses and allocateLoadBalancerNodePorts
    # steer the API server's allocation and the EndpointSlice controller; the proxy follows
    # their results (clusterIPs, nodePorts, the slices' conditions), as kube-proxy does
    f.list("ipFamilies", lambda v, where: _choice(v, where, ("IPv4", "IPv6")))
    f.str("ipFamilyPolicy", choices=("SingleStack", "PreferDualStack", "RequireDualStack"))
    f.list("externalIPs", ip)
    lb_ip = f.ip("loadBalancerIP")
    f.str("loadBalancerClass", max_len=316)
    external = kind in ("NodePort", "LoadBalancer")
    etp = f.str("externalTrafficPolicy", choices=("Cluster", "Local"))
    if etp is None and (external or f.raw("externalIPs")):
        f.keep("externalTrafficPolicy", "Cluster")
    elif etp is not None and not (external or f.raw("externalIPs")):
        raise ValidationError(f"applies to NodePort, LoadBalancer or externalIPs only (type is {kind})",
                              field="spec.externalTrafficPolicy")
    f.str("internalTrafficPolicy", choices=("Cluster", "Local"),
          default="Cluster" if kind != "ExternalName" else None)
    hc = f.int("healthCheckNodePort", *NODE_PORT_RANGE)
    if hc is not None and (kind != "LoadBalancer" or etp != "Local"):
        raise ValidationError("only a LoadBalancer with externalTrafficPolicy Local has one",
                              field="spec.healthCheckNodePort")
    if lb_ip is not None and kind != "LoadBalancer":
        raise ValidationError(f"only type LoadBalancer has one (type is {kind})", field="spec.loadBalancerIP")
    affinity = f.str("sessionAffinity", default="None", choices=("None", "ClientIP"))

    def affinity_config(c: Fields) -> None:
        def client_ip(ci: Fields) -> None:
            ci.int("timeoutSeconds", 1, AFFINITY_MAX_TIMEOUT, default=AFFINITY_DEFAULT_TIMEOUT)
        c.obj_field("clientIP", client_ip)

    f.obj_field("sessionAffinityConfig", affinity_config)
    if affinity == "ClientIP" and "sessionAffinityConfig" not in f.out:
        f.keep("sessionAffinityConfig", {"clientIP": {"timeoutSeconds": AFFINITY_DEFAULT_TIMEOUT}})
    elif affinity == "None" and f.raw("sessionAffinityConfig") is not None:
        raise ValidationError("needs sessionAffinity ClientIP", field="spec.sessionAffinityConfig")
    f.bool("publishNotReadyAddresses")
    f.bool("allocateLoadBalancerNodePorts")
    if kind == "ExternalName":
        f.str("externalName", required=True, pattern=DNS_SUBDOMAIN, max_len=253)
    # Not done by tortie's proxy yet: refused rather than stored and ignored.
    for name in ("loadBalancerSourceRanges", "trafficDistribution"):
        if f.raw(name) is not None:
            raise ValidationError("is not supported yet by tortie's proxy", field=f"spec.{name}")


def service_status(status: Any) -> dict | None:
    """`status.loadBalancer.ingress`: the addresses a Service of type LoadBalancer was given."""
    if status is None:
        return None
    s = Fields(status, "status")

    def lb(b: Fields) -> None:
        def ingress(v: Any, where: str) -> dict:
            i = Fields(v, where)
            i.ip("ip")
            i.str("hostname", pattern=DNS_SUBDOMAIN)
            i.str("ipMode", choices=("VIP", "Proxy"))
            i.list("ports", lambda v, w: v)  # informational (port status), as the API keeps it
            return i.done()
        b.list("ingress", ingress)

    s.obj_field("loadBalancer", lb)
    s.list("conditions", lambda v, w: v)
    return s.done() or None


def _choice(v: Any, where: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValidationError(f"must be one of {', '.join(choices)}", field=where)
    return v


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_TARGET_KEYS = frozenset(("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"))
_CONDITION_KEYS = frozenset(("ready", "serving", "terminating"))
_PLAIN_KEYS = frozenset(("addresses", "conditions", "nodeName", "targetRef", "hostname", "zone"))


def _plain_endpoint(v: Any, version: int) -> dict | None:
    """The common endpoint, checked fast (a slice holds up to 1,000 and a node reads them
    all on start): exactly what the full check below would return, or None to run it
    (anything unusual, and every error, goes the slow way, which names the field)."""
    if not isinstance(v, dict) or not v.keys() <= _PLAIN_KEYS:
        return None
    addrs = v.get("addresses")
    if not isinstance(addrs, list) or not 1 <= len(addrs) <= 100:
        return None
    af = _AF[version]
    for a in addrs:
        try:  # canonical text only: what ipaddress would write back
            if not isinstance(a, str) or socket.inet_ntop(af, socket.inet_pton(af, a)) != a:
                return None
        except OSError:
            return None
    out: dict[str, Any] = {"addresses": list(addrs)}
    for name, keys, kind in (("conditions", _CONDITION_KEYS, bool), ("targetRef", _TARGET_KEYS, str)):
        sub = v.get(name)
        if sub is None:
            continue
        if not isinstance(sub, dict) or not sub.keys() <= keys or not all(isinstance(x, kind) for x in sub.values()):
            return None
        out[name] = dict(sub)
    for name, limit in (("nodeName", 253), ("hostname", 63), ("zone", 253)):
        x = v.get(name)
        if x is None:
            continue
        if not isinstance(x, str) or len(x) > limit or (name == "nodeName" and not DNS_SUBDOMAIN.fullmatch(x)):
            return None
        out[name] = x
    return out


def endpoint_slice_body(resource: dict, meta: dict) -> dict:
    """The top-level fields of an EndpointSlice (it has no spec): addressType, endpoints, ports."""
    f = Fields({k: v for k, v in resource.items() if k in ("addressType", "endpoints", "ports")}, "")
    family = f.str("addressType", required=True, choices=("IPv4", "IPv6", "FQDN"))
    if family == "FQDN":
        raise ValidationError("FQDN endpoints are not supported by tortie's proxy (nor kube-proxy's)",
                              field="addressType")
    version = 4 if family == "IPv4" else 6
    if SERVICE_NAME_LABEL not in (meta.get("labels") or {}):
        raise ValidationError(f"needs the label {SERVICE_NAME_LABEL} naming its Service", field="metadata.labels")

    def endpoint(v: Any, where: str) -> dict:
        fast = _plain_endpoint(v, version)
        if fast is not None:
            return fast
        e = Fields(v, where)
        addrs = e.list("addresses", lambda a, w: str(parse_ip(string(a, w), w, version)), required=True)
        if not 1 <= len(addrs) <= 100:
            raise ValidationError("must hold 1 to 100 addresses", field=f"{where}.addresses")

        def conditions(c: Fields) -> None:
            for name in ("ready", "serving", "terminating"):
                c.bool(name)

        e.obj_field("conditions", conditions)
        e.str("hostname", max_len=63)
        e.str("nodeName", pattern=DNS_SUBDOMAIN, max_len=253)
        e.str("zone", max_len=253)

        def target(t: Fields) -> None:
            for name in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"):
                t.str(name)

        e.obj_field("targetRef", target)
        if e.raw("deprecatedTopology") is not None:
            e.keep("deprecatedTopology", label_map(e.raw("deprecatedTopology"), f"{where}.deprecatedTopology",
                                                   values_too=False))
        e.obj_field("hints", lambda h: h.list("forZones", lambda z, w: z))
        return e.done()

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("name", max_len=63)  # "" for the unnamed port of a one-port Service
        p.str("protocol", default="TCP", choices=PROTOCOLS)
        p.int("port", 1, 65535)
        p.str("appProtocol", max_len=253)
        return p.done()

    endpoints = f.list("endpoints", endpoint)
    if endpoints is None:
        f.keep("endpoints", [])
    elif len(endpoints) > MAX_SLICE_ENDPOINTS:
        raise ValidationError(f"at most {MAX_SLICE_ENDPOINTS} endpoints", field="endpoints")
    f.list("ports", port)
    return f.done()


__all__ = ["NODE_PORT_RANGE", "PROTOCOLS", "SERVICE_NAME_LABEL", "SERVICE_TYPES", "endpoint_slice_body",
           "service_spec", "service_status"]
