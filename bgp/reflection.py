"""Route reflection (RFC 4456) for a node with route-reflector clients: ExaBGP does not
reflect, so the speaker passes learned routes on itself, with originator id and cluster
list, and keeps track of what each peer was told."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from tortie.bgp.api import announce_lines, withdraw_lines
from tortie.bgp.peers import Peer
from tortie.bgp.rib import LearnedRoutes, family_of
from tortie.bgp.session import PeerState

NODE_KINDS = ("mesh", "reflector", "rr-client")


def cluster_id(peers: Mapping[str, Peer], configured: str | None, router_id: str) -> str | None:
    """Set when this node reflects (it has route-reflector clients): the configured
    routeReflectorClusterID, else the router id."""
    if not any(p.route_reflector_client for p in peers.values()):
        return None
    return configured or router_id


def reflection(peers: Mapping[str, Peer], states: Mapping[str, PeerState], rib: LearnedRoutes,
               cluster: str | None) -> dict[str, dict[str, str]]:
    """For each established node peer, the routes this reflector should pass it:
    {peer: {prefix: attribute text}} (RFC 4456: from a client to every other node
    peer, from a non-client to clients only; one path per prefix, next hop kept)."""
    if cluster is None:
        return {}
    node_peers = {a: p for a, p in peers.items() if p.kind in NODE_KINDS
                  and (st := states.get(a)) is not None and st.state == "established"}
    best: dict[str, tuple[str, tuple[str, str, tuple[str, ...]]]] = {}  # prefix -> (source, path)
    for source in sorted(rib.peers(), key=ipaddress.ip_address):
        if source not in peers or peers[source].kind not in NODE_KINDS:
            continue
        for prefix, path in rib.paths(source).items():
            best.setdefault(prefix, (source, path))
    out: dict[str, dict[str, str]] = {t: {} for t in node_peers}
    for prefix, (source, (next_hop, originator, clusters)) in best.items():
        from_client = peers[source].route_reflector_client
        originator = originator or states[source].router_id or source
        attrs = (f"next-hop {next_hop} originator-id {originator} "
                 f"cluster-list [ {' '.join((cluster, *clusters))} ]")
        for target, peer in node_peers.items():
            if target == source or family_of(target) != family_of(prefix):
                continue
            if from_client or peer.route_reflector_client:
                out[target][prefix] = attrs
    return out


def reflection_lines(reflected: dict[str, dict[str, str]], want: Mapping[str, Mapping[str, str]],
                     batch: int) -> list[str]:
    """The commands that take each peer from what it was told (`reflected`, updated in
    place) to what it should be told (`want`)."""
    lines: list[str] = []
    for target in list(reflected):
        if target not in want:
            del reflected[target]  # gone or down: its session starts from nothing
    for target, routes in want.items():
        have = reflected.setdefault(target, {})
        gone = [p for p in have if p not in routes]
        lines += withdraw_lines(f"neighbor {target}", gone, batch)
        by_attrs: dict[str, list[str]] = {}
        for prefix, attrs in routes.items():
            if have.get(prefix) != attrs:
                by_attrs.setdefault(attrs, []).append(prefix)
        for attrs, prefixes in by_attrs.items():
            lines += announce_lines(f"neighbor {target}", attrs, prefixes, batch)
        reflected[target] = dict(routes)
    return lines
