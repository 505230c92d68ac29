"""Routes learned from peers, with graceful-restart helper semantics (RFC 4724).

ExaBGP hands the API every received update but keeps no RIB the agent can use, and it
knows nothing of stale routes. So the bridge keeps one here: per peer, prefix -> path.
When a peer that negotiated graceful restart goes down, its routes stay, marked stale,
for its restart time; when it comes back, what it re-announces is fresh again and its
end-of-RIB (or the timer) drops whatever is still stale.

The table handed to the agent (prefix -> next hops, accepted routes only) is kept up to
date route by route, so building it is a copy, not a pass over every peer's routes with
an import filter: a 10,000-route table arrives in bursts and is handed over many times.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

# A path: (next hop, originator id or "", cluster list). Reflection needs the last two.
Path = tuple[str, str, tuple[str, ...]]
Accepts = Callable[[str, str], bool]  # (peer, prefix) -> may it be imported


def family_of(prefix: str) -> str:
    return "ipv6 unicast" if ":" in prefix else "ipv4 unicast"


def _path(value: str | Path) -> Path:
    return (value, "", ()) if isinstance(value, str) else value


def _hops(by_peer: dict[str, str]) -> tuple[str, ...]:
    hops = set(by_peer.values())
    if len(hops) == 1:
        return tuple(hops)
    return tuple(sorted(hops, key=ipaddress.ip_address))


class LearnedRoutes:
    def __init__(self, accepts: Accepts | None = None,
                 filter_for: Callable[[str], Callable[[str], bool]] | None = None) -> None:
        self._accepts = accepts or (lambda peer, prefix: True)
        # optional: peer -> its own predicate, deciding as `accepts` does; looked up once
        # per update instead of once per prefix (a 10,000-route burst)
        self._filter_for = filter_for
        self._routes: dict[str, dict[str, Path]] = {}  # peer -> prefix -> path
        self._stale: dict[str, set[str]] = {}  # peer -> prefixes kept over its restart
        self._table: dict[str, dict[str, str]] = {}  # prefix -> peer -> next hop (accepted only)
        self._touched: set[str] = set()  # prefixes whose table entry may differ since take_changes()
        self._accepted: Counter[str] = Counter()  # peer -> its routes in the table (the rest: filtered)

    # -- the accepted table, kept in step with _routes -------------------------------------
    def _put(self, peer: str, prefix: str, next_hop: str) -> None:
        if self._accepts(peer, prefix):
            by_peer = self._table.setdefault(prefix, {})
            if peer not in by_peer:
                self._accepted[peer] += 1
            by_peer[peer] = next_hop
            self._touched.add(prefix)

    def _drop(self, peer: str, prefix: str) -> None:
        by_peer = self._table.get(prefix)
        if by_peer is not None and by_peer.pop(peer, None) is not None:
            self._accepted[peer] -= 1
            self._touched.add(prefix)
            if not by_peer:
                del self._table[prefix]

    def set_filter(self, accepts: Accepts) -> None:
        """A new import filter (peers changed): rebuild the accepted table."""
        self._accepts = accepts
        self._touched.update(self._table)
        self._table = {}
        self._accepted = Counter()
        for peer, routes in self._routes.items():
            for prefix, path in routes.items():
                self._put(peer, prefix, path[0])

    # -- changes ---------------------------------------------------------------------------
    def update(self, peer: str, announce: Mapping[str, str | Path], withdraw: Iterable[str]) -> bool:
        """Apply one update; returns whether the accepted table changed."""
        routes = self._routes.setdefault(peer, {})
        stale = self._stale.get(peer)
        before = len(self._table)
        changed = False
        for prefix in withdraw:
            if routes.pop(prefix, None) is not None:
                changed = True
                self._drop(peer, prefix)
            if stale:
                stale.discard(prefix)
        # the loop below runs for every learned route: _put inlined, locals bound
        table, touched = self._table, self._touched
        if self._filter_for is not None:
            ok = self._filter_for(peer)
        else:
            accepts = self._accepts

            def ok(prefix: str) -> bool:
                return accepts(peer, prefix)
        accepted = 0
        for prefix, value in announce.items():
            path = value if type(value) is tuple else _path(value)
            old = routes.get(prefix)
            if old != path:
                routes[prefix] = path
                if old is None or old[0] != path[0]:
                    changed = True
                    if ok(prefix):
                        by_peer = table.get(prefix)
                        if by_peer is None:
                            table[prefix] = {peer: path[0]}
                            accepted += 1
                        else:
                            accepted += peer not in by_peer
                            by_peer[peer] = path[0]
                        touched.add(prefix)
            if stale:
                stale.discard(prefix)
        if accepted:
            self._accepted[peer] += accepted
        return changed or before != len(self._table)

    def peer_down(self, peer: str, graceful: bool) -> bool:
        """The session closed: keep its routes as stale (graceful) or drop them."""
        routes = self._routes.get(peer)
        if not routes:
            return False
        if graceful:
            self._stale[peer] = set(routes)
            return False
        self.drop(peer)
        return True

    def end_of_rib(self, peer: str, family: str) -> bool:
        """The peer finished re-sending `family`: what is still stale is gone."""
        stale = self._stale.get(peer)
        if not stale:
            return False
        gone = {p for p in stale if family_of(p) == family}
        stale -= gone
        self._forget(peer, gone)
        if not stale:
            self._stale.pop(peer, None)
        return bool(gone)

    def expire(self, peer: str) -> bool:
        """The restart timer ran out: drop everything still stale."""
        stale = self._stale.pop(peer, set())
        self._forget(peer, stale)
        return bool(stale)

    def _forget(self, peer: str, prefixes: Iterable[str]) -> None:
        routes = self._routes.get(peer, {})
        for prefix in prefixes:
            if routes.pop(prefix, None) is not None:
                self._drop(peer, prefix)

    def drop(self, peer: str) -> None:
        for prefix in self._routes.pop(peer, {}):
            self._drop(peer, prefix)
        self._stale.pop(peer, None)

    # -- reading ---------------------------------------------------------------------------
    def is_stale(self, peer: str) -> bool:
        return bool(self._stale.get(peer))

    def stale(self, peer: str) -> frozenset[str]:
        """The peer's prefixes kept over its restart, not announced again yet."""
        return frozenset(self._stale.get(peer, ()))

    def count(self, peer: str) -> int:
        return len(self._routes.get(peer, ()))

    def accepted(self, peer: str) -> int:
        """How many of the peer's routes its import filter let in (the rest are counted, not used)."""
        return self._accepted.get(peer, 0)

    def peers(self) -> list[str]:
        return list(self._routes)

    def paths(self, peer: str) -> Mapping[str, Path]:
        return self._routes.get(peer, {})

    def take_changes(self) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
        """What changed in table() since the last call: (prefix -> next hops, removed prefixes).
        May include prefixes whose next hops ended up as they were."""
        touched, self._touched = self._touched, set()
        table = self._table
        changed: dict[str, tuple[str, ...]] = {}
        removed = []
        single: dict[str, tuple[str, ...]] = {}  # one shared (hop,) per next hop, not one per prefix
        for p in touched:
            by_peer = table.get(p)
            if by_peer is None:
                removed.append(p)
            elif len(by_peer) == 1:  # one peer: no ECMP to sort
                (hop,) = by_peer.values()
                hops = single.get(hop)
                if hops is None:
                    hops = single[hop] = (hop,)
                changed[p] = hops
            else:
                changed[p] = _hops(by_peer)
        return changed, frozenset(removed)

    def table(self) -> dict[str, tuple[str, ...]]:
        """prefix -> next hops (ECMP, sorted) over every accepted route."""
        return {prefix: _hops(by_peer) for prefix, by_peer in self._table.items()}
