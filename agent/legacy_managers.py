"""Protocol adapters for the route, rule, NAT and filter managers (until each speaks
`tortie.dataplane.Manager` itself)."""

from __future__ import annotations

from tortie.policy import netpol
from tortie.policy.messages import EndpointFilterUpdate, NatUpdate, PolicyUpdate
from tortie.routing.messages import RouteDelta, RulesUpdate


class Routes:
    name = "routes"

    def __init__(self, mgr) -> None:
        self.mgr = mgr

    def on_update(self, msg) -> None:
        if isinstance(msg, RouteDelta):
            self.mgr.update_routes(msg.route_class, msg.routes, msg.removed)

    @property
    def dirty(self) -> bool:
        return self.mgr.dirty

    def resync(self) -> None:
        self.mgr.request_resync()

    def apply(self) -> None:
        self.mgr.apply()


class Rules(Routes):
    name = "rules"

    def on_update(self, msg) -> None:
        if isinstance(msg, RulesUpdate):
            self.mgr.set_rules(msg.rule_class, msg.rules)


class Nat:
    name = "nat"

    def __init__(self, mgr) -> None:
        self.mgr = mgr

    def on_update(self, msg) -> None:
        if isinstance(msg, NatUpdate):
            self.mgr.on_update(nat_pools=msg.nat_pools, all_pools=msg.all_pools,
                               node_addresses=msg.node_addresses)

    @property
    def dirty(self) -> bool:
        return self.mgr.dirty

    def resync(self) -> None:
        self.mgr.check()

    def apply(self) -> None:
        self.mgr.apply()


class Filter(Nat):
    name = "netpol"

    def __init__(self, mgr) -> None:
        super().__init__(mgr)
        self.pods: dict = {}
        self.policies: dict = {}
        self._changed = False

    def on_update(self, msg) -> None:
        if isinstance(msg, PolicyUpdate):
            if msg.policy is None:
                self.policies.pop(msg.key, None)
            else:
                self.policies[msg.key] = msg.policy
            self._changed = True
        elif isinstance(msg, EndpointFilterUpdate):
            if msg.filter is None:
                self.pods.pop(msg.interface, None)
            else:
                self.pods[msg.interface] = msg.filter
            self._changed = True

    @property
    def dirty(self) -> bool:
        return self._changed or self.mgr.dirty

    def apply(self) -> None:
        if self._changed:
            pods = tuple(sorted(self.pods.values(), key=lambda f: (f.namespace, f.name)))
            self.mgr.on_update(netpol.Filter(pods, tuple(self.policies[k] for k in sorted(self.policies))))
            self._changed = False
        self.mgr.apply()
