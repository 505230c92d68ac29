"""Anti-spoofing: a pod's packets must carry one of the pod's own source addresses.

A `tortie.dataplane.Manager` over the table `inet tortie-antispoof`, hooked at prerouting
priority raw (-300): before conntrack, NAT and every policy chain, so a forged packet
never creates a connection or meets a rule that could accept it.

    set sources4  ifname . ipv4_addr   "<host veth>" . <pod address>   (one per address)
    set sources6  ifname . ipv6_addr
    counter spoofed                     what was dropped
    chain prerouting (filter, prerouting, -300)
        iifname != "tor*" accept                 not a pod interface
        iifname . ip saddr @sources4 accept
        iifname . ip6 saddr @sources6 accept
        ip6 saddr fe80::/10 accept              neighbour discovery with the node
        ip6 saddr :: icmpv6 type ...  accept    duplicate address detection, MLD
        counter name "spoofed" drop

The allowed pairs are the pods' own routes: every route of class "workloads"
(`<address>/32 dev <host veth>`) the calculation or the CNI server sends the route
manager. Both owners' messages come here too, so a pod's addresses are allowed in the same
driver round that installs its route, before the CNI ADD is answered, and a pod interface
nothing knows yet (or any more) sends nothing: fail closed. Link-local IPv6 sources are
kept: the kernel never forwards them, and the pod needs them to find its gateway.
"""

from __future__ import annotations

import ipaddress

from tortie.cni.wiring import HOST_PREFIX
from tortie.log import get_logger
from tortie.policy.nftables import Base, Chain, Nft, NftTable, Obj, TablesManager
from tortie.routing.messages import RouteDelta

log = get_logger("antispoof")

TABLE, FAMILY = "tortie-antispoof", "inet"
ROUTE_CLASS = "workloads"  # the pod routes (agent.cni_routes.ROUTE_CLASS)
SETS = {4: ("sources4", "ip", "ipv4_addr"), 6: ("sources6", "ip6", "ipv6_addr")}
COUNTER = "spoofed"
RAW_PRIORITY = -300

PREROUTING = Chain((
    f'iifname != "{HOST_PREFIX}*" accept',
    *(f"iifname . {fam} saddr @{name} accept" for name, fam, _ in SETS.values()),
    "ip6 saddr fe80::/10 accept",
    "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, nd-router-solicit, mld-listener-report,"
    " mld2-listener-report } accept",
    f'counter name "{COUNTER}" drop',
), Base("filter", "prerouting", RAW_PRIORITY))


def _element(dev: str, dst: str) -> tuple[int, str] | None:
    """(IP version, set element) of a pod route; None unless it is one host address."""
    net = ipaddress.ip_network(dst, strict=False)
    if net.prefixlen != net.max_prefixlen or not dev:
        return None
    return net.version, f"{dev} . {net.network_address}"


class AntiSpoofManager(TablesManager):
    name = "antispoof"

    def __init__(self, nft: Nft | None = None, *, netns: str | None = None) -> None:
        self.table = NftTable(FAMILY, TABLE)
        super().__init__([self.table], nft, netns)
        for name, _, typ in SETS.values():
            self.table.objects.set_desired(name, Obj("set", f"ifname . {typ}"))
        self.table.objects.set_desired(COUNTER, Obj("counter"))
        self.table.chains.set_desired("prerouting", PREROUTING)
        self.table.want = True
        self._by_key: dict[tuple, tuple[int, str]] = {}  # route key -> (version, element)

    def on_update(self, msg: object) -> None:
        if not isinstance(msg, RouteDelta) or msg.route_class != ROUTE_CLASS:
            return
        for key in msg.removed:
            self._drop(key)
        for route in msg.routes:
            self._drop(route.key)
            elem = _element(route.dev or "", route.dst)
            if elem is None:
                continue
            self._by_key[route.key] = elem
            self.table.elements.set_desired((SETS[elem[0]][0], elem[1]), "")

    def _drop(self, key: tuple) -> None:
        elem = self._by_key.pop(key, None)  # a key is one (table, address): one element
        if elem is not None:
            self.table.elements.delete_desired((SETS[elem[0]][0], elem[1]))

    def applied(self) -> None:
        log.info("anti-spoofing table applied", sources=len(self._by_key))

    def read_dropped(self) -> tuple[int, int] | None:
        """(packets, bytes) the table dropped so far (any thread); None before its first write."""
        if self._nft is None:
            return None
        for item in self.nft.list_table(FAMILY, TABLE, "counters") or ():
            c = item.get("counter")
            if c is not None and c["name"] == COUNTER:
                return c["packets"], c["bytes"]
        return None
