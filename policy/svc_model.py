"""What this node's Service proxy serves, computed from Services and EndpointSlices (pure).

One `ServicePortState` per (Service, port, address family): the addresses it answers on
(cluster IPs; external IPs and load-balancer IPs; the node port on every node address)
and the backends of its two kinds of traffic, chosen as kube-proxy chooses them
(`CategorizeEndpoints`): ready endpoints, else -- when none is ready -- the serving ones
that are terminating; `internalTrafficPolicy: Local` keeps only this node's for traffic
from inside the cluster, `externalTrafficPolicy: Local` only this node's for traffic from
outside (whose source address is then kept).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tortie.datastore.views_service import EndpointSlice, Service, ServicePort


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    local: bool = False  # on this node


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """One port of one Service in one address family, as this node serves it."""

    key: str  # "namespace/name/proto/port/v4"
    family: int
    protocol: str  # tcp, udp, sctp (as nft writes it)
    port: int
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()  # spec.externalIPs and status.loadBalancer.ingress
    node_port: int | None = None
    cluster_backends: tuple[Backend, ...] = ()  # traffic from inside the cluster
    external_backends: tuple[Backend, ...] = ()  # traffic from outside (to external IPs, node ports)
    external_local: bool = False  # externalTrafficPolicy Local: source kept, local backends only
    affinity: int = 0  # sessionAffinity ClientIP timeout in seconds; 0: none
    # usable endpoints on other nodes that a Local policy keeps this node from using: its
    # traffic is then dropped ("no local endpoints"), not refused as for a Service with none
    elsewhere: bool = False

    @property
    def has_endpoints(self) -> bool:
        return bool(self.cluster_backends or self.external_backends or self.elsewhere)


@dataclass(frozen=True, slots=True)
class ServicePortUpdate:
    """A Service port for the proxy; None: this node no longer serves it."""

    key: str
    state: ServicePortState | None


@dataclass(frozen=True, slots=True)
class ProxyConfigUpdate:
    """The pools' CIDRs: traffic from them is a pod's (short-cut to the cluster path)."""

    pod_cidrs: frozenset[str]


@dataclass(frozen=True, slots=True)
class HealthCheckUpdate:
    """A `healthCheckNodePort` and the Service's ready local endpoints on this node; None: gone."""

    port: int
    service: str  # namespace/name
    local_endpoints: int | None


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _pick(candidates: list[tuple[Backend, bool, bool]]) -> tuple[Backend, ...]:
    """Ready ones; if none, the serving terminating ones (kube-proxy's fallback)."""
    ready = [b for b, r, _ in candidates if r]
    if ready:
        return tuple(sorted(set(ready), key=lambda b: (b.address, b.port)))
    return tuple(sorted({b for b, r, s in candidates if s}, key=lambda b: (b.address, b.port)))


def _target(sp: ServicePort, slice_: EndpointSlice) -> int | None:
    for p in slice_.ports:
        if p.name == sp.name and p.protocol == sp.protocol and p.port is not None:
            return p.port
    return None


def service_ports(svc: Service, slices: Iterable[EndpointSlice], node: str) -> dict[str, ServicePortState]:
    """Every ServicePortState of one Service on this node (`slices`: its EndpointSlices)."""
    if svc.type == "ExternalName":
        return {}
    slices = list(slices)
    families = {_family(a) for a in svc.cluster_ips} or {s.family for s in slices}
    external = svc.external_ips + svc.load_balancer_ips
    out: dict[str, ServicePortState] = {}
    for sp in svc.ports:
        for family in sorted(families):
            cands: list[tuple[Backend, bool, bool]] = []  # (backend, ready, serving-and-terminating)
            for s in slices:
                port = _target(sp, s)
                if s.family != family or port is None:
                    continue
                for e in s.endpoints:
                    b = Backend(e.addresses[0], port, e.node == node)
                    cands.append((b, e.ready and not e.terminating, e.serving and e.terminating))
            local = [c for c in cands if c[0].local]
            key = f"{svc.namespace}/{svc.name}/{sp.protocol.lower()}/{sp.port}/v{family}"
            out[key] = ServicePortState(
                key=key, family=family, protocol=sp.protocol.lower(), port=sp.port,
                cluster_ips=tuple(a for a in svc.cluster_ips if _family(a) == family),
                external_ips=tuple(sorted({a for a in external if _family(a) == family})),
                node_port=sp.node_port if svc.type in ("NodePort", "LoadBalancer") else None,
                cluster_backends=_pick(local if svc.internal_local else cands),
                external_backends=_pick(local if svc.external_local else cands),
                external_local=svc.external_local, affinity=svc.affinity_timeout,
                elsewhere=bool(_pick(cands)))
    return out


def health_checks(svc: Service, slices: Iterable[EndpointSlice], node: str) -> dict[int, tuple[str, int]]:
    """healthCheckNodePort -> (Service, its ready endpoints on this node), as kube-proxy serves it."""
    if svc.health_check_node_port is None or not svc.external_local:
        return {}
    count = len({e.addresses[0] for s in slices for e in s.endpoints
                 if e.node == node and e.ready and not e.terminating})
    return {svc.health_check_node_port: (f"{svc.namespace}/{svc.name}", count)}


def slices_by_service(slices: Mapping[tuple[str, str], EndpointSlice]) -> dict[tuple[str, str], list[EndpointSlice]]:
    out: dict[tuple[str, str], list[EndpointSlice]] = {}
    for (ns, _), s in slices.items():
        out.setdefault((ns, s.service), []).append(s)
    return out


def proxy_state(services: Mapping[tuple[str, str], Service], slices: Mapping[tuple[str, str], EndpointSlice],
                node: str) -> dict[str, ServicePortState]:
    """Everything this node's proxy serves (the reference the incremental path must equal)."""
    by_svc = slices_by_service(slices)
    out: dict[str, ServicePortState] = {}
    for k, svc in services.items():
        out.update(service_ports(svc, by_svc.get(k, ()), node))
    return out


__all__ = ["Backend", "HealthCheckUpdate", "ProxyConfigUpdate", "ServicePortState", "ServicePortUpdate",
           "health_checks", "proxy_state", "service_ports", "slices_by_service"]
