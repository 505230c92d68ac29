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
class BGPConfigUpdate:
    """The speaker's settings, whole: its peers, the pools it imports, the communities it
    attaches to every export."""

    peers: tuple[Peer, ...]
    import_pools: frozenset[str]
    communities: tuple[str, ...]
