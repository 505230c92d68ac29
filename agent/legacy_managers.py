"""Protocol adapters for the route and rule managers (until each speaks
`tortie.dataplane.Manager` itself)."""

from __future__ import annotations

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
