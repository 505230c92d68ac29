"""Routes learned from peers, with graceful-restart helper semantics (RFC 4724).

ExaBGP hands the API every received update but keeps no RIB the agent can use, and it
knows nothing of stale routes. So the bridge keeps one here: per peer, prefix -> next
hop. When a peer that negotiated graceful restart goes down, its routes stay, marked
stale, for its restart time; when it comes back, what it re-announces is fresh again and
its end-of-RIB (or the timer) drops whatever is still stale.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping

# A path: (next hop, originator id or "", cluster list). Reflection needs the last two.
Path = tuple[str, str, tuple[str, ...]]


def family_of(prefix: str) -> str:
    return "ipv6 unicast" if ":" in prefix else "ipv4 unicast"


def _path(value: str | Path) -> Path:
    return (value, "", ()) if isinstance(value, str) else value


class LearnedRoutes:
    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Path]] = {}  # peer -> prefix -> path
        self._stale: dict[str, set[str]] = {}  # peer -> prefixes kept over its restart

    def update(self, peer: str, announce: Mapping[str, str | Path], withdraw: Iterable[str]) -> bool:
        """Apply one update; returns whether anything changed."""
        routes = self._routes.setdefault(peer, {})
        stale = self._stale.get(peer)
        changed = False
        for prefix in withdraw:
            if routes.pop(prefix, None) is not None:
                changed = True
            if stale:
                stale.discard(prefix)
        for prefix, value in announce.items():
            path = _path(value)
            if routes.get(prefix) != path:
                routes[prefix] = path
                changed = True
            if stale:
                stale.discard(prefix)
        return changed

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
        routes = self._routes.get(peer, {})
        for prefix in gone:
            routes.pop(prefix, None)
        if not stale:
            self._stale.pop(peer, None)
        return bool(gone)

    def expire(self, peer: str) -> bool:
        """The restart timer ran out: drop everything still stale."""
        stale = self._stale.pop(peer, set())
        routes = self._routes.get(peer, {})
        for prefix in stale:
            routes.pop(prefix, None)
        return bool(stale)

    def drop(self, peer: str) -> None:
        self._routes.pop(peer, None)
        self._stale.pop(peer, None)

    def is_stale(self, peer: str) -> bool:
        return bool(self._stale.get(peer))

    def count(self, peer: str) -> int:
        return len(self._routes.get(peer, ()))

    def peers(self) -> list[str]:
        return list(self._routes)

    def table(self, accepts: Callable[[str, str], bool]) -> dict[str, tuple[str, ...]]:
        """prefix -> next hops (ECMP, sorted) over every peer whose route `accepts(peer, prefix)`."""
        out: dict[str, set[str]] = {}
        for peer, routes in self._routes.items():
            for prefix, path in routes.items():
                if accepts(peer, prefix):
                    out.setdefault(prefix, set()).add(path[0])
        return {p: tuple(sorted(nhs, key=ipaddress.ip_address)) if len(nhs) > 1 else tuple(nhs)
                for p, nhs in out.items()}

    def paths(self, peer: str) -> Mapping[str, Path]:
        return self._routes.get(peer, {})
