"""The kernel's routes and policy-routing rules, reconciled to desired state.

    from tortie.routing.messages import RouteDelta, RulesUpdate
    from tortie.routing.model import Route, Rule
    from tortie.routing.route_mgr import RouteManager
    from tortie.routing.rule_mgr import RuleManager
    from tortie.routing.monitor import Monitor

    # all of it on the dataplane driver's thread (it owns every kernel write)
    routes, rules = RouteManager(), RuleManager()          # the namespace we run in
    routes.on_update(RouteDelta("blocks", (Route("10.1.0.0/26", type="blackhole"),)))
    routes.on_update(RouteDelta("workloads", (Route("10.1.0.5/32", dev="cali1234"),)))
    rules.on_update(RulesUpdate("egress", frozenset({Rule(100, dst="10.0.0.0/8")})))
    routes.apply(); rules.apply()                           # first apply adopts the kernel's
    mon = Monitor(route_mgr=routes, rule_mgr=rules)        # select() on mon, then:
    if mon.drain(): routes.apply(); rules.apply()

Modules: ``model`` (values, TORTIE_PROTO), ``messages`` (RouteDelta, RulesUpdate),
``netlink`` (struct-packed rtnetlink), ``kernel`` (the narrow kernel interface, its
netlink implementation; its test double is in tests/doubles), ``route_mgr``, ``rule_mgr``, ``monitor``. Figures: ``bench/routes/run.py``.
"""
