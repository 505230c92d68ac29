"""ExaBGP's UPDATE messages into the RIB: what a message announces and withdraws, and
which prefixes each peer may give us (the import filter)."""

from __future__ import annotations

from collections.abc import Callable

from tortie.bgp.peers import Peer, prefix_filter

Path = tuple[str, str, tuple[str, ...]]  # (next hop, originator id, cluster list)


def parse_update(update: dict, router_id: str, cluster: str | None) -> tuple[dict[str, Path], list[str]] | None:
    """(announced {prefix: path}, withdrawn prefixes) of an UPDATE's `update` part, or None
    for our own route reflected back to us (RFC 4456 loop prevention)."""
    attrs = update.get("attribute") or {}
    originator = attrs.get("originator-id") or ""
    clusters = tuple(attrs.get("cluster-list") or ())
    if originator == router_id or (cluster in clusters):
        return None
    announce: dict[str, Path] = {}
    for family, by_nh in (update.get("announce") or {}).items():
        if not family.endswith("unicast"):
            continue
        for next_hop, nlris in by_nh.items():
            path = (next_hop, originator, clusters)
            local = _link_local(next_hop)
            for nlri in nlris:
                prefix = nlri.get("nlri") if isinstance(nlri, dict) else nlri
                # RFC 2545: a peer on the link sends its global IPv6 next hop and its
                # link-local one, which ExaBGP hands over as two next hops of the same
                # prefix. The global one is the next hop; the link-local one would need
                # the interface too (a kernel route via fe80:: without a device is refused).
                if prefix and not (local and prefix in announce and not _link_local(announce[prefix][0])):
                    announce[prefix] = path
    withdraw: list[str] = []
    for nlris in (update.get("withdraw") or {}).values():
        for nlri in nlris:
            prefix = nlri.get("nlri") if isinstance(nlri, dict) else nlri
            if prefix:
                withdraw.append(prefix)
    return announce, withdraw


def _link_local(next_hop: str) -> bool:
    """fe80::/10 (cheap: this runs for every learned route)."""
    head = next_hop.partition(":")[0] if ":" in next_hop else ""
    return len(head) == 4 and int(head, 16) & 0xFFC0 == 0xFE80


def import_filter(peer: Peer | None, import_pools: tuple[str, ...],
                  egress: frozenset[str] = frozenset()) -> Callable[[str], bool]:
    """What a peer may give us: node peers anything, external peers their acceptPrefixes
    and the IP pools; an unknown peer nothing. `egress`: the prefixes egress pools take from
    this peer (fromPeers): those go to the pools' tables only, never the learned table."""
    if peer is None:
        return lambda prefix: False
    if not peer.external:
        accepts = lambda prefix: True  # noqa: E731
    else:
        # Pod routes are always welcome: a top-of-rack router passing on another rack's
        # blocks (or a borrowed /32) must not need its own acceptPrefixes for them.
        accepts = prefix_filter(tuple(peer.accept_prefixes) + import_pools)
    if not egress:
        return accepts
    return lambda prefix: prefix not in egress and accepts(prefix)
