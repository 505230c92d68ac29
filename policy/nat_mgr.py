"""natOutgoing: traffic from a pool with natOutgoing to a destination outside every pool
(and not to a node) leaves masqueraded to the node's address. Calico's meaning.

Desired state is one nftables table owned by tortie (`ip tortie-nat` / `ip6 tortie-nat`);
`apply()` writes it in one atomic transaction when it differs from what we last wrote,
and `check()` notices a hand edit (the text nft prints differs from the text it printed
right after our write) and marks us dirty so the next apply restores it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tortie.log import get_logger
from tortie.policy import nftables

log = get_logger("nat")

TABLE = "tortie-nat"
FAMILIES = {4: "ip", 6: "ip6"}


def _elements(cidrs: Iterable[str]) -> str:
    return ", ".join(sorted(cidrs))


class NatManager:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.nat_pools: dict[int, frozenset[str]] = {4: frozenset(), 6: frozenset()}
        self.all_pools: dict[int, frozenset[str]] = {4: frozenset(), 6: frozenset()}
        self.nodes: dict[int, frozenset[str]] = {4: frozenset(), 6: frozenset()}
        self._written: dict[int, str | None] = {4: None, 6: None}  # nft's listing after our write
        self.dirty = True

    def on_update(self, *, nat_pools: Iterable[str], all_pools: Iterable[str], node_addresses: Iterable[str]) -> None:
        for version in FAMILIES:
            nat = frozenset(c for c in nat_pools if ipaddress.ip_network(c).version == version)
            pools = frozenset(c for c in all_pools if ipaddress.ip_network(c).version == version)
            nodes = frozenset(a for a in node_addresses if ipaddress.ip_address(a).version == version)
            if (nat, pools, nodes) != (self.nat_pools[version], self.all_pools[version], self.nodes[version]):
                self.nat_pools[version], self.all_pools[version], self.nodes[version] = nat, pools, nodes
                self.dirty = True

    def body(self, version: int) -> str | None:
        """The table's text, or None when no pool of this family asks for NAT."""
        if not self.nat_pools[version]:
            return None
        fam = FAMILIES[version]
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        lines = [
            f"  set nat-pools {{ type {addr}; flags interval; elements = {{ {_elements(self.nat_pools[version])} }}; }}",
            f"  set all-pools {{ type {addr}; flags interval; elements = {{ {_elements(self.all_pools[version])} }}; }}",
        ]
        node_match = ""
        if self.nodes[version]:
            lines.append(f"  set nodes {{ type {addr}; elements = {{ {_elements(self.nodes[version])} }}; }}")
            node_match = f" {fam} daddr != @nodes"
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            # Pod-to-pod and pod-to-node keep the pod's address (the Kubernetes model).
            f"    {fam} saddr @nat-pools {fam} daddr != @all-pools{node_match} masquerade",
            "  }",
        ]
        return "\n".join(lines) + "\n"

    def check(self) -> bool:
        """Compare the kernel with what we wrote; mark dirty on a difference."""
        for version, fam in FAMILIES.items():
            if nftables.list_table(fam, TABLE, self.netns) != self._written[version]:
                self.dirty = True
        return self.dirty

    def apply(self) -> bool:
        if not self.dirty:
            return False
        script = ""
        for version, fam in FAMILIES.items():
            body = self.body(version)
            if body is None:
                if self._written[version] is not None or nftables.list_table(fam, TABLE, self.netns):
                    script += nftables.delete_table_script(fam, TABLE)
            else:
                script += nftables.replace_table_script(fam, TABLE, body)
        if script:
            nftables.run_nft(script, self.netns)  # every family in one transaction
        for version, fam in FAMILIES.items():
            self._written[version] = nftables.list_table(fam, TABLE, self.netns)
        self.dirty = False
        log.info("nat table applied", nat_pools=sorted(self.nat_pools[4] | self.nat_pools[6]))
        return True
