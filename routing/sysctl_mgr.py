"""Kernel settings the routing needs, kept by the dataplane driver like routes.

A `tortie.dataplane.Manager`: `on_update(SysctlUpdate)` sets what one owner wants (the
egress pools' ECMP wants the kernel to skip next hops whose neighbour failed and to
spread flows by their ports); `apply()` writes what differs from /proc/sys in the
namespace the agent runs in; `resync()` reads them again (someone may have changed one).
A setting no owner wants any more is left as it is: tortie does not know what it was
before, and the kernel's defaults are not necessarily the host's.
"""

from __future__ import annotations

from tortie.dataplane import DeltaTracker
from tortie.errors import DataplaneError
from tortie.log import get_logger

from .messages import SysctlUpdate

log = get_logger("routes")

PROC_SYS = "/proc/sys/"


class SysctlManager:
    name = "sysctls"

    def __init__(self, root: str = PROC_SYS) -> None:
        self.root = root
        self._owners: dict[str, frozenset[tuple[str, str]]] = {}
        self._values: DeltaTracker[str, str] = DeltaTracker()
        self._read = False

    def on_update(self, msg: object) -> None:
        if not isinstance(msg, SysctlUpdate):
            return
        if msg.values:
            self._owners[msg.owner] = msg.values
        else:
            self._owners.pop(msg.owner, None)
        want = dict(kv for values in self._owners.values() for kv in values)
        for path in [p for p in self._values.desired if p not in want]:
            self._values.delete_desired(path)
        for path, value in want.items():
            self._values.set_desired(path, value)
        self._read = False

    @property
    def dirty(self) -> bool:
        return bool(self._values.desired) and (not self._read or self._values.has_work)

    def resync(self) -> None:
        self._read = False

    def apply(self) -> None:
        values = self._values
        if not self._read:
            actual = {}
            for path in values.desired:
                try:
                    with open(self.root + path) as f:
                        actual[path] = f.read().strip()
                except OSError as exc:
                    raise DataplaneError(f"cannot read {path}: {exc.strerror}") from exc
            values.replace_actual(actual)
            self._read = True
        for path, value in list(values.pending_updates.items()):
            try:
                with open(self.root + path, "w") as f:
                    f.write(value)
            except OSError as exc:
                raise DataplaneError(f"cannot set {path} to {value}: {exc.strerror}") from exc
            log.info("kernel setting written", setting=path.replace("/", "."), value=value)
            values.mark_written(path)
        for path in list(values.pending_deletions):
            values.mark_deleted(path)  # left as it is (see the module's docstring)
