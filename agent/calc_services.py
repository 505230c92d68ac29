"""The Services part of the calculation (pure, no I/O): what this node's proxy serves.

Indexes the EndpointSlices by their Service, so a Service or slice event recomputes that
one Service (`svc_model.service_ports`) and emits only the ports that changed:
`ServicePortUpdate`s, `HealthCheckUpdate`s (healthCheckNodePort -> ready local endpoints)
and, when the pools change, `ProxyConfigUpdate`. `recompute()` diffs a whole
`svc_model.proxy_state` against what was emitted (snapshots); the property test holds that
the incremental path and the recompute agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tortie.agent.state import ClusterState
from tortie.bgp.messages import ExportPolicy
from tortie.datastore import resources as res
from tortie.policy.svc_model import (
    HealthCheckUpdate,
    ProxyConfigUpdate,
    ServicePortState,
    ServicePortUpdate,
    health_checks,
    service_ports,
    slices_by_service,
)

Key = tuple[str, str]  # (namespace, name)


def _ranges(state: ClusterState, node: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The BGPConfiguration's (cluster IP, external IP, load-balancer IP) CIDRs for this node."""
    conf = state.bgp_config(node)
    return conf.service_cluster_ips, conf.service_external_ips, conf.service_load_balancer_ips


def _inside(address: str, cidrs: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c) for c in cidrs)


def _host(address: str) -> str:
    return f"{address}/{32 if ipaddress.ip_address(address).version == 4 else 128}"


def local_service_exports(svc: res.Service, slices: Iterable[res.EndpointSlice], node: str,
                          ranges: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> frozenset[str]:
    """Calico's rule for `externalTrafficPolicy: Local`: its cluster IP, external IPs and
    load-balancer IPs (those inside the configured ranges) as /32 (/128), from the nodes that
    hold a ready endpoint of it only, so the routers' ECMP sends its flows to those nodes."""
    if not svc.external_local or not any(e.node == node and e.ready and not e.terminating
                                         for s in slices for e in s.endpoints):
        return frozenset()
    clusters, externals, lbs = ranges
    return frozenset(_host(a) for addrs, cidrs in ((svc.cluster_ips, clusters), (svc.external_ips, externals),
                                                    (svc.load_balancer_ips, lbs))
                     for a in addrs if _inside(a, cidrs))


def service_exports(state: ClusterState, node: str) -> set[str]:
    """What this node announces for Services: every configured range (each node), and the
    /32s of Local Services it has ready endpoints of. The reference for the incremental path."""
    ranges = _ranges(state, node)
    out = {str(ipaddress.ip_network(c)) for group in ranges for c in group}
    by_svc = slices_by_service(state.slices)
    for k, svc in state.services.items():
        out |= local_service_exports(svc, by_svc.get(k, ()), node, ranges)
    return out


def service_export_policies(state: ClusterState, node: str, peers: Iterable) -> tuple[ExportPolicy, ...]:
    """Service addresses go to the external peers (the routers) only: other nodes serve the
    same Services themselves and must not route them to us."""
    external = frozenset(p.address for p in peers if p.external)
    return tuple(ExportPolicy(str(ipaddress.ip_network(c)), external) for group in _ranges(state, node)
                 for c in group)


class ServiceCalculator:
    def __init__(self, node: str, state: ClusterState) -> None:
        self.node, self.state = node, state
        self.services, self.slices, self.pools = state.services, state.slices, state.pools
        self._slices_of: dict[Key, set[Key]] = {}  # (ns, service) -> its slices' keys
        self.emitted: dict[str, ServicePortState] = {}
        self._ports_of: dict[Key, set[str]] = {}  # (ns, service) -> its emitted port keys
        self.health: dict[int, tuple[str, int]] = {}  # emitted health check node ports
        self._health_of: dict[Key, set[int]] = {}
        self._pod_cidrs: frozenset[str] | None = None
        self._out: list = []
        # announcements: the configured ranges, and per Local Service the /32s it earns here
        self._ranges: tuple = ((), (), ())
        self._local_exports: dict[Key, frozenset[str]] = {}
        self.exports: frozenset[str] = frozenset()

    # -- events ------------------------------------------------------------------------------
    def on_service(self, namespace: str, name: str) -> None:
        self._refresh((namespace, name))

    def on_slice(self, namespace: str, name: str, old: res.EndpointSlice | None,
                 new: res.EndpointSlice | None) -> None:
        for s in (old, new):
            if s is not None:
                self._slices_of.setdefault((namespace, s.service), set()).discard((namespace, name))
        if new is not None:
            self._slices_of[(namespace, new.service)].add((namespace, name))
        for svc in {s.service for s in (old, new) if s is not None}:
            if not self._slices_of.get((namespace, svc)):
                self._slices_of.pop((namespace, svc), None)
            self._refresh((namespace, svc))

    def on_bgp_config(self) -> None:
        """The BGPConfigurations changed: the ranges (and which /32s fall inside them)."""
        ranges = _ranges(self.state, self.node)
        if ranges != self._ranges:
            self._ranges = ranges
            for key in list(self._local_exports) + [k for k, s in self.services.items() if s.external_local]:
                self._refresh(key)
            self._update_exports()

    def _update_exports(self) -> None:
        ranges = {str(ipaddress.ip_network(c)) for group in self._ranges for c in group}
        self.exports = frozenset(ranges.union(*self._local_exports.values()))

    def on_pools(self) -> None:
        cidrs = frozenset(str(p.network) for p in self.pools.values() if p.for_workloads)
        if cidrs != self._pod_cidrs:
            self._pod_cidrs = cidrs
            self._out.append(ProxyConfigUpdate(cidrs))

    def recompute(self) -> None:
        self._ranges = _ranges(self.state, self.node)
        self._slices_of = {}
        for (ns, svc), items in slices_by_service(self.slices).items():
            self._slices_of[(ns, svc)] = {(ns, s.name) for s in items}
        for key in set(self._ports_of) | set(self.services) | set(self._health_of) | set(self._local_exports):
            self._refresh(key)
        self.on_pools()
        self._update_exports()

    def take(self) -> list:
        out, self._out = self._out, []
        return out

    # -- internals ----------------------------------------------------------------------------
    def _refresh(self, key: Key) -> None:
        svc = self.services.get(key)
        slices = [self.slices[k] for k in sorted(self._slices_of.get(key, ())) if k in self.slices]
        want = service_ports(svc, slices, self.node) if svc is not None else {}
        for k in self._ports_of.pop(key, set()) - want.keys():
            del self.emitted[k]
            self._out.append(ServicePortUpdate(k, None))
        for k, st in want.items():
            if self.emitted.get(k) != st:
                self.emitted[k] = st
                self._out.append(ServicePortUpdate(k, st))
        if want:
            self._ports_of[key] = set(want)
        checks = health_checks(svc, slices, self.node) if svc is not None else {}
        for port in self._health_of.pop(key, set()) - checks.keys():
            del self.health[port]
            self._out.append(HealthCheckUpdate(port, f"{key[0]}/{key[1]}", None))
        for port, (ref, count) in checks.items():
            if self.health.get(port) != (ref, count):
                self.health[port] = (ref, count)
                self._out.append(HealthCheckUpdate(port, ref, count))
        if checks:
            self._health_of[key] = set(checks)
        exports = local_service_exports(svc, slices, self.node, self._ranges) if svc is not None else frozenset()
        if exports != self._local_exports.get(key, frozenset()):
            if exports:
                self._local_exports[key] = exports
            else:
                self._local_exports.pop(key, None)
            self._update_exports()


__all__ = ["ServiceCalculator", "local_service_exports", "service_export_policies", "service_exports"]
