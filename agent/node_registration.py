"""This node's Node resource, as the agent registers it at start: its BGP addresses and
AS number from the configuration, and every address of its own in `spec.addresses`."""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING

from tortie import errors
from tortie import log as tlog
from tortie.agent.calc_vxlan import DEVICE as VXLAN_DEVICE

if TYPE_CHECKING:
    from tortie.agent.config import AgentConfig
    from tortie.datastore.store import ResourceStore

log = tlog.get_logger("agent")

NODE_ADDRESS_TYPE = "CalicoNodeIP"  # the Node.spec.addresses entries the agent owns
VXLAN_DEVICES = frozenset(VXLAN_DEVICE.values())


def register_node(store: ResourceStore, name: str, cfg: AgentConfig) -> None:
    """Create or update this node's Node resource, keeping labels set by others."""
    try:
        node = store.get("node", name)
    except errors.NotFound:
        node = {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": name}, "spec": {}}
    bgp = node.setdefault("spec", {}).setdefault("bgp", {})
    if cfg.node_ip:
        bgp["ipv4Address"] = str(ipaddress.ip_interface(cfg.node_ip))
    if cfg.node_ip6:
        bgp["ipv6Address"] = str(ipaddress.ip_interface(cfg.node_ip6))
    if cfg.as_number:
        bgp["asNumber"] = cfg.as_number
    if not bgp:
        del node["spec"]["bgp"]
    # All of this node's own addresses (every uplink), so other nodes' natOutgoing
    # never translates traffic to any of them; entries of other types are kept.
    mine = local_addresses()
    others = [a for a in node["spec"].get("addresses", []) if a.get("type") != NODE_ADDRESS_TYPE]
    if mine or others:
        node["spec"]["addresses"] = others + [{"address": a, "type": NODE_ADDRESS_TYPE} for a in mine]
    store.apply(node)


def local_addresses() -> list[str]:
    """The global-scope addresses on this namespace's interfaces (pod veths carry none),
    with their prefix ("10.0.1.5/24": the subnet each uplink is on)."""
    import subprocess

    proc = subprocess.run(["ip", "-j", "address", "show", "scope", "global"], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("cannot list the node's addresses", error=proc.stderr.strip())
        return []
    # not the VXLAN devices' tunnel addresses: those are the pools', handed out by IPAM
    found = {str(ipaddress.ip_interface(f"{a['local']}/{a.get('prefixlen', 128 if ':' in a['local'] else 32)}"))
             for link in json.loads(proc.stdout or "[]") if link.get("ifname") not in VXLAN_DEVICES
             for a in link.get("addr_info", []) if a.get("local")}
    return sorted(found, key=lambda a: (ipaddress.ip_interface(a).version, ipaddress.ip_interface(a)))
