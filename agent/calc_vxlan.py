"""The VXLAN overlay's desired state for one node, from the datastore (pure, no I/O).

A pool with `vxlanMode: Always` reaches other nodes' blocks through the node's VXLAN
device; with `CrossSubnet` only the blocks of nodes on another subnet than this node's
(the rest go straight to the node: no encapsulation where the fabric routes). `Never`
leaves the pool to BGP. As in Calico, every node is a VTEP (VXLAN tunnel end point) whose
tunnel address comes from a VXLAN pool's IPAM (`Node.spec.ipv4VXLANTunnelAddr`, written
by `agent.vxlan_addr`) and whose MAC is `Node.spec.vxlanTunnelMACAddr` or derived from the
node's name; nodes learn each other's VTEPs from the datastore, never by flooding, so the
device has learning off and every remote VTEP is one FDB entry (MAC -> node address) and
one permanent neighbour (tunnel address -> MAC).

`VxlanCalc.update(state)` recomputes the plan when a key it reads changed (pools, nodes,
block affinities: a few per node) and returns the messages for the driver: the device,
FDB and neighbour entries whole (`VxlanUpdate`), and the routes as a `RouteDelta` of class
"vxlan" (which wins over learned BGP routes for the same block).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from tortie.datastore import keys
from tortie.routing.messages import RouteDelta
from tortie.routing.model import Route
from tortie.routing.vxlan_model import (
    DEVICE,
    MODES,
    OVERHEAD,
    PORT,
    VTEP,
    VXLAN_CLASS,
    Device,
    VxlanUpdate,
)

# The values are the routing layer's (routing.vxlan_model); re-exported for the agent.
__all__ = ["DEVICE", "MODES", "OVERHEAD", "PORT", "VTEP", "VXLAN_CLASS", "Device", "VxlanCalc", "VxlanUpdate",
           "plan", "vtep_mac"]


def vtep_mac(node: str) -> str:
    """A node's VTEP MAC when none is set: stable across restarts (the other nodes' FDB
    entries stay right), locally administered and unicast (first byte xxxxxx10)."""
    b = bytearray(hashlib.sha256(node.encode()).digest()[:6])
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _underlay(node, family: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    addr = node.ipv4_address if family == 4 else node.ipv6_address
    return ipaddress.ip_interface(addr) if addr else None


def _tunnel(node, family: int) -> str | None:
    return node.vxlan_tunnel_addr if family == 4 else node.vxlan_tunnel_addr6


def vxlan_pools(state, family: int) -> list:
    return [p for p in state.pools.values() if p.vxlan_mode != "Never" and p.version == family]


def device_mtu(pools, me, family: int, uplink_mtu: int) -> int:
    """The node's setting, else the smallest the pools ask for, else the uplink's MTU
    minus the encapsulation (a pod never sends what the device must fragment)."""
    if me is not None and me.vxlan_mtu:
        return me.vxlan_mtu
    asked = [p.vxlan_mtu for p in pools if p.vxlan_mtu]
    return min(asked) if asked else uplink_mtu - OVERHEAD[family]


def plan(state, node: str, uplink_mtu: int = 1500) -> tuple[VxlanUpdate, dict]:
    """(VxlanUpdate, {route key: Route}) for `node`: the whole desired overlay."""
    me = state.nodes.get(node)
    devices, vteps, routes = [], [], {}
    for family in (4, 6):
        pools = vxlan_pools(state, family)
        mine = _underlay(me, family) if me else None
        if not pools or mine is None or not _tunnel(me, family):
            continue
        name = DEVICE[family]
        devices.append(Device(name, family, pools[0].vxlan_vni,
                              str(mine.ip), me.vxlan_mac or vtep_mac(node),
                              device_mtu(pools, me, family, uplink_mtu), _tunnel(me, family)))
        remote: dict[str, VTEP] = {}
        for other in state.nodes.values():
            addr, tunnel = _underlay(other, family), _tunnel(other, family)
            if other.name == node or addr is None or not tunnel:
                continue
            remote[other.name] = VTEP(other.name, tunnel, other.vxlan_mac or vtep_mac(other.name), str(addr.ip))
            vteps.append((family, remote[other.name]))
        nets = [(ipaddress.ip_network(p.cidr), p.vxlan_mode) for p in pools]
        routes.update(_routes(state, node, family, Link(name, mine, remote, nets)))
    return VxlanUpdate(tuple(devices), tuple(vteps)), routes


@dataclass(frozen=True, slots=True)
class Link:
    """What routing one family through the overlay needs to know."""

    device: str
    mine: ipaddress.IPv4Interface | ipaddress.IPv6Interface  # this node's underlay, with its subnet
    remote: dict  # node -> VTEP
    nets: list  # (pool network, mode)

    def route(self, dst, owner: str) -> Route | None:
        mode = next((m for n, m in self.nets if n.version == dst.version and dst.subnet_of(n)), None)
        if mode is None or owner not in self.remote:
            return None
        peer = self.remote[owner]
        if mode == "CrossSubnet" and ipaddress.ip_address(peer.underlay) in self.mine.network:
            # Same subnet: straight to the node, as the fabric carries it (no BGP needed).
            return Route(str(dst), gateways=(peer.underlay,))
        return Route(str(dst), dev=self.device, gateways=(peer.tunnel,), onlink=True)


def _routes(state, node: str, family: int, link: Link) -> dict:
    """Other nodes' confirmed blocks of VXLAN pools, and the addresses their pods borrowed
    from blocks not their node's (this node's too): host routes to their node, more
    specific than the block's route or blackhole."""
    blocks_of: dict[str, list] = {}
    for (owner, block), confirmed in state.affinities.items():
        if confirmed:
            blocks_of.setdefault(owner, []).append(ipaddress.ip_network(block))
    found = [link.route(block, owner) for owner, blocks in blocks_of.items() if owner != node for block in blocks]
    for wep in state.weps.values():
        if wep.node == node or wep.node not in link.remote:
            continue
        for cidr in wep.ip_networks:
            addr = ipaddress.ip_interface(cidr).ip
            if addr.version == family and not any(addr in b for b in blocks_of.get(wep.node, ())):
                found.append(link.route(ipaddress.ip_network(addr), wep.node))
    return {r.key: r for r in found if r is not None}


class VxlanCalc:
    """The last plan sent, so only what changed goes to the driver."""

    def __init__(self, node: str, uplink_mtu: int = 1500) -> None:
        self.node = node
        self.uplink_mtu = uplink_mtu
        self.sent: VxlanUpdate | None = None
        self.routes: dict = {}
        self.dirty = True

    def note(self, relative_key: str | None) -> None:
        """A datastore key (relative to the prefix) changed: recompute only for what the
        plan reads (pools, nodes, block affinities)."""
        if relative_key is None:
            return
        found = keys.parse_resource(relative_key)
        if (found is not None and found[0] in ("ippool", "node")) or keys.parse_affinity(relative_key):
            self.dirty = True
        elif found is not None and found[0] == "workloadendpoint" and self.sent and self.sent.devices:
            self.dirty = True  # a pod elsewhere may hold an address borrowed from another block

    def update(self, state) -> list:
        if not self.dirty:
            return []
        self.dirty = False
        want, routes = plan(state, self.node, self.uplink_mtu)
        first = self.sent is None  # the first time, say it all (even "nothing")
        msgs: list = []
        if want != self.sent:
            self.sent = want
            msgs.append(want)
        changed = tuple(r for k, r in routes.items() if self.routes.get(k) != r)
        removed = tuple(k for k in self.routes if k not in routes)
        if changed or removed or first:
            msgs.append(RouteDelta(VXLAN_CLASS, changed, removed))
        self.routes = routes
        return msgs

    def pod_mtu(self, state, ips: list[str]) -> int:
        """The MTU of a pod with these addresses: its VXLAN pool's device MTU (0: leave
        the default, as for pools that never encapsulate)."""
        me = state.nodes.get(self.node)
        out = []
        for ip in ips:
            addr = ipaddress.ip_address(ip.split("/")[0])
            pools = vxlan_pools(state, addr.version)
            if any(addr in ipaddress.ip_network(p.cidr) for p in pools):
                out.append(device_mtu(pools, me, addr.version, self.uplink_mtu))
        return min(out) if out else 0

    def status(self, error: str | None) -> list[dict]:
        """Per device wanted: what it is and whether it is in place (node status, metrics);
        `error` is the VXLAN manager's last failure (None: its last apply succeeded)."""
        if self.sent is None:
            return []
        return [{"device": d.name, "vni": d.vni, "address": d.address, "mac": d.mac, "mtu": d.mtu,
                 "vteps": sum(1 for f, _ in self.sent.vteps if f == d.family), "up": error is None,
                 "reason": error} for d in self.sent.devices]
