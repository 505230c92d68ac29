"""natOutgoing: traffic from a pool with natOutgoing to a destination outside every pool
(and not to a node) leaves masqueraded to the node's address. Calico's meaning. Egress
addresses (`IPPool.spec.egress.address`): the same traffic of such a pool leaves
source-NATed to the pool's address instead, whatever natOutgoing says.

A `tortie.dataplane.Manager` over two tables tortie owns, `ip tortie-nat` and `ip6
tortie-nat`, each present only while a pool of its family asks for NAT or has an egress
address:

    set nat-pools, all-pools (interval), nodes      the inputs, changed element by element
    map egress-addresses (interval): pool -> address
    chain postrouting (nat, srcnat)                 two rules, never rewritten in steady state:
        ip daddr != @all-pools ip daddr != @nodes snat ip to ip saddr map @egress-addresses
        ip saddr @nat-pools ip daddr != @all-pools ip daddr != @nodes masquerade

A source in no pool of the map makes the lookup fail, which ends the first rule without a
match. Replies are un-NATed by conntrack, so only the node that translated a flow can
take its replies (see the README on egress addresses and several nodes).

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
            table.objects.set_desired("egress-addresses", Obj("map", addr, addr, flags=("interval",)))
            # Pod-to-pod and pod-to-node keep the pod's address (the Kubernetes model).
            outside = f"{fam} daddr != @all-pools {fam} daddr != @nodes"
            rules = (f"{outside} snat {fam} to {fam} saddr map @egress-addresses",
                     f"{fam} saddr @nat-pools {outside} masquerade")
            table.chains.set_desired("postrouting", Chain(rules, Base("nat", "postrouting", SRCNAT)))
            self.by_version[version] = table
        super().__init__(self.by_version.values(), nft, netns)
        self.nat_pools: frozenset[str] = frozenset()
        self.egress: frozenset[tuple[str, str]] = frozenset()

    def on_update(self, msg: object) -> None:
        if not isinstance(msg, NatUpdate):
            return
        self.nat_pools = msg.nat_pools
        self.egress = msg.egress_addresses
        for version, table in self.by_version.items():
            nat = _of_version(version, msg.nat_pools)
            egress = {str(ipaddress.ip_network(c)): str(ipaddress.ip_address(a))
                      for c, a in msg.egress_addresses if ipaddress.ip_network(c).version == version}
            table.want = bool(nat or egress)
            table.set_elements("nat-pools", nat)
            table.set_elements("egress-addresses", egress)
            table.set_elements("all-pools", _of_version(version, msg.all_pools))
            table.set_elements("nodes", _of_version(version, msg.node_addresses, ipaddress.ip_address))

    def applied(self) -> None:
        log.info("nat tables applied", nat_pools=sorted(self.nat_pools), egress_addresses=sorted(self.egress))
