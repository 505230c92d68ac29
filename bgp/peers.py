"""The BGP peers of one node, computed from the datastore (pure).

Calico's rules, as tortie applies them:

- Node-to-node mesh (`BGPConfiguration.nodeToNodeMeshEnabled`, default on): every node
  that is not a route reflector peers with every other such node, per address family.
  Of each pair, the side whose *peer* has the higher address is passive, so exactly one
  side dials and the two never collide (Calico's BIRD template does the same).
- Route reflectors: a node with `routeReflectorClusterID` leaves the mesh. Reflectors
  peer with each other (kind "reflector") and with every non-reflector node, which they
  treat as route-reflector clients ("rr-client"); non-reflectors peer with every
  reflector ("reflector"). The same passive rule applies between nodes.
- BGPPeer resources: `node` (one node), `nodeSelector` (the nodes it matches), or
  neither (global: every node). The far end is `peerIP` (external, kind "global"/"node")
  or, with `peerSelector`, the matching nodes (kind "node"/"global", same as above but
  between nodes, so the passive rule applies). External peers only import prefixes inside
  the IP pools (the speaker's import pools) or listed in their `acceptPrefixes`.

A peer reached by several rules is kept once; the first rule in the order mesh,
reflector, BGPPeer wins, because a mesh session already carries everything.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEFAULT_AS = 64512
# An external peer (a router) with no maxPrefixes: enough for the routes a fabric gives a
# node (pod blocks, defaults, the bench's 10,000), far below what would exhaust it.
DEFAULT_MAX_PREFIXES_EXTERNAL = 50_000
KINDS = ("mesh", "global", "node", "reflector", "rr-client")


@dataclass(frozen=True)
class Peer:
    """One BGP session as the speaker configures it."""

    address: str
    as_number: int
    port: int = 179
    password: str | None = None
    hold_time: int | None = None
    keepalive: int | None = None
    kind: str = "mesh"  # one of KINDS
    passive: bool = False
    route_reflector_client: bool = False
    accept_prefixes: tuple[str, ...] = ()  # import filter; only for external peers
    name: str = ""  # the Node or BGPPeer it comes from, for status
    local_address: str | None = None  # speak from this address (None: the node's BGP address)
    # BFD timers (minTx ms, minRx ms, multiplier): while its session is not Up, the routes
    # this peer is the next hop of are left out (the agent runs the sessions)
    bfd: tuple[int, int, int] | None = None
    # more prefixes than this from the peer close its session for a while (None: no limit)
    max_prefixes: int | None = None

    @property
    def external(self) -> bool:
        """Not another tortie node: imports are filtered by accept_prefixes."""
        return self.kind in ("global", "node") and not self.name.startswith("node:")

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    def accepts(self, prefix: str) -> bool:
        """Whether a prefix learned from this peer may be imported."""
        if not self.external:
            return True
        return _within(prefix, self.accept_prefixes)


def _within(prefix: str, allowed: tuple[str, ...]) -> bool:
    return prefix_filter(allowed)(prefix)


@lru_cache(maxsize=256)
def prefix_filter(allowed: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a prefix lies within one of `allowed`, as a function compiled once: it runs
    for every learned route (integer arithmetic, no ipaddress objects)."""
    nets: dict[int, list[tuple[int, int, int]]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for fam, net, nlen in _networks(allowed):
        shift = (128 if fam == socket.AF_INET6 else 32) - nlen
        nets[fam].append((shift, net >> shift, nlen))
    v4, v6 = tuple(nets[socket.AF_INET]), tuple(nets[socket.AF_INET6])
    inet_pton, from_bytes, af4, af6 = socket.inet_pton, int.from_bytes, socket.AF_INET, socket.AF_INET6

    def within(prefix: str) -> bool:
        addr, _, length = prefix.partition("/")
        family, bits, candidates = (af6, 128, v6) if ":" in addr else (af4, 32, v4)
        if not candidates:
            return False
        try:
            value = from_bytes(inet_pton(family, addr), "big")
            plen = int(length) if length else bits
        except (OSError, ValueError):
            return False
        for shift, net, nlen in candidates:
            if plen >= nlen and value >> shift == net:
                return True
        return False

    return within


@lru_cache(maxsize=1024)
def _networks(allowed: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for cidr in allowed:
        net = ipaddress.ip_network(cidr, strict=False)
        out.append((socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                    int(net.network_address), net.prefixlen))
    return tuple(out)


def _addresses(node: Any) -> dict[int, str]:
    """The bare BGP addresses of a node, by IP version."""
    out: dict[int, str] = {}
    for cidr in (getattr(node, "ipv4_address", None), getattr(node, "ipv6_address", None)):
        if cidr:
            addr = ipaddress.ip_interface(cidr).ip
            out[addr.version] = str(addr)
    return out


def _higher(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) > ipaddress.ip_address(b)


def _as_of(node: Any, default_as: int) -> int:
    return getattr(node, "as_number", None) or default_as


def compute_peers(node: Any, nodes: Sequence[Any], bgp_peers: Iterable[Any], config: Any) -> list[Peer]:
    """The peers `node` should have, sorted by address.

    `node`/`nodes` are `datastore.resources.Node` views, `bgp_peers` BGPPeer views and
    `config` the effective BGPConfiguration (any objects with those attribute names).
    """
    default_as = getattr(config, "as_number", None) or DEFAULT_AS
    mesh_on = getattr(config, "node_to_node_mesh", None)
    if mesh_on is None:
        mesh_on = getattr(config, "node_to_node_mesh_enabled", True)
    mine = _addresses(node)
    others = [n for n in nodes if n.name != node.name]
    is_rr = bool(getattr(node, "route_reflector_cluster_id", None))
    found: dict[tuple[str, int], Peer] = {}

    def add_node_peer(other: Any, kind: str, *, rr_client: bool = False, **extra: Any) -> None:
        for version, addr in _addresses(other).items():
            local = mine.get(version)
            if local is None or addr == local or (addr, 179) in found:
                continue
            found[(addr, 179)] = Peer(
                address=addr, as_number=_as_of(other, default_as), kind=kind,
                passive=_higher(addr, local), route_reflector_client=rr_client,
                name=f"node:{other.name}", **extra)

    if mesh_on and not is_rr:
        for other in others:
            if not getattr(other, "route_reflector_cluster_id", None):
                add_node_peer(other, "mesh")
    for other in others:
        other_rr = bool(getattr(other, "route_reflector_cluster_id", None))
        if is_rr and other_rr:
            add_node_peer(other, "reflector")
        elif is_rr:
            add_node_peer(other, "rr-client", rr_client=True)
        elif other_rr:
            add_node_peer(other, "reflector")

    for bp in sorted(bgp_peers, key=lambda p: p.name):
        if not bp.applies_to(node):
            continue
        kind = "global" if bp.node is None and bp.node_selector is None else "node"
        hold = getattr(bp, "hold_time", None)
        timers = dict(password=getattr(bp, "password", None) or None, hold_time=hold,
                      keepalive=getattr(bp, "keepalive_time", None), bfd=getattr(bp, "bfd", None),
                      max_prefixes=getattr(bp, "max_prefixes", None))
        if bp.peer_ip:
            addr = str(ipaddress.ip_address(bp.peer_ip))
            version = ipaddress.ip_address(addr).version
            port = getattr(bp, "port", 179) or 179
            if mine.get(version) in (None, addr) or (addr, port) in found:
                continue  # no address of that family here, or it names this node itself
            found[(addr, port)] = Peer(
                address=addr, as_number=bp.as_number or default_as, port=port, kind=kind,
                passive=bool(getattr(bp, "passive", False)),
                accept_prefixes=tuple(getattr(bp, "accept_prefixes", ()) or ()),
                name=bp.name, **{**timers, "max_prefixes": timers["max_prefixes"] or DEFAULT_MAX_PREFIXES_EXTERNAL})
        else:  # peerSelector: the nodes it picks (none without one)
            for other in bp.peer_nodes(others):
                add_node_peer(other, kind, **timers)
    return sorted(found.values(), key=lambda p: (ipaddress.ip_address(p.address).version,
                                                 ipaddress.ip_address(p.address), p.port))
