"""natOutgoing: traffic from a pool with natOutgoing to a destination outside every pool
(and not to a node) leaves masqueraded to the node's address. Calico's meaning.

A `tortie.dataplane.Manager` over two tables tortie owns, `ip tortie-nat` and `ip6
tortie-nat`, each present only while a pool of its family asks for NAT:

    set nat-pools, all-pools (interval), nodes      the inputs, changed element by element
    chain postrouting (nat, srcnat)                 one rule, never rewritten in steady state:
        ip saddr @nat-pools ip daddr != @all-pools ip daddr != @nodes masquerade

`on_update(NatUpdate)` sets the desired elements; `apply()` writes only the elements that
changed, both families in one transaction; `resync()` makes the next apply list the
tables and repair what differs.
"""

from __future__ import annotations

import ipaddress

from tortie.log import get_logger
from tortie.policy.messages import NatUpdate
from tortie.policy.nftables import Base, Chain, Nft, NftTable, Obj, TablesManager

log = get_logger("nat")

TABLE = "tortie-nat"
FAMILIES = {4: "ip", 6: "ip6"}
SRCNAT = 100


def _of_version(version: int, items: frozenset[str], parse=ipaddress.ip_network) -> dict[str, str]:
    """The set elements of one family, written as nft lists them back."""
    return {str(parse(c)): "" for c in items if parse(c).version == version}


class NatManager(TablesManager):
    name = "nat"

    def __init__(self, nft: Nft | None = None, *, netns: str | None = None) -> None:
        self.by_version: dict[int, NftTable] = {}
        for version, fam in FAMILIES.items():
            table = NftTable(fam, TABLE)
            addr = "ipv4_addr" if version == 4 else "ipv6_addr"
            table.objects.set_desired("nat-pools", Obj("set", addr, flags=("interval",)))
            table.objects.set_desired("all-pools", Obj("set", addr, flags=("interval",)))
            table.objects.set_desired("nodes", Obj("set", addr))
            # Pod-to-pod and pod-to-node keep the pod's address (the Kubernetes model).
            rule = f"{fam} saddr @nat-pools {fam} daddr != @all-pools {fam} daddr != @nodes masquerade"
            table.chains.set_desired("postrouting", Chain((rule,), Base("nat", "postrouting", SRCNAT)))
            self.by_version[version] = table
        super().__init__(self.by_version.values(), nft, netns)
        self.nat_pools: frozenset[str] = frozenset()

    def on_update(self, msg: object) -> None:
        if not isinstance(msg, NatUpdate):
            return
        self.nat_pools = msg.nat_pools
        for version, table in self.by_version.items():
            nat = _of_version(version, msg.nat_pools)
            table.want = bool(nat)
            table.set_elements("nat-pools", nat)
            table.set_elements("all-pools", _of_version(version, msg.all_pools))
            table.set_elements("nodes", _of_version(version, msg.node_addresses, ipaddress.ip_address))

    def applied(self) -> None:
        log.info("nat tables applied", nat_pools=sorted(self.nat_pools))
