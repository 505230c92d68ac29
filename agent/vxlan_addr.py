"""A node's VTEP address: taken from a VXLAN pool's IPAM and kept on its Node resource.

As Calico does (handle `vxlan-tunnel-addr-<node>`, `Node.spec.ipv4VXLANTunnelAddr`): while
some enabled pool with `vxlanMode` Always or CrossSubnet selects the node, the node holds
one address of it (from its own block, like a pod) and names it on its Node, where every
other node reads it; when no such pool is left (or the address is in none of them any
more) the address is released and the field cleared. Blocking (etcd): the agent runs it
off the loop, one run at a time, again when the pools or the node change.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from tortie import errors
from tortie.datastore.ipam_blocks import tunnel_handle
from tortie.log import get_logger

log = get_logger("vxlan")

FIELD = {4: "ipv4VXLANTunnelAddr", 6: "ipv6VXLANTunnelAddr"}


def wanted_pools(pools, me, family: int, *, disabled: bool = False) -> list:
    """The VXLAN pools of a family that select this node (by name); disabled ones too if
    asked (an address held in one is kept: disabling a pool stops new addresses only)."""
    return sorted((p for p in pools if p.vxlan_mode != "Never" and (disabled or not p.disabled)
                   and p.version == family and p.selects(me.labels)), key=lambda p: p.name)


def inputs(me, pools) -> tuple | None:
    """What `reconcile` decides by: when it is unchanged, so is its answer."""
    if me is None:
        return None
    return (me.name, me.labels, me.vxlan_tunnel_addr, me.vxlan_tunnel_addr6,
            tuple(sorted((p.name, p.cidr, p.vxlan_mode, p.disabled, p.node_selector) for p in pools)))


def reconcile(store, ipam, me, pools) -> dict[int, str | None]:
    """Make the Node's tunnel addresses match the VXLAN pools; returns them by family.
    `me` (the Node view, for its name and labels) and `pools` are the loop's, copied: this
    runs on another thread. What the Node and the handle hold is read fresh from etcd (the
    loop's view may not have seen our last write yet), so a run again never takes a second
    address; an address the handle holds is reused (a crash between the allocation and the
    Node's write leaks nothing)."""
    out: dict[int, str | None] = {}
    if me is None:
        return out
    node = me.name
    spec = store.get("node", node).get("spec", {})
    held = ipam.ips_by_handle(tunnel_handle(node))
    for family in (4, 6):
        have = spec.get(FIELD[family])
        usable = wanted_pools(pools, me, family)
        ours = [ip for ip in held if ipaddress.ip_address(ip).version == family]
        fits = [ip for ip in ([have] if have else []) + ours
                if any(ipaddress.ip_address(ip) in p.network for p in wanted_pools(pools, me, family, disabled=True))]
        new = fits[0] if fits else None
        if new is None and usable:
            counts = {"num_v4": 1, "num_v6": 0} if family == 4 else {"num_v4": 0, "num_v6": 1}
            new = ipam.auto_assign(tunnel_handle(node), node, pools=[p.name for p in usable],
                                   attrs={"node": node}, **counts)[0]
        if new != have:
            _set_field(store, node, FIELD[family], new)
            log.info("VXLAN tunnel address", node=node, family=family, address=new, was=have)
        stale = [ip for ip in {*ours, *([have] if have else [])} if ip != new]
        if stale:
            ipam.release_ips(stale)
        out[family] = new
    return out


def _set_field(store, node: str, field: str, value: str | None) -> None:
    for _ in range(5):
        res = store.get("node", node)
        spec = res.setdefault("spec", {})
        if spec.get(field) == value:
            return
        if value is None:
            spec.pop(field, None)
        else:
            spec[field] = value
        try:
            store.apply(res)  # guarded by the resourceVersion read
            return
        except errors.Conflict:
            continue
    raise errors.Conflict(f"could not write {field} on node {node}")


def uplink_mtu(node_ip: str | None, default: int = 1500) -> int:
    """The MTU of the interface that holds the node's address (the underlay)."""
    if not node_ip:
        return default
    want = node_ip.split("/")[0]
    proc = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True)
    for link in json.loads(proc.stdout or "[]") if proc.returncode == 0 else ():
        if any(a.get("local") == want for a in link.get("addr_info", [])):
            return int(link.get("mtu", default))
    return default
