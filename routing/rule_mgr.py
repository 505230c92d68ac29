"""The rule manager: policy-routing rules at the priorities tortie owns.

tortie owns rule priorities ``OWNED_PRIORITIES`` (100-199, between the kernel's ``local``
rule at 0 and ``main`` at 32766). Every rule in that range is tortie's: one it does not
want is deleted, whoever made it; a rule at any other priority is never touched. Issue 5
uses the range like this: a rule keeping traffic to any pool on the main table first,
then ``from <pool> lookup <egress table>`` per pool.

Rules are few, so the reconcile is simple: on apply, dump the rules, keep those in the
range, add what is missing and delete what is not wanted, in one batch. A rule that has
selectors tortie does not model is deleted exactly as the kernel describes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from tortie.errors import ValidationError
from tortie.log import get_logger

from .kernel import Kernel, KernelRule, NetlinkKernel, WriteError
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
    def __init__(self, kernel: Kernel | None = None, *, netns: str | None = None,
                 proto: int = TORTIE_PROTO, priorities: range = OWNED_PRIORITIES) -> None:
        self._own_kernel = kernel is None
        self.kernel: Kernel = kernel if kernel is not None else NetlinkKernel(netns)
        self.netns = netns
        self.proto = proto
        self.priorities = priorities
        self._by_class: dict[str, frozenset[Rule]] = {}
        self._desired: frozenset[Rule] = frozenset()
        self._actual: set[Rule] = set()
        self._dirty = True
        self.last_apply: float | None = None

    def set_rules(self, rule_class: str, rules: Iterable[Rule]) -> None:
        rules = frozenset(rules)
        for r in rules:
            if r.priority not in self.priorities:
                raise ValidationError(
                    f"rule priority {r.priority} outside tortie's range "
                    f"{self.priorities.start}-{self.priorities.stop - 1}", field="priority")
        if self._by_class.get(rule_class) != rules:
            self._by_class[rule_class] = rules
            self._desired = frozenset().union(*self._by_class.values())
            self._dirty = True

    def desired(self) -> frozenset[Rule]:
        return self._desired

    @property
    def dirty(self) -> bool:
        return self._dirty

    def close(self) -> None:
        """Close the kernel connection (when this manager opened it)."""
        if self._own_kernel:
            self.kernel.close()

    def request_resync(self) -> None:
        self._dirty = True

    def resync(self) -> None:
        self._dirty = True

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
        ours = [k for k in self.kernel.dump_rules() if k.priority in self.priorities]
        seen: set[Rule] = set()
        deletes: list[KernelRule] = []
        for k in ours:
            if k.rule is None or k.rule not in self._desired or k.rule in seen:
                deletes.append(k)
            else:
                seen.add(k.rule)
        adds = sorted(self._desired - seen, key=lambda r: (r.priority, r.family, str(r)))
        errors = self.kernel.write_rules(adds, deletes, self.proto) if adds or deletes else []
        failed_adds = {id(e.item) for e in errors}
        self._actual = seen | {r for r in adds if id(r) not in failed_adds}
        if errors:
            log.warning("rule writes failed", errors=[str(e) for e in errors[:5]])
        self.last_apply = time.monotonic()
        return RuleApplyStats(added=sum(1 for r in adds if id(r) not in failed_adds),
                              deleted=sum(1 for k in deletes if id(k.raw) not in failed_adds),
                              errors=tuple(errors), seconds=time.perf_counter() - t0)

    def on_rule_event(self, deleted: bool, rule: Rule | None, priority: int) -> None:
        """A rule notification from the monitor: only our range matters."""
        if priority not in self.priorities:
            return
        if deleted:
            if rule is not None and rule in self._desired:
                self._actual.discard(rule)
                self._dirty = True
        elif rule is None or rule not in self._desired or rule not in self._actual:
            self._dirty = True
