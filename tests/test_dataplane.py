"""tortie.dataplane.DeltaTracker: whatever the sequence of changes to either side, the
pending updates and deletions are exactly the difference between desired and actual."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.dataplane import DeltaTracker, Manager
from tortie.routing.route_mgr import RouteManager
from tortie.routing.rule_mgr import RuleManager

KEYS = st.integers(0, 5)
# Values compare by `equal`: (n, tag) equals (n, anything), so "the same value, another
# object" (a route read back from the kernel) is exercised as well as plain equality.
VALUES = st.tuples(st.integers(0, 2), st.sampled_from("ab"))


def equal(want, have) -> bool:
    return want[0] == have[0]


STEPS = st.one_of(
    st.tuples(st.just("set_desired"), KEYS, VALUES),
    st.tuples(st.just("delete_desired"), KEYS),
    st.tuples(st.just("update_desired"), st.lists(st.tuples(KEYS, VALUES), max_size=4)),
    st.tuples(st.just("update_desired"), st.dictionaries(KEYS, VALUES, max_size=4)),
    st.tuples(st.just("replace_desired"), st.dictionaries(KEYS, VALUES, max_size=4)),
    st.tuples(st.just("set_actual"), KEYS, VALUES),
    st.tuples(st.just("delete_actual"), KEYS),
    st.tuples(st.just("replace_actual"), st.dictionaries(KEYS, VALUES, max_size=4)),
    st.tuples(st.just("mark_written"), KEYS),
    st.tuples(st.just("mark_written_as"), KEYS, VALUES),
    st.tuples(st.just("mark_written_many"), st.lists(st.tuples(KEYS, VALUES), max_size=4)),
    st.tuples(st.just("mark_deleted"), KEYS),
    st.tuples(st.just("mark_all_written")),
    st.tuples(st.just("compact")),
    st.tuples(st.just("hold"), KEYS),
    st.tuples(st.just("release"), st.one_of(st.none(), st.lists(KEYS, max_size=3))),
)


def run(t: DeltaTracker, step: tuple) -> None:
    kind, *args = step
    if kind == "mark_written":
        if args[0] in t.desired:  # only a desired key can be written as desired
            t.mark_written(args[0])
    elif kind == "mark_written_as":
        t.mark_written(args[0], args[1])
    elif kind == "hold":
        t.hold(args[0], "why")
    else:
        getattr(t, kind)(*args)


def expected(t: DeltaTracker) -> tuple[dict, set]:
    updates = {k: v for k, v in t.desired.items()
               if k not in t.actual or not equal(v, t.actual[k])}
    return updates, {k for k in t.actual if k not in t.desired}


@settings(max_examples=500, deadline=None)
@given(st.lists(STEPS, max_size=30))
def test_pending_is_always_the_difference(steps):
    t: DeltaTracker = DeltaTracker(equal=equal)
    for step in steps:
        run(t, step)
        updates, deletions = expected(t)
        assert t.pending_updates == updates, step
        assert t.pending_deletions == deletions, step
        # Held keys are pending ones; has_work counts the others.
        assert set(t.held) <= set(updates) | deletions
        assert t.has_work == bool((set(updates) | deletions) - set(t.held))
        assert t.in_sync == (not updates and not deletions)


def test_a_change_releases_a_hold_and_a_resync_releases_all():
    t: DeltaTracker = DeltaTracker()
    t.set_desired("a", 1)
    t.set_desired("b", 1)
    t.hold("a", "no device")
    t.hold("b", "refused")
    t.hold("c", "not pending: ignored")
    assert t.held == {"a": "no device", "b": "refused"} and not t.has_work
    t.set_desired("a", 2)
    assert t.held == {"b": "refused"} and t.has_work
    t.hold("a", "no device")
    t.replace_actual({})
    assert t.held == {} and t.has_work


def test_managers_follow_the_protocol():
    from doubles.kernel_fake import FakeKernel

    for m in (RouteManager(FakeKernel()), RuleManager(FakeKernel())):
        assert isinstance(m, Manager) and m.name
