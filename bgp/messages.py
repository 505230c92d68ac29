"""Messages the calculation sends to the BGP export manager (through the dataplane driver)."""

from __future__ import annotations

from dataclasses import dataclass

from .peers import Peer


@dataclass(frozen=True, slots=True)
class ExportDelta:
    """Prefixes this node starts and stops announcing."""

    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ExportPolicy:
    """How the exports inside `cidr` are announced (the most specific policy holding a
    prefix applies; a prefix in none goes to every peer): to the peers in `peers` only
    (addresses; None: every peer), with `communities` besides the BGPConfiguration's, and
    with our AS `prepend` more times towards peers of another AS (towards a peer of our own
    AS it would read as a loop)."""

    cidr: str
    peers: frozenset[str] | None = None
    communities: tuple[str, ...] = ()
    prepend: int = 0


@dataclass(frozen=True, slots=True)
class BGPConfigUpdate:
    """The speaker's settings, whole: its peers, the pools it imports, the communities it
    attaches to every export, and the per-pool export policies (`IPPool.spec.bgp`, egress
    addresses)."""

    peers: tuple[Peer, ...]
    import_pools: frozenset[str]
    communities: tuple[str, ...]
    policies: tuple[ExportPolicy, ...] = ()
