"""Property on the real kernel: random desired rule sets, rules deleted or added by hand in
and out of tortie's range; after the monitor's notifications and apply(), the range holds
exactly the desired rules and everything outside it is as it was."""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_helpers import scratch_netns

from tortie.routing.model import Rule
from tortie.routing.monitor import Monitor
from tortie.routing.rule_mgr import RuleManager

pytestmark = pytest.mark.timeout(300)

rules = st.builds(
    lambda prio, v6, sel, i, table: Rule(
        prio, **{sel: f"fd00:{i}::/64" if v6 else f"10.{i}.0.0/16"}, table=table),
    st.sampled_from([100, 110, 199]), st.booleans(), st.sampled_from(["src", "dst"]),
    st.integers(1, 3), st.sampled_from([254, 1000]),
)
steps = st.one_of(
    st.tuples(st.just("set_rules"), st.sampled_from(["egress", "other"]),
              st.lists(rules, max_size=5)),
    st.tuples(st.just("hand_delete"), rules),
    st.tuples(st.just("hand_add"), st.sampled_from([50, 150, 300]), st.booleans()),
    st.tuples(st.just("apply")),
)


def dump(ns: str) -> list[tuple[int, str]]:
    out = []
    for fam in ("-4", "-6"):
        res = subprocess.run(["ip", "-n", ns, "-j", fam, "rule", "show"], check=True,
                             capture_output=True, text=True)
        out += [(r["priority"], json.dumps(r, sort_keys=True)) for r in json.loads(res.stdout)]
    return sorted(out)


def as_rule(d: dict, v6: bool) -> Rule:
    def cidr(key: str) -> str | None:
        return f"{d[key]}/{d[key + 'len']}" if key in d and d[key] != "all" else None
    table = {"main": 254}.get(d["table"]) or int(d["table"])
    return Rule(d["priority"], src=cidr("src"), dst=cidr("dst"), table=table,
                family=10 if v6 else 2)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(steps, max_size=12))
def test_rules_converge_and_nothing_outside_the_range_moves(steps):
    with scratch_netns("rules") as ns:
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", ns, *args], capture_output=True)

        m = RuleManager(netns=ns)
        mon = Monitor(ns, rule_mgr=m)
        try:
            for step in steps:
                if step[0] == "set_rules":
                    m.set_rules(step[1], step[2])
                elif step[0] == "hand_delete":
                    r = step[1]
                    ip("-6" if r.family == 10 else "-4", "rule", "del", "pref", str(r.priority),
                       "from" if r.src else "to", r.src or r.dst, "lookup", str(r.table))
                elif step[0] == "hand_add":
                    prio, v6 = step[1], step[2]
                    ip("-6" if v6 else "-4", "rule", "add", "pref", str(prio), "fwmark", "7",
                       "lookup", "9")
                else:
                    mon.drain()
                    m.apply()
            before_outside = [x for x in dump(ns) if not 100 <= x[0] < 200]
            mon.drain()
            st_ = m.apply()
            assert not st_.errors
            mon.drain()
            assert not m.dirty
            after = dump(ns)
            assert [x for x in after if not 100 <= x[0] < 200] == before_outside
            have = set()
            for fam, v6 in (("-4", False), ("-6", True)):
                res = subprocess.run(["ip", "-n", ns, "-j", fam, "rule", "show"], check=True,
                                     capture_output=True, text=True)
                have |= {as_rule(d, v6) for d in json.loads(res.stdout)
                         if 100 <= d["priority"] < 200}
            assert have == set(m.desired())
        finally:
            mon.close()
            m.close()
