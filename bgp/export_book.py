"""What this node announces, and to whom: the speaker's export books.

The wanted side is a prefix -> its ExportPolicy (the most specific one holding it, None for
every peer); the told side is what ExaBGP was told per prefix, {peer: attribute text} of
the established sessions (ExaBGP keeps no adj-rib-out of its own to ask). `diff()` turns
the two into API lines grouped so that one line carries many prefixes; `commit()` moves the
books only once those lines are sent, so a broken stream leaves the old books.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable

from tortie.bgp.api import announce_lines, withdraw_lines
from tortie.bgp.messages import ExportPolicy
from tortie.bgp.peers import Peer, prefix_filter
from tortie.bgp.rib import family_of
from tortie.errors import ValidationError


def community_attrs(comms: tuple[str, ...]) -> str:
    """` community [ .. ] large-community [ .. ]` for ExaBGP, from `AS:VALUE` / `A:B:C`."""
    standard = [c for c in comms if c.count(":") == 1]
    large = [c for c in comms if c.count(":") == 2]
    if len(standard) + len(large) != len(comms):
        raise ValidationError(f"communities must be AS:VALUE or A:B:C, got {list(comms)}", field="communities")
    out = ""
    if standard:
        out += " community [ " + " ".join(standard) + " ]"
    if large:
        out += " large-community [ " + " ".join(large) + " ]"
    return out


def target(peers: Iterable[str]) -> str:
    """The API's neighbor selector naming these sessions."""
    return " , ".join(f"neighbor {a}" for a in peers)


class ExportBook:
    def __init__(self) -> None:
        self.wanted: dict[str, ExportPolicy | None] | None = None  # None: the agent has not said yet
        self.told: dict[str, dict[str, str]] = {}
        self.sent: Counter[str] = Counter()  # prefixes per peer (status)
        self._communities: tuple[str, ...] = ()  # on every export (BGPConfiguration)
        self._policies: tuple[ExportPolicy, ...] = ()
        self._resolve: list[tuple[Callable[[str], bool], ExportPolicy]] = []  # most specific first

    def set(self, prefixes: Iterable[str], communities: Iterable[str] = (),
            policies: Iterable[ExportPolicy] = ()) -> None:
        """See BGPSpeaker.set_exports."""
        comms = tuple(sorted(set(communities)))
        community_attrs(comms)  # refused here, not later on the API stream
        policies = tuple(policies)
        for pol in policies:
            community_attrs(pol.communities)
        if policies != self._policies:
            self._policies = policies
            # most specific first: an egress address's /32 inside a pool's range is its own
            self._resolve = [(prefix_filter((pol.cidr,)), pol) for pol in
                             sorted(policies, key=lambda pol: -ipaddress.ip_network(pol.cidr).prefixlen)]
        self._communities = comms
        resolve = self._resolve
        exports: dict[str, ExportPolicy | None] = {}
        for p in prefixes:
            prefix = str(ipaddress.ip_network(p, strict=False))
            exports[prefix] = next((pol for inside, pol in resolve if inside(prefix)), None)
        self.wanted = exports

    def forget(self) -> None:
        """A new ExaBGP holds nothing of ours."""
        self.told = {}

    def diff(self, up: dict[str, Peer], fresh: set[str], local_as: int,
             batch: int) -> tuple[list[str], dict, int, int]:
        """The API lines that make each established peer hold exactly its exports (`fresh`:
        sessions that just came up and hold nothing), the entries of the books that change
        once they are sent, and how many prefixes are announced and withdrawn."""
        withdraw, announce, held = self._diff(up, fresh, local_as)
        lines = []
        for peers, prefixes in withdraw.items():
            lines += withdraw_lines(target(peers), prefixes, batch)
        for (attrs, peers), prefixes in announce.items():
            lines += announce_lines(target(peers), attrs, prefixes, batch)
        return lines, held, sum(map(len, announce.values())), sum(map(len, withdraw.values()))

    def commit(self, held: dict[str, dict[str, str]]) -> None:
        for prefix, peers in held.items():
            if peers:
                self.told[prefix] = peers
            else:
                self.told.pop(prefix, None)

    def count(self) -> None:
        self.sent = Counter(a for peers in self.told.values() for a in peers)

    def _diff(self, up: dict[str, Peer], fresh: set[str], local_as: int) -> tuple[dict, dict, dict]:
        """Withdrawals {peers: [prefix]} and announcements {(attrs, peers): [prefix]}, and
        the books' new entries {prefix: {peer: attrs}}."""
        exports, announced = self.wanted or {}, self.told
        audiences: dict[tuple, dict[str, str]] = {}
        withdraw: dict[tuple[str, ...], list[str]] = {}
        announce: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        nothing: dict[str, str] = {}
        held: dict[str, dict[str, str]] = {}
        for prefix in [*exports, *(p for p in announced if p not in exports)]:
            if prefix in exports:
                family = family_of(prefix)
                pol = exports[prefix]
                want = audiences.get((pol, family))
                if want is None:
                    want = audiences[(pol, family)] = self._audience(pol, family, up, local_as)
            else:
                want = nothing
            have = old = announced.get(prefix, nothing)
            if fresh and have:
                have = {a: attrs for a, attrs in have.items() if a not in fresh}
            differs = want != have
            if differs:
                gone = tuple(a for a in have if a not in want and a in up)
                if gone:
                    withdraw.setdefault(gone, []).append(prefix)
                by_attrs: dict[str, list[str]] = {}
                for a, attrs in want.items():
                    if have.get(a) != attrs:
                        by_attrs.setdefault(attrs, []).append(a)
                for attrs, peers in by_attrs.items():
                    announce.setdefault((attrs, tuple(peers)), []).append(prefix)
            if differs if have is old else want != old:
                held[prefix] = want  # also when a down peer only leaves the books (nothing sent)
        return withdraw, announce, held

    def _audience(self, pol: ExportPolicy | None, family: str, up: dict[str, Peer],
                  local_as: int) -> dict[str, str]:
        """The established peers of `family` that a prefix under `pol` goes to, and the
        attributes each gets."""
        comms = self._communities + (pol.communities if pol else ())
        attrs = "next-hop self" + community_attrs(tuple(sorted(set(comms))))
        prepended = attrs
        if pol and pol.prepend:
            asn = str(local_as)
            prepended += " as-path [ " + " ".join([asn] * (pol.prepend + 1)) + " ]"
        return {a: prepended if peer.as_number != local_as else attrs
                for a, peer in sorted(up.items()) if family_of(a) == family
                and (pol is None or pol.peers is None or a in pol.peers)}
