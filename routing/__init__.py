"""The kernel's routes and policy-routing rules, reconciled to desired state.

    from tortie.routing.model import Route, Rule
    from tortie.routing.route_mgr import RouteManager
    from tortie.routing.rule_mgr import RuleManager
    from tortie.routing.monitor import Monitor

    routes, rules = RouteManager(), RuleManager()          # the namespace we run in
    routes.set_routes("blocks", [Route("10.1.0.0/26", type="blackhole")])
    routes.set_routes("workloads", [Route("10.1.0.5/32", dev="cali1234")])
    rules.set_rules("egress", [Rule(100, dst="10.0.0.0/8")])
    routes.apply(); rules.apply()                           # first apply adopts the kernel's
    Monitor(route_mgr=routes, rule_mgr=rules).attach(loop, schedule_apply)

Modules: ``model`` (values, TORTIE_PROTO), ``netlink`` (struct-packed rtnetlink),
``kernel`` (the narrow kernel interface, its netlink implementation, a fake),
``route_mgr``, ``rule_mgr``, ``monitor``. Figures: ``bench/routes/run.py``.
"""
