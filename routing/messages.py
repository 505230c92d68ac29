"""Messages the calculation sends to the routing managers (through the dataplane driver)."""

from __future__ import annotations

from dataclasses import dataclass

from .model import Route, Rule

RouteKey = tuple[int, int, str]  # (family, table, dst): what one kernel route is keyed by


@dataclass(frozen=True, slots=True)
class RouteDelta:
    """Routes of one class set (added or changed) and removed (by key)."""

    route_class: str
    routes: tuple[Route, ...] = ()
    removed: tuple[RouteKey, ...] = ()


@dataclass(frozen=True, slots=True)
class RulesUpdate:
    """Every rule of one class (rules are few: the whole set, not a delta)."""

    rule_class: str
    rules: frozenset[Rule]


@dataclass(frozen=True, slots=True)
class SysctlUpdate:
    """Kernel settings (paths under /proc/sys, "net/ipv4/...") one owner wants, whole."""

    owner: str
    values: frozenset[tuple[str, str]]
