"""The Services part of the calculation (pure, no I/O): what this node's proxy serves.

Indexes the EndpointSlices by their Service, so a Service or slice event recomputes that
one Service (`svc_model.service_ports`) and emits only the ports that changed:
`ServicePortUpdate`s, `HealthCheckUpdate`s (healthCheckNodePort -> ready local endpoints)
and, when the pools change, `ProxyConfigUpdate`. `recompute()` diffs a whole
`svc_model.proxy_state` against what was emitted (snapshots); the property test holds that
the incremental path and the recompute agree.
"""

from __future__ import annotations

from collections.abc import Mapping

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


class ServiceCalculator:
    def __init__(self, node: str, services: Mapping[Key, res.Service], slices: Mapping[Key, res.EndpointSlice],
                 pools: Mapping[str, res.IPPool]) -> None:
        self.node = node
        self.services, self.slices, self.pools = services, slices, pools
        self._slices_of: dict[Key, set[Key]] = {}  # (ns, service) -> its slices' keys
        self.emitted: dict[str, ServicePortState] = {}
        self._ports_of: dict[Key, set[str]] = {}  # (ns, service) -> its emitted port keys
        self.health: dict[int, tuple[str, int]] = {}  # emitted health check node ports
        self._health_of: dict[Key, set[int]] = {}
        self._pod_cidrs: frozenset[str] | None = None
        self._out: list = []

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

    def on_pools(self) -> None:
        cidrs = frozenset(str(p.network) for p in self.pools.values())
        if cidrs != self._pod_cidrs:
            self._pod_cidrs = cidrs
            self._out.append(ProxyConfigUpdate(cidrs))

    def recompute(self) -> None:
        self._slices_of = {}
        for (ns, svc), items in slices_by_service(self.slices).items():
            self._slices_of[(ns, svc)] = {(ns, s.name) for s in items}
        for key in set(self._ports_of) | set(self.services) | set(self._health_of):
            self._refresh(key)
        self.on_pools()

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


__all__ = ["ServiceCalculator"]
