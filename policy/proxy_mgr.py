"""tortie's Service proxy: kube-proxy's nftables mode, written by tortie's table machinery.

Two tables tortie owns, `ip tortie-proxy` and `ip6 tortie-proxy`, present while a Service
port of that family exists. Dispatch is by verdict map, never a rule per Service:

    map service-ips   addr . proto . port -> goto svc-<id> (cluster IPs) | ext-<id> (external, LB)
    map node-ports    proto . port -> goto ext-<id>          (on every local address but loopback)
    map no-endpoints / no-endpoint-nodeports -> goto reject  (TCP reset, else ICMP port unreachable:
                                                              the client fails at once, no timeout)
    set pod-cidrs (interval)                                 the pools: a pod's traffic to an
                                                              external address takes the cluster path
    chain svc-<id>   one rule: `dnat addr . port to numgen random mod N map { i : addr . port }`;
                     with ClientIP affinity: a known client to its endpoint's chain, else
                     `numgen random mod N vmap { i : goto ep-<id> }`
    chain ext-<id>   Cluster: mark for masquerade, then the same spread over every endpoint;
                     Local: pods and the node itself go the cluster path; others keep their
                     source and reach this node's endpoints only (none: drop)
    chain ep-<id>    (affinity only) refresh the client's entry in aff-<id>; dnat
    set aff-<id>     sessionAffinity ClientIP: client addresses, with the Service's timeout
    set hairpin      (backend . backend) of every backend: a pod reaching itself through a
                     Service is masqueraded (postrouting), whatever Service it used

No chain per endpoint unless affinity needs one: libnftables reads a table's chains
before each transaction that adds a rule or an element, so their number is the floor of
every update's cost (11,000 chains for 1,000 x 10: ~30 ms; 1,000: a few).

The base chains (nat prerouting/output at dstnat, postrouting at srcnat; filter forward,
input and output at -10, before tortie-filter) never change in steady state. A Service
change is elements of the maps plus its own chains, in one transaction with the rest; a
Service gone leaves nothing behind. NetworkPolicy (tortie-filter, forward hook) sees the
packet after DNAT, so it applies to the real pod. UDP conntrack entries of a backend that
went away are flushed after the transaction (`conntrack_flush`), as kube-proxy does, so a
client's next datagram is balanced again instead of following a dead flow.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from functools import lru_cache

from tortie.log import get_logger
from tortie.policy.nftables import Base, Chain, Nft, NftTable, Obj, TablesManager
from tortie.policy.svc_model import Backend, ProxyConfigUpdate, ServicePortState, ServicePortUpdate

log = get_logger("proxy")

TABLE = "tortie-proxy"
FAMILIES = {4: "ip", 6: "ip6"}
MASQ_MARK = 0x4000  # kube-proxy's bit; only within this table's chains
DSTNAT, SRCNAT, FILTER_PRIO = -100, 100, -10


_UNREADABLE = re.compile(r"[^A-Za-z0-9_.-]")


@lru_cache(maxsize=1 << 17)
def _name(prefix: str, ident: str) -> str:
    """`<prefix>-<hash>-<readable ident>`: unique by the hash, legible by the rest."""
    digest = hashlib.blake2s(ident.encode(), digest_size=4).hexdigest()
    return f"{prefix}-{digest}-{_UNREADABLE.sub('_', ident)[:150]}"


def svc_chain(st: ServicePortState) -> str:
    return _name("svc", st.key)


def ext_chain(st: ServicePortState) -> str:
    return _name("ext", st.key)


def ep_name(prefix: str, st: ServicePortState, b: Backend) -> str:
    return _name(prefix, f"{st.key}__{b.address}/{b.port}")


def _spread(st: ServicePortState, fam: str, backends: tuple[Backend, ...]) -> tuple[str, ...]:
    """A random pick among the backends, in one rule. With affinity: a known client goes to
    its endpoint's chain first (which refreshes its entry), else a random endpoint chain."""
    if not st.affinity:
        if len(backends) == 1:
            return (_dnat(fam, backends[0], st.protocol),)
        picks = ", ".join(f"{i} : {b.address} . {b.port}" if fam == "ip" else f"{i} : [{b.address}] . {b.port}"
                          for i, b in enumerate(backends))
        return (f"meta l4proto {st.protocol} dnat {fam} addr . port to numgen random mod {len(backends)} "
                f"map {{ {picks} }}",)
    rules = [f"{fam} saddr @{ep_name('aff', st, b)} goto {ep_name('ep', st, b)}" for b in backends]
    if len(backends) == 1:
        rules.append(f"goto {ep_name('ep', st, backends[0])}")
    else:
        picks = ", ".join(f"{i} : goto {ep_name('ep', st, b)}" for i, b in enumerate(backends))
        rules.append(f"numgen random mod {len(backends)} vmap {{ {picks} }}")
    return tuple(rules)


def _dnat(fam: str, b: Backend, proto: str) -> str:
    to = f"[{b.address}]:{b.port}" if fam == "ip6" else f"{b.address}:{b.port}"
    return f"meta l4proto {proto} dnat {fam} to {to}"


class ProxyManager(TablesManager):
    """The Service proxy (`tortie.dataplane.Manager`): fed `ServicePortUpdate` and
    `ProxyConfigUpdate`; `apply()` writes what changed, both families in one transaction."""

    name = "proxy"

    def __init__(self, nft: Nft | None = None, *, netns: str | None = None, conntrack=None) -> None:
        self.by_version: dict[int, NftTable] = {}
        for version, fam in FAMILIES.items():
            self.by_version[version] = self._skeleton(version, fam)
        super().__init__(self.by_version.values(), nft, netns)
        self.ports: dict[str, ServicePortState] = {}
        self._conntrack = conntrack  # flush(family, backends) of removed UDP backends; None: default
        self._gone_udp: set[tuple[int, str]] = set()  # (family, address) to flush after the next apply
        self._backends: dict[int, Counter[str]] = {v: Counter() for v in FAMILIES}  # for the hairpin set

    @staticmethod
    def _skeleton(version: int, fam: str) -> NftTable:
        t = NftTable(fam, TABLE)
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        key = f"{addr} . inet_proto . inet_service"
        for name, typ in (("service-ips", key), ("no-endpoints", key), ("node-ports", "inet_proto . inet_service"),
                          ("no-endpoint-nodeports", "inet_proto . inet_service")):
            t.objects.set_desired(name, Obj("map", typ, "verdict"))
        t.objects.set_desired("pod-cidrs", Obj("set", addr, flags=("interval",)))
        t.objects.set_desired("hairpin", Obj("set", f"{addr} . {addr}"))  # (backend, backend)
        loopback = "127.0.0.0/8" if version == 4 else "::1"
        node_port = f"fib daddr type local {fam} daddr != {loopback} meta l4proto . th dport"
        chains = {
            "nat-prerouting": Chain(("jump services",), Base("nat", "prerouting", DSTNAT)),
            "nat-output": Chain(("jump services",), Base("nat", "output", DSTNAT)),
            "nat-postrouting": Chain(("jump masquerading",), Base("nat", "postrouting", SRCNAT)),
            "services": Chain((f"{fam} daddr . meta l4proto . th dport vmap @service-ips",
                               f"{node_port} vmap @node-ports")),
            # hairpin: a pod sent to itself through a Service must see another source, or
            # its reply would never reach the socket that connected
            "masquerading": Chain((f"ct status dnat {fam} saddr . {fam} daddr @hairpin masquerade fully-random",
                                   f"meta mark & {MASQ_MARK:#x} == 0 return",
                                   f"meta mark set meta mark ^ {MASQ_MARK:#x}",
                                   "masquerade fully-random")),
            "mark-for-masquerade": Chain((f"meta mark set meta mark | {MASQ_MARK:#x}",)),
            "endpoints-check": Chain((f"{fam} daddr . meta l4proto . th dport vmap @no-endpoints",
                                      f"{node_port} vmap @no-endpoint-nodeports")),
            "reject-chain": Chain(("meta l4proto tcp reject with tcp reset", "reject")),
        }
        for hook in ("forward", "input", "output"):
            chains[f"filter-{hook}"] = Chain(("ct state new jump endpoints-check",),
                                             Base("filter", hook, FILTER_PRIO))
        for name, chain in chains.items():
            t.chains.set_desired(name, chain)
        return t

    # -- inputs ----------------------------------------------------------------------------
    def on_update(self, msg: object) -> None:
        if isinstance(msg, ServicePortUpdate):
            old = self.ports.pop(msg.key, None)
            if old is not None:
                self._remove(old, msg.state)
            if msg.state is not None:
                self.ports[msg.key] = msg.state
                self._add(msg.state)
            self._want()
        elif isinstance(msg, ProxyConfigUpdate):
            for version, table in self.by_version.items():
                table.set_elements("pod-cidrs", {str(ipaddress.ip_network(c)): "" for c in msg.pod_cidrs
                                                 if ipaddress.ip_network(c).version == version})

    def _want(self) -> None:
        versions = {st.family for st in self.ports.values()}
        for version, table in self.by_version.items():
            table.want = version in versions

    def _entries(self, st: ServicePortState) -> list[tuple[str, str, str]]:
        """(map, key, verdict) of one port."""
        p = st.protocol
        out = []
        if st.has_endpoints:
            # (internalTrafficPolicy Local with none here: the svc chain drops, as kube-proxy does)
            out += [("service-ips", f"{a} . {p} . {st.port}", f"goto {svc_chain(st)}") for a in st.cluster_ips]
            out += [("service-ips", f"{a} . {p} . {st.port}", f"goto {ext_chain(st)}") for a in st.external_ips]
            if st.node_port:
                out.append(("node-ports", f"{p} . {st.node_port}", f"goto {ext_chain(st)}"))
        else:
            out += [("no-endpoints", f"{a} . {p} . {st.port}", "goto reject-chain")
                    for a in (*st.cluster_ips, *st.external_ips)]
            if st.node_port:
                out.append(("no-endpoint-nodeports", f"{p} . {st.node_port}", "goto reject-chain"))
        return out

    def _chains(self, st: ServicePortState) -> dict[str, Chain]:
        fam = FAMILIES[st.family]
        out: dict[str, Chain] = {}
        if not st.has_endpoints:
            return out
        out[svc_chain(st)] = Chain(_spread(st, fam, st.cluster_backends) if st.cluster_backends else ("drop",))
        if st.external_ips or st.node_port:
            if not st.external_local:
                rules = ("jump mark-for-masquerade", *_spread(st, fam, st.external_backends)) \
                    if st.external_backends else ("drop",)
            else:
                short = (f"{fam} saddr @pod-cidrs goto {svc_chain(st)}",
                         "fib saddr type local jump mark-for-masquerade",
                         f"fib saddr type local goto {svc_chain(st)}") if st.cluster_backends else ()
                rules = (*short, *(_spread(st, fam, st.external_backends) if st.external_backends else ("drop",)))
            out[ext_chain(st)] = Chain(rules)
        if st.affinity:  # endpoint chains only where the affinity entry must be refreshed
            for b in {*st.cluster_backends, *st.external_backends}:
                out[ep_name("ep", st, b)] = Chain((f"update @{ep_name('aff', st, b)} {{ {fam} saddr }}",
                                                   _dnat(fam, b, st.protocol)))
        return out

    def _sets(self, st: ServicePortState) -> dict[str, Obj]:
        if not st.affinity:
            return {}
        addr = "ipv4_addr" if st.family == 4 else "ipv6_addr"
        return {ep_name("aff", st, b): Obj("set", addr, flags=("timeout", "dynamic"), timeout=st.affinity)
                for b in {*st.cluster_backends, *st.external_backends}}

    def _hairpin(self, st: ServicePortState, n: int) -> None:
        """Count each backend address over the ports using it; the set holds those counted."""
        t, counts = self.by_version[st.family], self._backends[st.family]
        for a in {b.address for b in (*st.cluster_backends, *st.external_backends)}:
            counts[a] += n
            if counts[a] <= 0:
                del counts[a]
                t.elements.delete_desired(("hairpin", f"{a} . {a}"))
            elif counts[a] == n:
                t.elements.set_desired(("hairpin", f"{a} . {a}"), "")

    def _add(self, st: ServicePortState) -> None:
        self._hairpin(st, 1)
        t = self.by_version[st.family]
        for name, obj in self._sets(st).items():
            t.objects.set_desired(name, obj)
        for name, chain in self._chains(st).items():
            t.chains.set_desired(name, chain)
        for m, k, v in self._entries(st):
            t.elements.set_desired((m, k), v)

    def _remove(self, st: ServicePortState, new: ServicePortState | None) -> None:
        self._hairpin(st, -1)
        t = self.by_version[st.family]
        keep_chains = self._chains(new) if new and new.family == st.family else {}
        keep_sets = self._sets(new) if new and new.family == st.family else {}
        keep_elems = {(m, k) for m, k, _ in self._entries(new)} if new and new.family == st.family else set()
        for m, k, _ in self._entries(st):
            if (m, k) not in keep_elems:
                t.elements.delete_desired((m, k))
        for name in self._chains(st):
            if name not in keep_chains:
                t.chains.delete_desired(name)
        for name in self._sets(st):
            if name not in keep_sets:
                t.objects.delete_desired(name)
        if st.protocol == "udp":
            still = {b.address for b in (*new.cluster_backends, *new.external_backends)} if new else set()
            self._gone_udp |= {(st.family, b.address) for b in (*st.cluster_backends, *st.external_backends)
                               if b.address not in still}

    # -- output ----------------------------------------------------------------------------
    def apply(self) -> None:
        super().apply()
        if self._gone_udp:
            gone, self._gone_udp = self._gone_udp, set()
            from tortie.policy.conntrack import flush_udp_to

            (self._conntrack or flush_udp_to)(gone, self.netns)

    @property
    def dirty(self) -> bool:
        return super().dirty or bool(self._gone_udp)

    def applied(self) -> None:
        log.info("proxy tables applied", service_ports=len(self.ports))


__all__ = ["TABLE", "ProxyManager", "ep_name", "ext_chain", "svc_chain"]
