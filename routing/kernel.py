"""The narrow kernel interface the managers reconcile against, and its netlink implementation
(the in-memory fake for unit tests of the reconcile logic is `tests/doubles/kernel_fake.py`).

The interface is deliberately small: read our routes, read rules, write batches of
operations, resolve link names. Everything about *what* to write lives in the managers.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tortie.log import get_logger

from . import netlink as nl
from .model import AF_INET, AF_INET6, Route, Rule

log = get_logger("routes")

# Route operations: "add" fails with EEXIST if any route (ours or not) holds the key, so
# a foreign route is never overwritten; "replace" is used only for keys we hold.
ADD, REPLACE, DELETE = "add", "replace", "delete"
# Per operation: message type, flags, whether the route's device is sent (a delete names
# dst, table, metric and protocol only).
_KINDS = {ADD: (nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, True),
          REPLACE: (nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_REPLACE, True),
          DELETE: (nl.RTM_DELROUTE, 0, False)}


@dataclass(frozen=True, slots=True)
class WriteError:
    op: str
    item: Route | Rule | bytes
    errno: int
    message: str = ""

    def __str__(self) -> str:
        extra = f" ({self.message})" if self.message else ""
        return f"{self.op} {self.item}: {nl.errno_name(self.errno)}{extra}"


@dataclass(frozen=True, slots=True)
class KernelRule:
    """A rule as read from the kernel: ``rule`` is None when it has selectors tortie does
    not model; ``raw`` is its message body, enough to delete it exactly."""

    rule: Rule | None
    raw: bytes
    priority: int


class Kernel(Protocol):
    def links(self, refresh: bool = False) -> Mapping[str, int]: ...
    def lookup_link(self, name: str) -> int | None: ...
    def dump_routes(self, proto: int) -> list[Route]: ...
    def write_routes(self, ops: Sequence[tuple[str, Route]], proto: int) -> list[WriteError]: ...
    def dump_rules(self) -> list[KernelRule]: ...
    def write_rules(self, adds: Sequence[Rule], deletes: Sequence[KernelRule],
                    proto: int) -> list[WriteError]: ...
    def note_link(self, index: int, name: str | None, present: bool) -> None: ...
    def close(self) -> None: ...


class NetlinkKernel:
    """The real kernel of one network namespace (the current one when ``netns`` is None)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.sock = nl.NetlinkSocket(netns)
        self._index: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._parsed: dict[bytes, Route] = {}  # raw route message -> Route, from the last dump
        self.refresh_links()

    def close(self) -> None:
        self.sock.close()

    # -- links ----------------------------------------------------------------------------
    def refresh_links(self) -> None:
        # A link created or deleted meanwhile (a pod coming or going) interrupts the dump:
        # read it again, as dump_routes does.
        for attempt in range(5):
            index: dict[str, int] = {}
            try:
                for buf in self.sock.dump(nl.RTM_GETLINK, nl.link_request()):
                    for off, length, mtype in nl.iter_messages(buf):
                        if mtype == nl.RTM_NEWLINK:
                            i, name = nl.parse_link(buf, off, length)
                            if name:
                                index[name] = i
            except nl.DumpInterrupted:
                if attempt == 4:
                    raise
                continue
            break
        if index != self._index:
            self._parsed = {}  # a cached Route may carry a name that changed
        self._index = index
        self._names = {i: n for n, i in index.items()}

    @property
    def link_names(self) -> Mapping[int, str]:
        """ifindex -> name, as of the last dump or notification."""
        return self._names

    def links(self, refresh: bool = False) -> Mapping[str, int]:
        if refresh:
            self.refresh_links()
        return self._index

    def lookup_link(self, name: str) -> int | None:
        """Ask the kernel for one link (not yet seen by the monitor); cached when found."""
        index = self.sock.get_link(name)
        if index is not None:
            self.note_link(index, name, True)
        return index

    def note_link(self, index: int, name: str | None, present: bool) -> None:
        """Keep the name cache current from the monitor's link notifications."""
        old = self._names.pop(index, None)
        if old is not None:
            self._index.pop(old, None)
        if present and name:
            self._index[name] = index
            self._names[index] = name
        if old != (name if present else None):
            self._parsed = {}

    # -- routes ---------------------------------------------------------------------------
    def dump_routes(self, proto: int) -> list[Route]:
        self.refresh_links()
        for attempt in range(5):
            out: list[Route] = []
            cache: tuple[dict[bytes, Route], dict[bytes, Route]] = (self._parsed, {})
            try:
                for fam in (AF_INET, AF_INET6):
                    for buf in self.sock.dump(nl.RTM_GETROUTE, nl.route_request(fam, proto)):
                        nl.parse_routes(buf, self._names, proto, out, cache, bare=True)
            except nl.DumpInterrupted:
                if attempt == 4:
                    raise
                continue
            self._parsed = cache[1]
            return out
        raise AssertionError("unreachable")

    def write_routes(self, ops: Sequence[tuple[str, Route]], proto: int) -> list[WriteError]:
        first = self.sock.next_seq(len(ops))
        msgs, missing = nl.encode_routes(ops, first, proto, _KINDS, self._index)
        errors = [WriteError(ops[i][0], ops[i][1], errno.ENODEV, f"no device {ops[i][1].dev}")
                  for i in missing]
        for seq, (err, msg) in self.sock.transact(msgs).items():
            op, r = ops[seq - first]
            errors.append(WriteError(op, r, err, msg))
        return errors

    # -- rules ----------------------------------------------------------------------------
    def dump_rules(self) -> list[KernelRule]:
        for attempt in range(5):
            out: list[tuple[int, Rule | None, bytes]] = []
            try:
                for fam in (AF_INET, AF_INET6):
                    for buf in self.sock.dump(nl.RTM_GETRULE, nl.rule_request(fam)):
                        nl.parse_rules(buf, out)
            except nl.DumpInterrupted:
                if attempt == 4:
                    raise
                continue
            return [KernelRule(rule, raw, nl.rule_priority(raw)) for _t, rule, raw in out]
        raise AssertionError("unreachable")

    def write_rules(self, adds: Sequence[Rule], deletes: Sequence[KernelRule],
                    proto: int) -> list[WriteError]:
        items: list[tuple[str, Rule | bytes]] = [(DELETE, k.raw) for k in deletes]
        items += [(ADD, r) for r in adds]
        first = self.sock.next_seq(len(items))
        msgs = []
        for i, (op, item) in enumerate(items):
            seq = first + i
            if op == DELETE:
                # The kernel's own description of the rule: deletes exactly it.
                msgs.append(nl.encode_raw(nl.RTM_DELRULE, 0, seq, item))
            else:
                msgs.append(nl.encode_rule(nl.RTM_NEWRULE, nl.NLM_F_CREATE | nl.NLM_F_EXCL,
                                           seq, item, proto))
        return [WriteError(items[s - first][0], items[s - first][1], e, m)
                for s, (e, m) in self.sock.transact(msgs).items()]
