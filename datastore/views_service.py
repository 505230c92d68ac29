"""Typed views of Services and EndpointSlices, for the proxy's calculation.

`Service.from_resource(d)` and `EndpointSlice.from_resource(d)` validate (see
`datastore.kinds_service`) and return frozen, hashable views. An EndpointSlice has no
spec, so it reads its own top-level fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from tortie.datastore.kinds_service import SERVICE_NAME_LABEL
from tortie.datastore.views import VIEWS, FrozenLabels, View


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for the one unnamed port
    protocol: str  # TCP, UDP or SCTP
    port: int
    target_port: int | str  # a number, or a container port's name
    node_port: int | None = None


@dataclass(frozen=True)
class Service(View):
    KIND: ClassVar[str] = "Service"
    namespace: str = "default"
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()  # empty: headless or not allocated (no ClusterIP dataplane)
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    load_balancer_ip: str | None = None  # spec.loadBalancerIP: what the user asked for
    load_balancer_class: str | None = None
    ports: tuple[ServicePort, ...] = ()
    selector: Mapping[str, str] | None = None
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int | None = None
    affinity_timeout: int = 0  # sessionAffinity ClientIP: seconds; 0: none

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_resource(cls, resource: Mapping):
        res = cls.checked(resource)
        meta, s = res["metadata"], res["spec"]
        ingress = ((res.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
        cluster_ips = [a for a in s.get("clusterIPs") or ([s["clusterIP"]] if s.get("clusterIP") else [])
                       if a != "None"]
        return cls(
            name=meta["name"], labels=FrozenLabels(meta.get("labels", {})),
            resource_version=int(meta.get("resourceVersion", 0)), namespace=meta["namespace"],
            type=s["type"], cluster_ips=tuple(cluster_ips) if s["type"] != "ExternalName" else (),
            external_ips=tuple(s.get("externalIPs", ())),
            load_balancer_ips=tuple(i["ip"] for i in ingress if i.get("ip")) if s["type"] == "LoadBalancer" else (),
            load_balancer_ip=s.get("loadBalancerIP"), load_balancer_class=s.get("loadBalancerClass"),
            ports=tuple(ServicePort(p.get("name", ""), p["protocol"], p["port"], p["targetPort"], p.get("nodePort"))
                        for p in s.get("ports", ())),
            selector=FrozenLabels(s["selector"]) if s.get("selector") is not None else None,
            external_local=s.get("externalTrafficPolicy") == "Local",
            internal_local=s.get("internalTrafficPolicy") == "Local",
            health_check_node_port=s.get("healthCheckNodePort"),
            affinity_timeout=(s["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
                              if s.get("sessionAffinity") == "ClientIP" else 0),
        )


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True  # unset means ready, as kube-proxy reads it
    serving: bool = True
    terminating: bool = False
    node: str | None = None
    target: str | None = None  # "namespace/name" of the pod


@dataclass(frozen=True)
class SlicePort:
    name: str
    protocol: str
    port: int | None


@dataclass(frozen=True)
class EndpointSlice(View):
    KIND: ClassVar[str] = "EndpointSlice"
    namespace: str = "default"
    service: str = ""  # the Service's name (label kubernetes.io/service-name)
    family: int = 4
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[SlicePort, ...] = ()

    @classmethod
    def from_resource(cls, resource: Mapping):
        res = cls.checked(resource)
        meta = res["metadata"]

        def endpoint(e: dict) -> Endpoint:
            c = e.get("conditions") or {}
            ready = c.get("ready", True) is not False
            ref = e.get("targetRef") or {}
            return Endpoint(tuple(e["addresses"]), ready=ready,
                            serving=c["serving"] if c.get("serving") is not None else ready,
                            terminating=bool(c.get("terminating")), node=e.get("nodeName"),
                            target=f"{ref.get('namespace') or meta['namespace']}/{ref['name']}"
                            if ref.get("name") else None)

        return cls(
            name=meta["name"], labels=FrozenLabels(meta.get("labels", {})),
            resource_version=int(meta.get("resourceVersion", 0)), namespace=meta["namespace"],
            service=meta["labels"][SERVICE_NAME_LABEL], family=4 if res["addressType"] == "IPv4" else 6,
            endpoints=tuple(endpoint(e) for e in res.get("endpoints", ())),
            ports=tuple(SlicePort(p.get("name", ""), p["protocol"], p.get("port")) for p in res.get("ports") or ()),
        )


__all__ = ["Endpoint", "EndpointSlice", "Service", "ServicePort", "SlicePort"]

VIEWS.update({"service": Service, "endpointslice": EndpointSlice})
