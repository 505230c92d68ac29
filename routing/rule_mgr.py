"""The rule manager: policy-routing rules at the priorities tortie owns.

tortie owns rule priorities ``OWNED_PRIORITIES`` (100-199, between the kernel's ``local``
rule at 0 and ``main`` at 32766). Every rule in that range is tortie's: one it does not
want is deleted, whoever made it; a rule at any other priority is never touched. Issue 5
uses the range like this: a rule keeping traffic to any pool on the main table first,
then ``from <pool> lookup <egress table>`` per pool.

Rules are few, so the reconcile is simple: every apply dumps the rules (and so reads back
what the kernel holds), keeps those in the range as the actual side of a DeltaTracker
(tortie.dataplane), and writes what is pending: adds for what is missing, deletes for what
is not wanted, in one batch. A rule that has selectors tortie does not model, or a second
copy of a wanted rule, is keyed by its raw message and deleted exactly as the kernel
describes it. A write the kernel refuses is held until the next resync.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tortie.dataplane import DeltaTracker
from tortie.errors import ValidationError
from tortie.log import get_logger

from .kernel import DELETE, Kernel, KernelRule, NetlinkKernel, WriteError
from .messages import RulesUpdate
from .model import TORTIE_PROTO, Rule

log = get_logger("rules")

OWNED_PRIORITIES = range(100, 200)


@dataclass(frozen=True, slots=True)
class RuleApplyStats:
    added: int = 0
    deleted: int = 0
    errors: tuple[WriteError, ...] = ()
    seconds: float = 0.0


class RuleManager:
    name = "rules"

    def __init__(self, kernel: Kernel | None = None, *, netns: str | None = None,
                 proto: int = TORTIE_PROTO, priorities: range = OWNED_PRIORITIES) -> None:
        self._own_kernel = kernel is None
        self.kernel: Kernel = kernel if kernel is not None else NetlinkKernel(netns)
        self.netns = netns
        self.proto = proto
        self.priorities = priorities
        self._by_class: dict[str, frozenset[Rule]] = {}
        # Keys: a modeled rule (desired, or found once in the kernel), else the kernel's raw
        # message (bytes). Desired values are Rules, actual values KernelRules.
        self._rules: DeltaTracker[Rule | bytes, Rule | KernelRule] = DeltaTracker(
            equal=lambda want, have: getattr(have, "rule", None) == want)
        self._dirty = True
        self._retry = True  # the next apply retries refused writes (a resync)
        self.last_apply: float | None = None

    def on_update(self, msg: object) -> None:
        """A RulesUpdate from the calculation (other messages are not this manager's)."""
        if isinstance(msg, RulesUpdate):
            self.set_rules(msg.rule_class, msg.rules)

    def set_rules(self, rule_class: str, rules: Iterable[Rule]) -> None:
        rules = frozenset(rules)
        for r in rules:
            if r.priority not in self.priorities:
                raise ValidationError(
                    f"rule priority {r.priority} outside tortie's range "
                    f"{self.priorities.start}-{self.priorities.stop - 1}", field="priority")
        if self._by_class.get(rule_class) != rules:
            self._by_class[rule_class] = rules
            self._rules.replace_desired({r: r for r in frozenset().union(*self._by_class.values())})
            self._dirty = True

    def desired(self) -> frozenset[Rule]:
        return frozenset(self._rules.desired)  # type: ignore[arg-type]

    @property
    def dirty(self) -> bool:
        return self._dirty or self._rules.has_work

    def close(self) -> None:
        """Close the kernel connection (when this manager opened it)."""
        if self._own_kernel:
            self.kernel.close()

    def resync(self) -> None:
        """The next apply re-reads the rules and retries what was refused."""
        self._dirty = self._retry = True

    request_resync = resync

    def apply(self) -> RuleApplyStats:
        t0 = time.perf_counter()
        # Cleared first: a notification arriving while we work marks it again.
        self._dirty = False
        try:
            return self._apply(t0)
        except Exception:
            self._dirty = True  # an error only means: try again later
            raise

    def _apply(self, t0: float) -> RuleApplyStats:
        tracker = self._rules
        held = dict(tracker.held)  # refused writes stay refused until a resync
        actual: dict[Rule | bytes, KernelRule] = {}
        for k in self.kernel.dump_rules():
            if k.priority in self.priorities:
                key = k.rule if k.rule is not None and k.rule not in actual else k.raw
                actual[key] = k
        tracker.replace_actual(actual)
        if not self._retry:
            for key, why in held.items():
                tracker.hold(key, why)
        self._retry = False
        deletes = [tracker.actual[k] for k in tracker.pending_deletions if k not in tracker.held]
        adds = sorted((r for k, r in tracker.pending_updates.items() if k not in tracker.held),
                      key=lambda r: (r.priority, r.family, str(r)))
        errors = self.kernel.write_rules(adds, deletes, self.proto) if adds or deletes else []
        failed = {id(e.item): e for e in errors}
        added = deleted = 0
        for r in adds:
            e = failed.get(id(r))
            if e is None:
                tracker.mark_written(r, KernelRule(r, b"", r.priority))
                added += 1
            else:
                tracker.hold(r, e)
        for k in deletes:
            key = k.rule if k.rule is not None and tracker.actual.get(k.rule) is k else k.raw
            e = failed.get(id(k.raw))
            if e is None or e.errno == errno.ENOENT:  # gone already: done
                tracker.mark_deleted(key)
                deleted += 1
            else:
                tracker.hold(key, e)
        errors = [e for e in errors if not (e.op == DELETE and e.errno == errno.ENOENT)]
        if errors:
            log.warning("rule writes failed", errors=[str(e) for e in errors[:5]])
        self.last_apply = time.monotonic()
        return RuleApplyStats(added=added, deleted=deleted, errors=tuple(errors),
                              seconds=time.perf_counter() - t0)

    def on_rule_event(self, deleted: bool, rule: Rule | None, priority: int) -> None:
        """A rule notification from the monitor: only our range matters."""
        if priority not in self.priorities:
            return
        tracker = self._rules
        if deleted:
            if rule is not None and rule in tracker.desired:
                tracker.delete_actual(rule)
                self._dirty = True
        elif rule is None or rule not in tracker.desired or rule not in tracker.actual:
            self._dirty = True
