"""Kubernetes NetworkPolicy for this node's pods: datastore views in, nftables table out. Pure.

`compute()` resolves every policy against the cluster's pods and namespaces into plain
values (which local pods are isolated in which direction, and each policy's rules as
address sets and port ranges); `policy.filter_mgr` writes them into the `inet
tortie-filter` table. `allows()` evaluates the same values the way the ruleset does, so
the semantics are unit tested without a kernel.

The Kubernetes meaning (networking.k8s.io/v1):
- a pod is isolated for ingress (egress) when a policy of its namespace selects it with
  that policy type; a direction nobody isolates allows everything;
- an isolated pod accepts what any selecting policy's rules allow (a union);
- a peer is a podSelector (pods of the policy's namespace), a namespaceSelector (every
  pod of the matching namespaces), both (matching pods in matching namespaces), or an
  ipBlock (cidr minus its excepts); no peers means any address, no ports any port;
- replies of allowed connections always pass (conntrack).
Named ports are not supported: a port entry with a name matches nothing, so a rule made
only of named ports allows nothing (never everything).

The ruleset: egress is checked in its own base chains (forward and input, priority
filter - 1) before ingress (forward, priority filter), so a packet between two local pods
needs the sender's egress and the receiver's ingress; `accept` in one base chain only
ends that chain. Each hook dispatches by the pod's veth through a verdict map to a
per-pod chain that jumps to each selecting policy's chain and drops what none accepted.
Traffic the node itself sends to its pods (output hook: kubelet probes) is never filtered.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tortie.datastore import resources as res
from tortie.log import get_logger

log = get_logger("netpol")

TABLE = "tortie-filter"
FAMILY = "inet"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
INGRESS, EGRESS = "Ingress", "Egress"
_IFNAME_OK = re.compile(r"[A-Za-z0-9_.@+=-]{1,15}")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PortRange:
    protocol: str  # TCP, UDP or SCTP
    low: int | None = None  # None: every port of the protocol
    high: int | None = None


@dataclass(frozen=True)
class Allow:
    """One rule of a policy, resolved: traffic matching both parts is allowed."""

    peers: tuple[str, ...] | None  # collapsed CIDRs of the peers; None: any address
    ports: tuple[PortRange, ...] | None  # None: any protocol and port
    # The peer pods' own addresses (no prefix length), sorted, beside `peers`: a pod
    # becoming a peer is one element of a hash set, not a change of collapsed intervals.
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolvedPolicy:
    key: str  # "<namespace>/<name>"
    ingress: tuple[Allow, ...]
    egress: tuple[Allow, ...]


@dataclass(frozen=True)
class PodFilter:
    """A local pod: the policies (keys) isolating it per direction; None: not isolated."""

    interface: str
    namespace: str
    name: str
    ingress: tuple[str, ...] | None
    egress: tuple[str, ...] | None


@dataclass(frozen=True)
class Filter:
    pods: tuple[PodFilter, ...]  # local pods isolated in at least one direction
    policies: tuple[ResolvedPolicy, ...]  # the policies those pods use

    def policy(self, key: str) -> ResolvedPolicy:
        return next(p for p in self.policies if p.key == key)


def namespace_labels(namespaces: Mapping[str, res.Namespace], name: str) -> dict[str, str]:
    """A namespace's labels plus the implicit `kubernetes.io/metadata.name` (also when the
    Namespace resource is missing)."""
    ns = namespaces.get(name)
    return {**(dict(ns.labels) if ns else {}), NAMESPACE_NAME_LABEL: name}


Range = tuple[int, int, int]  # (IP version, first address, last address) as integers


def net_range(n: Net) -> Range:
    lo = int(n.network_address)
    return n.version, lo, lo + (1 << (n.max_prefixlen - n.prefixlen)) - 1


@functools.lru_cache(maxsize=1 << 16)
def host_address(cidr: str) -> str | None:
    """A pod's network as a single address ("10.65.1.3" for "10.65.1.3/32"); None when it
    is a wider network. Cached like `cidr_range`."""
    n = ipaddress.ip_network(cidr, strict=False)
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else None


@functools.lru_cache(maxsize=1 << 16)
def cidr_range(cidr: str) -> Range:
    """A pod address (CIDR string) as a range; cached: pods' addresses are few and reused by
    every policy that names them."""
    return net_range(ipaddress.ip_network(cidr, strict=False))


def _collapse(nets: Iterable[Net]) -> tuple[str, ...]:
    return collapse_ranges(net_range(n) for n in nets)


def collapse_ranges(ranges: Iterable[Range]) -> tuple[str, ...]:
    """The smallest list of CIDRs covering the union, IPv4 first, sorted (what
    ipaddress.collapse_addresses gives, in integer arithmetic: policies collapse the
    addresses of hundreds of pods on every pod event)."""
    by_version: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for version, lo, hi in ranges:
        by_version[version].append((lo, hi))
    out: list[str] = []
    for version, bits, addr in ((4, 32, ipaddress.IPv4Address), (6, 128, ipaddress.IPv6Address)):
        merged: list[list[int]] = []
        for lo, hi in sorted(by_version[version]):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            while lo <= hi:
                size = lo & -lo if lo else 1 << bits  # the largest block aligned at lo...
                while size > hi - lo + 1:  # ...that ends inside the range
                    size >>= 1
                out.append(f"{addr(lo)}/{bits - size.bit_length() + 1}")
                lo += size
    return tuple(out)


def _block(peer: res.PolicyPeer) -> list[Net]:
    """An ipBlock as disjoint networks: the cidr minus every except."""
    nets = [ipaddress.ip_network(peer.cidr, strict=False)]
    for ex in peer.except_cidrs:
        exnet = ipaddress.ip_network(ex, strict=False)
        nxt: list[Net] = []
        for n in nets:
            if n.version == exnet.version and exnet.subnet_of(n):
                nxt += n.address_exclude(exnet)
            elif not (n.version == exnet.version and n.subnet_of(exnet)):
                nxt.append(n)
        nets = nxt
    return nets


_UNSATISFIABLE = object()


def rule_ports(rule: res.PolicyRule):
    """The rule's ports as ranges; None for any port; `_UNSATISFIABLE` when only named
    ports are given (unsupported: they match nothing)."""
    if not rule.ports:
        return None
    ranges = []
    for p in rule.ports:
        if isinstance(p.port, str):
            continue  # named port: unsupported, matches nothing
        ranges.append(PortRange(p.protocol, p.port, (p.end_port or p.port) if p.port else None))
    if not ranges:
        return _UNSATISFIABLE
    return tuple(sorted(set(ranges), key=lambda r: (r.protocol, r.low or 0, r.high or 0)))


def make_allow(rule: res.PolicyRule, ports, ranges: Iterable[Range], pod_networks: Iterable[str]) -> Allow | None:
    """The Allow of a rule from its ports (`rule_ports`), its ipBlocks' address ranges and
    the networks of the pods its peers match."""
    if ports is _UNSATISFIABLE:
        return None
    if not rule.peers:
        return Allow(None, ports)
    ranges = list(ranges)
    hosts = set()
    for n in pod_networks:
        host = host_address(n)
        if host is None:
            ranges.append(cidr_range(n))
        else:
            hosts.add(host)
    if not ranges and not hosts:
        return None  # peers that are nobody allow nothing
    return Allow(collapse_ranges(ranges), ports, tuple(sorted(hosts)))


def peer_block(peer: res.PolicyPeer) -> list[Net]:
    return _block(peer)


def _resolve_rule(rule: res.PolicyRule, policy: res.NetworkPolicy,
                  weps: Iterable[res.WorkloadEndpoint], ns_labels: Mapping[str, dict[str, str]]) -> Allow | None:
    """The rule as address and port sets; None when it can match nothing."""
    ports = rule_ports(rule)
    if ports is _UNSATISFIABLE:
        return None
    ranges: list[Range] = []
    pod_networks: list[str] = []
    for peer in rule.peers:
        if peer.cidr is not None:
            ranges += map(net_range, _block(peer))
            continue
        for wep in weps:
            if peer.matches_pod(wep.labels, wep.namespace, ns_labels[wep.namespace], policy.namespace):
                pod_networks += wep.ip_networks
    return make_allow(rule, ports, ranges, pod_networks)


def policy_key(p: res.NetworkPolicy) -> str:
    return f"{p.namespace}/{p.name}"


def interface_usable(name: str) -> bool:
    """Whether an interface name can be written as an nft string."""
    return bool(_IFNAME_OK.fullmatch(name))


def resolve(p: res.NetworkPolicy, weps: Iterable[res.WorkloadEndpoint],
            ns_labels: Mapping[str, dict[str, str]]) -> ResolvedPolicy:
    """One policy's rules as address and port sets, against the cluster's pods."""
    weps = tuple(weps)

    def rules(items: tuple[res.PolicyRule, ...]) -> tuple[Allow, ...]:
        allows = (_resolve_rule(r, p, weps, ns_labels) for r in items)
        return tuple(a for a in allows if a is not None)

    return ResolvedPolicy(policy_key(p),
                          rules(p.ingress) if INGRESS in p.policy_types else (),
                          rules(p.egress) if EGRESS in p.policy_types else ())


def compute(node: str, weps: Iterable[res.WorkloadEndpoint], policies: Iterable[res.NetworkPolicy],
            namespaces: Mapping[str, res.Namespace]) -> Filter:
    """Which of this node's pods are isolated, by which policies, and what those allow."""
    weps = sorted(weps, key=lambda w: (w.namespace, w.name))
    policies = sorted(policies, key=policy_key)
    ns_labels = {name: namespace_labels(namespaces, name)
                 for name in {w.namespace for w in weps} | set(namespaces)}
    pods = pod_filters(node, weps, policies)
    used = {k for f in pods.values() for k in (f.ingress or ()) + (f.egress or ())}
    resolved = tuple(resolve(p, weps, ns_labels) for p in policies if policy_key(p) in used)
    return Filter(tuple(pods.values()), resolved)


def pod_filters(node: str, weps: Iterable[res.WorkloadEndpoint],
                policies: Iterable[res.NetworkPolicy]) -> dict[str, PodFilter]:
    """This node's isolated pods, by host interface: the policies selecting each."""
    weps = sorted(weps, key=lambda w: (w.namespace, w.name))
    policies = sorted(policies, key=policy_key)
    pods: dict[str, PodFilter] = {}
    for wep in weps:
        if wep.node != node or not wep.interface_name:
            continue
        if not interface_usable(wep.interface_name):
            # Cannot be written as an nft string; one such endpoint must not sink the table.
            log.warning("interface name not usable in nftables; pod not filtered",
                        endpoint=f"{wep.namespace}/{wep.name}", interface=wep.interface_name)
            continue
        selecting = [p for p in policies if p.selects(wep.labels, wep.namespace)]
        ing = tuple(policy_key(p) for p in selecting if INGRESS in p.policy_types)
        egr = tuple(policy_key(p) for p in selecting if EGRESS in p.policy_types)
        if not ing and not egr:
            pods.pop(wep.interface_name, None)
            continue
        # one filter per interface: the last endpoint (by namespace/name) naming it wins
        pods[wep.interface_name] = PodFilter(wep.interface_name, wep.namespace, wep.name,
                                             ing or None, egr or None)
    return pods


# --- evaluation (the semantics of the rendered ruleset, for tests and debugging) ---------


def _allow_matches(a: Allow, peer: str, protocol: str, port: int) -> bool:
    if a.peers is not None:
        ip = ipaddress.ip_address(peer)
        if str(ip) not in a.hosts and not any(ip.version == n.version and ip in n
                                              for n in map(ipaddress.ip_network, a.peers)):
            return False
    if a.ports is None:
        return True
    return any(r.protocol == protocol and (r.low is None or r.low <= port <= (r.high or r.low))
               for r in a.ports)


def allows(f: Filter, interface: str, direction: str, peer: str, protocol: str = "TCP", port: int = 80) -> bool:
    """Whether a new connection of the local pod on `interface` to (egress) or from
    (ingress) the address `peer` passes that pod's filter in `direction`."""
    pod = next((p for p in f.pods if p.interface == interface), None)
    keys = None if pod is None else (pod.ingress if direction == INGRESS else pod.egress)
    if keys is None:
        return True
    for key in keys:
        pol = f.policy(key)
        if any(_allow_matches(a, peer, protocol, port) for a in (pol.ingress if direction == INGRESS else pol.egress)):
            return True
    return False
