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
- replies of allowed connections always pass (conntrack);
- a named port (`port: http`) is looked up in the WorkloadEndpoints' `ports` (the pods'
  container ports) by name and protocol: an ingress rule's against the destination, i.e.
  each local pod the policy selects, its own number; an egress rule's against each
  destination pod its peers (or no peers: any pod) match. It resolves to (pod address,
  protocol, port) triples (`Allow.named`): a name no pod declares matches nothing, and
  numeric and named ports in one rule are a union.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import tiers as tiering

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


Named = tuple[str, str, int]  # (pod address, protocol, port): one resolved named port


@dataclass(frozen=True)
class Allow:
    """One rule of a policy, resolved: traffic matching both parts is allowed."""

    peers: tuple[str, ...] | None  # collapsed CIDRs of the peers; None: any address
    ports: tuple[PortRange, ...] | None  # None: any protocol and port
    # The peer pods' own addresses (no prefix length), sorted, beside `peers`: a pod
    # becoming a peer is one element of a hash set, not a change of collapsed intervals.
    hosts: tuple[str, ...] = ()
    # Named ports, resolved: (destination pod address, protocol, port), sorted. Matched as
    # well as (a union with) `ports`; ingress: beside `peers` (the source), egress: alone
    # (only the peer pods' addresses are in it). With named ports `ports` is () when the
    # rule has no numeric ones.
    named: tuple[Named, ...] = ()
    # Calico's rules (Kubernetes ones keep the defaults): what a match does, a protocol
    # without ports ("ICMP", "ICMPv6", "47"), ICMP type and code, and what the peer and
    # port must not be (collapsed CIDRs; port ranges).
    action: str = "Allow"
    proto: str | None = None
    icmp: tuple[int | None, int | None] | None = None
    not_peers: tuple[str, ...] = ()
    not_ports: tuple[PortRange, ...] = ()
    index: int = 0  # the rule's position in the policy's spec (its counter, its log prefix)


@dataclass(frozen=True)
class ResolvedPolicy:
    key: str  # "<namespace>/<name>"
    ingress: tuple[Allow, ...]
    egress: tuple[Allow, ...]


@dataclass(frozen=True)
class PodFilter:
    """A local pod: the policies (keys) isolating it per direction, in evaluation order;
    None: not isolated. `*_tiers`: the sizes of the tier groups of those keys (`()`: only
    Kubernetes policies, one tier without Pass; see `policy.tiers`)."""

    interface: str
    namespace: str
    name: str
    ingress: tuple[str, ...] | None
    egress: tuple[str, ...] | None
    ingress_tiers: tuple[int, ...] = ()
    egress_tiers: tuple[int, ...] = ()
    # A HostEndpoint of this node (`interface` "host:" + its interfaceName, "*" for all;
    # `name` the HostEndpoint's): filtered on the input and output hooks, and denied what no
    # policy allows even when none selects it (Calico's default for host endpoints);
    # "hostfwd:" + interfaceName: the same endpoint's forwarded traffic (applyOnForward);
    # "hostpre:" + interfaceName: what arrives on it, before DNAT (preDNAT; ingress only);
    # "hostraw:" + interfaceName: every packet in and out, before conntrack (doNotTrack).
    host: bool = False


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


@dataclass(frozen=True)
class RulePorts:
    """A rule's ports before resolution: numeric ranges (None: any port; () when only
    named ports are given) and the named ones as (name, protocol)."""

    ranges: tuple[PortRange, ...] | None
    names: tuple[tuple[str, str], ...] = ()


def rule_ports(rule: res.PolicyRule) -> RulePorts:
    if not rule.ports:
        return RulePorts(None)
    ranges = []
    names = set()
    for p in rule.ports:
        if isinstance(p.port, str):
            names.add((p.port, p.protocol))
        else:
            ranges.append(PortRange(p.protocol, p.port, (p.end_port or p.port) if p.port else None))
    return RulePorts(tuple(sorted(set(ranges), key=lambda r: (r.protocol, r.low or 0, r.high or 0))),
                     tuple(sorted(names)))


def named_elements(wep: res.WorkloadEndpoint, names: Iterable[tuple[str, str]],
                   addresses: Callable[[str], bool] = lambda _: True) -> Iterator[Named]:
    """The (address, protocol, port) triples of the pod's ports with these (name,
    protocol), for its host addresses that `addresses` accepts."""
    for name, protocol in names:
        for port in wep.named_port(name, protocol):
            for n in wep.ip_networks:
                host = host_address(n)
                if host is not None and addresses(host):
                    yield host, protocol, port


def in_ranges(ranges: Iterable[Range]) -> Callable[[str], bool]:
    """Whether an address lies in one of the ranges (an ipBlock peer's networks)."""
    ranges = tuple(ranges)

    def check(address: str) -> bool:
        version, lo, _ = cidr_range(address)
        return any(v == version and a <= lo <= b for v, a, b in ranges)
    return check


def _calico_parts(rule, not_networks: Iterable[str], index: int) -> dict:
    """A Calico rule's extra match fields for its Allow; only the index for a Kubernetes rule."""
    action = getattr(rule, "action", None)
    if action is None:
        return {"index": index}
    icmp = None if rule.icmp_type is None else (rule.icmp_type, rule.icmp_code)
    not_ports = rule_ports(res.PolicyRule(ports=rule.not_ports)).ranges or () if rule.not_ports else ()
    return dict(action=action, proto=rule.protocol, icmp=icmp,
                not_peers=collapse_ranges(map(cidr_range, not_networks)), not_ports=not_ports, index=index)


def make_allow(rule: res.PolicyRule, ports: RulePorts, ranges: Iterable[Range], pod_networks: Iterable[str],
               named: Iterable[Named] = (), not_networks: Iterable[str] = (), index: int = 0) -> Allow | None:
    """The Allow of a rule from its ports (`rule_ports`), its ipBlocks' address ranges,
    the networks of the pods its peers match and its named ports' triples (and, for a
    Calico rule, the networks its notNets and notSelector name)."""
    named = tuple(sorted(set(named)))
    if ports.names and not named and not ports.ranges:
        return None  # only named ports, and no pod declares them
    extra = _calico_parts(rule, not_networks, index)
    if not rule.peers:
        return Allow(None, ports.ranges, (), named, **extra)
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
    return Allow(collapse_ranges(ranges), ports.ranges, tuple(sorted(hosts)), named, **extra)


def peer_block(peer: res.PolicyPeer) -> list[Net]:
    return _block(peer)


def named_target(wep: res.WorkloadEndpoint, policy: res.NetworkPolicy, direction: str, node: str,
                 peers: Iterable[res.PolicyPeer], static: Iterable[Range],
                 ns_labels: Mapping[str, dict[str, str]]) -> Callable[[str], bool] | None:
    """Which of the pod's addresses a rule's named ports resolve against (None: none).
    Ingress: the destination, a pod of this node the policy selects (all its addresses).
    Egress: a destination pod the rule's peers match: any pod without peers; by a pod
    peer, all its addresses; else those inside an ipBlock (`static`, its ranges)."""
    if direction == INGRESS:
        ok = wep.node == node and policy.selects(wep.labels, wep.namespace)
        return (lambda _: True) if ok else None
    peers = tuple(peers)
    if not peers or any(peer.matches_pod(wep.labels, wep.namespace, ns_labels[wep.namespace], policy.namespace)
                        for peer in peers):
        return lambda _: True
    static = tuple(static)
    return in_ranges(static) if static else None


def _resolve_rule(rule: res.PolicyRule, policy: res.NetworkPolicy, direction: str, node: str,
                  weps: Iterable[res.WorkloadEndpoint], ns_labels: Mapping[str, dict[str, str]],
                  index: int = 0) -> Allow | None:
    """The rule as address and port sets; None when it can match nothing."""
    ports = rule_ports(rule)
    ranges: list[Range] = []
    pod_networks: list[str] = []
    for peer in rule.peers:
        if peer.cidr is not None:
            ranges += map(net_range, _block(peer))
            continue
        for wep in weps:
            if peer.matches_pod(wep.labels, wep.namespace, ns_labels[wep.namespace], policy.namespace):
                pod_networks += wep.ip_networks
    named: list[Named] = []
    if ports.names:
        for wep in weps:
            target = named_target(wep, policy, direction, node, rule.peers, ranges, ns_labels)
            if target is not None:
                named += named_elements(wep, ports.names, target)
    return make_allow(rule, ports, ranges, pod_networks, named,
                      not_networks(rule, policy, weps, ns_labels), index)


def not_networks(rule, policy, weps: Iterable[res.WorkloadEndpoint],
                 ns_labels: Mapping[str, dict[str, str]]) -> list[str]:
    """The networks a Calico rule's notNets and notSelector name (its pods' addresses)."""
    out: list[str] = []
    for peer in getattr(rule, "not_peers", ()):
        if peer.cidr is not None:
            out.append(peer.cidr)
            continue
        for wep in weps:
            if peer.matches_pod(wep.labels, wep.namespace, ns_labels[wep.namespace], policy.namespace):
                out += wep.ip_networks
    return out


policy_key = tiering.policy_key


def interface_usable(name: str) -> bool:
    """Whether an interface name can be written as an nft string."""
    return bool(_IFNAME_OK.fullmatch(name))


def resolve(p: res.NetworkPolicy, weps: Iterable[res.WorkloadEndpoint],
            ns_labels: Mapping[str, dict[str, str]], node: str) -> ResolvedPolicy:
    """One policy's rules as address and port sets, against the cluster's pods (`node`:
    whose pods an ingress rule's named ports resolve against)."""
    weps = tuple(weps)

    def rules(items: tuple[res.PolicyRule, ...], direction: str) -> tuple[Allow, ...]:
        allows = (_resolve_rule(r, p, direction, node, weps, ns_labels, i) for i, r in enumerate(items))
        return tuple(a for a in allows if a is not None)

    return ResolvedPolicy(policy_key(p),
                          rules(p.ingress, INGRESS) if INGRESS in p.policy_types else (),
                          rules(p.egress, EGRESS) if EGRESS in p.policy_types else ())


def compute(node: str, weps: Iterable[res.WorkloadEndpoint], policies: Iterable[res.NetworkPolicy],
            namespaces: Mapping[str, res.Namespace], tiers: Mapping[str, res.Tier] | None = None,
            host_endpoints: Iterable[res.HostEndpoint] = ()) -> Filter:
    """Which of this node's pods are isolated, by which policies (Kubernetes' and
    Calico's, in evaluation order), and what those allow."""
    weps = sorted(weps, key=lambda w: (w.namespace, w.name))
    policies = sorted(policies, key=policy_key)
    ns_labels = {name: namespace_labels(namespaces, name)
                 for name in {w.namespace for w in weps} | set(namespaces)}
    pods = pod_filters(node, weps, policies, ns_labels, tiers)
    pods.update(host_filters(node, host_endpoints, policies, tiers or {}))
    used = {k for f in pods.values() for k in (f.ingress or ()) + (f.egress or ())}
    resolved = tuple(resolve(p, weps, ns_labels, node) for p in policies if policy_key(p) in used)
    return Filter(tuple(pods.values()), resolved)


def pod_filters(node: str, weps: Iterable[res.WorkloadEndpoint], policies: Iterable[res.NetworkPolicy],
                ns_labels: Mapping[str, dict[str, str]] | None = None,
                tiers: Mapping[str, res.Tier] | None = None) -> dict[str, PodFilter]:
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
        want = pod_filter(wep, policies, ns_labels if ns_labels is not None else {}, tiers or {})
        if want is None:
            pods.pop(wep.interface_name, None)
            continue
        # one filter per interface: the last endpoint (by namespace/name) naming it wins
        pods[wep.interface_name] = want
    return pods


def host_key(interface: str, stage: str = "host") -> str:
    """A host endpoint's key among the filters (its `interface`: apart from the pods'):
    "host:<if>" for its own traffic, "hostfwd:<if>" for what it forwards, "hostpre:<if>"
    for what arrives on it, before DNAT, "hostraw:<if>" untracked, before conntrack."""
    return f"{stage}:{interface}"


def host_filters(node: str, heps: Iterable[res.HostEndpoint], policies: Iterable,
                 tiers: Mapping[str, res.Tier]) -> dict[str, PodFilter]:
    """This node's host endpoints, by `host_key`: the GlobalNetworkPolicies selecting each
    (without a namespaceSelector: a host has no namespace). One per interface: the first
    by name."""
    policies = [p for p in policies if getattr(p, "GLOBAL", False) and p.namespace_selector is None]
    out: dict[str, PodFilter] = {}
    for hep in sorted(heps, key=lambda h: h.name, reverse=True):
        if hep.node != node or not (hep.interface_name == "*" or interface_usable(hep.interface_name)):
            continue
        selecting = [p for p in policies if p.pod_selector.matches(hep.labels)]
        # before conntrack (doNotTrack) and before DNAT (preDNAT): stages of their own, where
        # what no rule matches goes on to the rest
        for stage, flag in (("hostraw", "do_not_track"), ("hostpre", "pre_dnat")):
            early = [p for p in selecting if getattr(p, flag)]
            if early:
                key = host_key(hep.interface_name, stage=stage)
                out[key] = _host_filter(key, hep, early, tiers, unselected=None)
        selecting = [p for p in selecting if not p.pre_dnat and not p.do_not_track]
        key = host_key(hep.interface_name)
        out[key] = _host_filter(key, hep, selecting, tiers)
        # Forwarded traffic (pods') only meets the applyOnForward policies, and only when
        # one selects the endpoint: without any it passes (Calico's default).
        # ...and per direction: a direction no such policy covers is not filtered.
        forward = [p for p in selecting if p.apply_on_forward]
        if forward:
            key = host_key(hep.interface_name, stage="hostfwd")
            out[key] = _host_filter(key, hep, forward, tiers, unselected=None)
    return out


def _host_filter(key: str, hep: res.HostEndpoint, selecting: list, tiers: Mapping[str, res.Tier],
                 unselected: tuple | None = ()) -> PodFilter:
    """`unselected`: a direction no policy selects: () denied (the host's own traffic),
    None not filtered (forwarded traffic)."""
    ing, ing_t = tiering.ordered((p for p in selecting if INGRESS in p.policy_types), tiers)
    egr, egr_t = tiering.ordered((p for p in selecting if EGRESS in p.policy_types), tiers)
    return PodFilter(key, "", hep.name, ing or unselected, egr or unselected, ing_t, egr_t, host=True)


def pod_filter(wep: res.WorkloadEndpoint, policies: Iterable, ns_labels: Mapping[str, dict[str, str]],
               tiers: Mapping[str, res.Tier]) -> PodFilter | None:
    """One local pod's filter (None: no policy selects it)."""
    try:
        labels_ns = ns_labels[wep.namespace]
    except KeyError:
        labels_ns = {NAMESPACE_NAME_LABEL: wep.namespace}
    selecting = [p for p in policies if tiering.selects(p, wep.labels, wep.namespace, labels_ns)]
    ing, ing_t = tiering.ordered((p for p in selecting if INGRESS in p.policy_types), tiers)
    egr, egr_t = tiering.ordered((p for p in selecting if EGRESS in p.policy_types), tiers)
    if not ing and not egr:
        return None
    return PodFilter(wep.interface_name, wep.namespace, wep.name, ing or None, egr or None, ing_t, egr_t)


# --- evaluation (the semantics of the rendered ruleset, for tests and debugging) ---------


def _allow_matches(a: Allow, direction: str, peer: str, local: str | None, protocol: str, port: int) -> bool:
    dst = str(ipaddress.ip_address(peer)) if direction == EGRESS else local
    if direction == EGRESS and (dst, protocol, port) in a.named:
        return True  # egress triples hold only the peers' own addresses
    if a.peers is not None:
        ip = ipaddress.ip_address(peer)
        if str(ip) not in a.hosts and not any(ip.version == n.version and ip in n
                                              for n in map(ipaddress.ip_network, a.peers)):
            return False
    if direction == INGRESS and local is not None and (str(ipaddress.ip_address(local)), protocol, port) in a.named:
        return True
    if a.ports is None:
        return True
    return any(r.protocol == protocol and (r.low is None or r.low <= port <= (r.high or r.low))
               for r in a.ports)


def allows(f: Filter, interface: str, direction: str, peer: str, protocol: str = "TCP", port: int = 80,
           local: str | None = None) -> bool:
    """Whether a new connection of the local pod on `interface` to (egress) or from
    (ingress) the address `peer` passes that pod's filter in `direction`. `local`: the
    pod's own address (the destination of ingress; what its named ports resolve to)."""
    pod = next((p for p in f.pods if p.interface == interface), None)
    keys = None if pod is None else (pod.ingress if direction == INGRESS else pod.egress)
    if keys is None:
        return True
    if pod.ingress_tiers or pod.egress_tiers or pod.host:
        # Calico's tiers, actions and not-matches are judged by the lab tests against the
        # real ruleset (tests/e2e/test_calico_policy.py); this evaluator knows Kubernetes'.
        raise ValueError(f"{interface}: allows() evaluates Kubernetes policies only")
    for key in keys:
        pol = f.policy(key)
        if any(_allow_matches(a, direction, peer, local, protocol, port)
               for a in (pol.ingress if direction == INGRESS else pol.egress)):
            return True
    return False
