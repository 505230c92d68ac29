"""The lab's address families (`tortie-lab up --ip-family ipv4|ipv6|dual`).

The IPv4 plan (topology.py) stays the one plan; IPv6 addresses are derived from it one to
one, so every part of the lab has the same place in both families:

    10.99.C.D/24  <->  fd99:0:C::D/64        (C and D written as they are, read as hex)

`ipv4` configures the IPv4 side only (the lab as it always was), `dual` both, `ipv6` the
IPv6 side only: nodes, routers, etcd and the outside host have no IPv4 address at all
(IPv6-only nodes: BGP over IPv6, router IDs derived by the agents).
"""

from __future__ import annotations

import ipaddress

from tortie.errors import ValidationError

FAMILIES = ("ipv4", "ipv6", "dual")
DEFAULT_FAMILY = "ipv4"
DEFAULT_POOL6_CIDR = "fd65::/48"
DEFAULT_BLOCK_SIZE6 = 122
POOL_NAMES = {4: "default-ipv4", 6: "default-ipv6"}


def check(family: str) -> str:
    if family not in FAMILIES:
        raise ValidationError(f"--ip-family {family!r}: want one of {', '.join(FAMILIES)}", field="ip-family")
    return family


def versions(family: str) -> tuple[int, ...]:
    """The IP versions a lab of this family configures, IPv4 first."""
    return {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[check(family)]


def v6(address: str | None) -> str | None:
    """The IPv6 twin of a lab IPv4 address (with or without its prefix length)."""
    if address is None:
        return None
    ip, _, plen = address.partition("/")
    _, _, c, d = ip.split(".")
    out = str(ipaddress.IPv6Address(f"fd99:0:{c}::{d}"))
    return f"{out}/64" if plen else out


def of(address: str | None, version: int) -> str | None:
    """The lab address of one family: the IPv4 plan's address, or its IPv6 twin."""
    return address if version == 4 else v6(address)


def addresses(address: str | None, family: str) -> list[str]:
    """Every address one interface of the plan gets in a lab of `family`, IPv4 first."""
    return [a for v in versions(family) if (a := of(address, v))]


def bracket(ip: str) -> str:
    """An address as it goes into a URL's host part."""
    return f"[{ip}]" if ":" in ip else ip


def addr_lines(address: str | None, ifname: str, family: str) -> list[str]:
    """`ip -batch` lines that put an interface's addresses on it. IPv6 ones skip duplicate
    address detection: every lab address is unique by plan, and a tentative address would
    hold up the first second of traffic."""
    return [f"addr add {a} dev {ifname}" + (" nodad" if ":" in a else "") for a in addresses(address, family)]


def default_lines(gateways: tuple[str, ...] | list[str], family: str, verb: str = "add") -> list[str]:
    """The default route of each family over `gateways` (IPv4 addresses of the plan)."""
    out = []
    for v in versions(family):
        hops = [of(g, v) for g in gateways]
        if not hops:
            continue
        dst = "default" if v == 4 else "::/0"
        out.append(f"route {verb} {dst} via {hops[0]}" if len(hops) == 1 else
                   f"route {verb} {dst} " + " ".join(f"nexthop via {h}" for h in hops))
    return out


def forwarding_sysctls(family: str) -> list[tuple[str, str]]:
    """The sysctls that make a namespace forward the lab's families."""
    keys = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
    return [(keys[v], "1") for v in versions(family)]


def pool6_resource(cidr: str) -> dict:
    """The lab's default IPv6 pool, made at `up` beside default-ipv4."""
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": POOL_NAMES[6]},
            "spec": {"cidr": cidr, "blockSize": DEFAULT_BLOCK_SIZE6, "natOutgoing": False, "disabled": False}}


def node_env(address: str, family: str) -> dict[str, str]:
    """The agent's addresses: TORTIE_NODE_IP (IPv4) and TORTIE_NODE_IP6, as the lab has them."""
    names = {4: "TORTIE_NODE_IP", 6: "TORTIE_NODE_IP6"}
    return {names[v]: of(address, v) for v in versions(family)}


def ipam_config(family: str, pools: dict[str, int] | None = None) -> dict:
    """The CNI network config's ipam section for a pod of a lab of `family`. `pools`: the
    pod's pools by name with their IP version, each into its family's list (a family
    without one takes the node's pools of that family, as in Calico)."""
    conf: dict = {"type": "tortie-ipam", "assign_ipv4": 4 in versions(family), "assign_ipv6": 6 in versions(family)}
    for name, version in (pools or {}).items():
        conf.setdefault(f"ipv{version}_pools", []).append(name)
    return conf


def status_view(doc: dict, plan) -> dict:
    """The lab's status document for its families: `ip_family`, and beside each address of
    the plan the `addresses` the lab configured. An IPv6-only lab shows its IPv6 addresses
    where an IPv4 lab shows IPv4 ones (an IPv4 lab's document only gains the two keys)."""
    fam = plan.ip_family
    first = versions(fam)[0]
    doc["ip_family"] = fam

    def put(d: dict, *keys: str) -> None:
        for key in keys:
            if d.get(key):
                if key == "address":
                    d.setdefault("addresses", addresses(d[key], fam))
                d[key] = of(d[key], first)

    for n in doc["nodes"]:
        put(n, "address", "ip")
        for u in n["uplinks"]:
            put(u, "address", "gateway")
    for t in doc["tors"]:
        put(t, "address", "ip")
        for peer in t["peers"].values():
            put(peer, "address", "local")
    if doc.get("outside"):
        put(doc["outside"], "address", "ip")
    for m in doc["etcd"]["members"]:
        put(m, "address")
    u = doc["underlay"]
    u["subnets"] = addresses(u["subnet"], fam)
    u["subnet"] = u["subnets"][0]
    return doc
