"""Only the leader writes: the datastore store and IPAM, as the controller holds them,
are wrapped in a fence (`Fenced`) that refuses each writing call (`NotLeader`) unless this
replica leads at that moment (fail closed, even in the middle of a pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NotLeader(Exception):
    """A write refused because this replica does not lead (now)."""


STORE_WRITES = frozenset({"create", "replace", "apply", "delete"})
IPAM_WRITES = frozenset({"release_node", "release_from_report", "release_handle", "release_ips"})


class Fenced:
    """The target with its writing methods (`writes`) let through only while `allowed()`
    is true at the moment of the call; `on_write(method, args)` sees each one let through."""

    def __init__(self, target: Any, writes: frozenset[str], allowed: Callable[[], bool],
                 on_write: Callable[[str, tuple], None]) -> None:
        self._target, self._writes, self._allowed, self._on_write = target, writes, allowed, on_write

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in self._writes:
            return attr

        def guarded(*args, **kwargs):
            if not self._allowed():
                raise NotLeader(f"{name} refused: this replica does not lead")
            self._on_write(name, args)
            return attr(*args, **kwargs)

        return guarded
