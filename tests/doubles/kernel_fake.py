"""`FakeKernel`: an in-memory kernel behind `routing.kernel.Kernel`, for unit tests of the managers."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping, Sequence

from tortie.routing.kernel import ADD, DELETE, KernelRule, WriteError
from tortie.routing.model import Route, Rule


class FakeKernel:
    """An in-memory kernel with the same interface, for unit tests of the managers.

    It keeps one route per (family, table, dst) like the managers' key, tracks foreign
    routes (other protocols) separately, and counts writes so tests can assert "no
    writes". ``fail`` maps a route key to an errno to inject failures.
    """

    def __init__(self, links: Iterable[str] = ()) -> None:
        self._links = {name: i + 2 for i, name in enumerate(links)}
        self.routes: dict[tuple, Route] = {}  # ours
        self.foreign: dict[tuple, Route] = {}
        self.rules: list[KernelRule] = []
        self.fail: dict[tuple, int] = {}
        self.refuse: dict = {}  # key -> errno for adds and replaces only (a next hop the kernel refuses)
        self.writes = 0
        self.dumps = 0

    def add_link(self, name: str) -> None:
        self._links[name] = max(self._links.values(), default=1) + 1

    def del_link(self, name: str) -> None:
        self._links.pop(name, None)
        for k in [k for k, r in self.routes.items() if r.dev == name]:
            del self.routes[k]

    def links(self, refresh: bool = False) -> Mapping[str, int]:
        return self._links

    def lookup_link(self, name: str) -> int | None:
        return self._links.get(name)

    def note_link(self, index: int, name: str | None, present: bool) -> None:
        pass

    def close(self) -> None:
        pass

    def dump_routes(self, proto: int) -> list[Route]:
        self.dumps += 1
        return list(self.routes.values())

    def write_routes(self, ops: Sequence[tuple[str, Route]], proto: int) -> list[WriteError]:
        errors = []
        for op, r in ops:
            self.writes += 1
            k = r.key
            err = self.fail.get(k) or (self.refuse.get(k) if op != DELETE else None)
            if err is None:
                if op == ADD and (k in self.routes or k in self.foreign):
                    err = errno.EEXIST
                elif op != DELETE and r.dev and r.dev not in self._links:
                    err = errno.ENODEV
                elif op == DELETE and k not in self.routes:
                    err = errno.ESRCH
            if err:
                errors.append(WriteError(op, r, err))
            elif op == DELETE:
                del self.routes[k]
            else:
                self.routes[k] = r
                self.foreign.pop(k, None)  # a replace takes the place of whatever was there
        return errors

    def dump_rules(self) -> list[KernelRule]:
        self.dumps += 1
        return list(self.rules)

    def write_rules(self, adds: Sequence[Rule], deletes: Sequence[KernelRule],
                    proto: int) -> list[WriteError]:
        errors = []
        for k in deletes:
            self.writes += 1
            if k in self.rules:
                self.rules.remove(k)
            else:
                errors.append(WriteError(DELETE, k.raw, errno.ENOENT))
        for r in adds:
            self.writes += 1
            if any(k.rule == r for k in self.rules):
                errors.append(WriteError(ADD, r, errno.EEXIST))
            else:
                self.rules.append(KernelRule(r, repr(r).encode(), r.priority))
        return errors

