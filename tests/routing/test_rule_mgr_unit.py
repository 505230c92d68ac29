"""Reconcile logic of RuleManager against the in-memory kernel."""

from __future__ import annotations

import pytest
from doubles.kernel_fake import FakeKernel

from tortie.errors import ValidationError
from tortie.routing.kernel import KernelRule
from tortie.routing.model import Rule
from tortie.routing.rule_mgr import RuleManager


def test_rules_added_removed_and_range_enforced():
    k = FakeKernel()
    outside = KernelRule(Rule(300, src="1.2.3.0/24", table=9), b"x", 300)
    unmodeled = KernelRule(None, b"fwmark", 150)
    k.rules += [outside, unmodeled]
    m = RuleManager(k)
    with pytest.raises(ValidationError):
        m.set_rules("egress", [Rule(99, dst="10.0.0.0/8")])
    want = [Rule(100, dst="10.0.0.0/8"), Rule(101, src="10.1.0.0/16", table=100)]
    m.set_rules("egress", want)
    st = m.apply()
    assert (st.added, st.deleted) == (2, 1)
    assert outside in k.rules and unmodeled not in k.rules
    assert {r.rule for r in k.rules} == {outside.rule, *want}
    writes = k.writes
    assert m.apply().added == 0 and k.writes == writes
    m.set_rules("egress", want[:1])
    assert m.apply().deleted == 1 and outside in k.rules


def test_rule_events_in_range_only():
    m = RuleManager(FakeKernel())
    m.set_rules("egress", [Rule(100, dst="10.0.0.0/8")])
    m.apply()
    m.on_rule_event(True, Rule(300, dst="1.0.0.0/8"), 300)
    assert not m.dirty
    m.on_rule_event(True, Rule(100, dst="10.0.0.0/8"), 100)
    assert m.dirty
    m.apply()
    m.on_rule_event(False, Rule(100, dst="10.0.0.0/8"), 100)  # our own echo
    assert not m.dirty
    m.on_rule_event(False, Rule(120, dst="10.0.0.0/8"), 120)  # someone else in our range
    assert m.dirty
