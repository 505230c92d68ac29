"""NetworkPolicy enforcement: the `inet tortie-filter` table, kept by small transactions.

A `tortie.dataplane.Manager`: `on_update(PolicyUpdate | EndpointFilterUpdate)` folds the
calculation's messages into desired state (no I/O), `apply()` writes only the difference
as one nftables transaction, `resync()` makes the next apply list the table once and
repair what differs. The table (kube-proxy's nftables mode is the model):

    map ingress-pods / egress-pods   ifname : verdict   "<veth>" : jump pod-in|out-<veth>
    chain pod-in-<veth>              jump pol-in-<policy>... ; drop     (one per pod, direction)
    chain pol-in-<hash>-<ns>_<name>  ip saddr @<same>-<n>-4 <ports> counter name "<same>" accept ...
    set pol-in-<hash>-<ns>_<name>-<n>-4|6    allow <n>'s ipBlocks (CIDRs, interval set)
    set pol-in-<hash>-<ns>_<name>-<n>-4p|6p  allow <n>'s peer pods (addresses, hash set)
    set pol-in-<hash>-<ns>_<name>-<n>-4n|6n  allow <n>'s named ports: address . proto . port
                                         (hash set; matched `ip daddr . meta l4proto . th dport`)
    counter pol-in-<hash>-<ns>_<name>    what the policy accepted (kept across updates)
    chain forward-egress / input-egress  (hook filter - 1), forward-ingress (hook filter)

A pod added or removed is `add|delete element` + `add chain|flush+delete chain` of its
own chains; a pod that becomes or stops being a policy's peer is `add|delete element` of
that policy's peer sets; a policy whose rules changed is `flush chain` + its rules;
nothing else is touched, so the policies' counters (and anything else stateful) live through every update. The table
exists only while some local pod is isolated.

Semantics (see `policy.netpol`): egress is checked in its own base chains (forward and
input, priority filter - 1) before ingress (forward, priority filter), so a packet between
two local pods needs the sender's egress and the receiver's ingress; `accept` in one base
chain only ends that chain. Replies of allowed connections pass (`ct state
established,related`). The node's own traffic to its pods (output hook) is never filtered.
A pod whose policy is not known yet jumps to that policy's empty chain: allowed nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from tortie.log import get_logger
from tortie.policy import host_rules, netpol, nflog
from tortie.policy.messages import EndpointFilterUpdate, PolicyUpdate, filter_messages
from tortie.policy.netpol import PodFilter, PortRange, ResolvedPolicy
from tortie.policy.nftables import Base, Chain, Nft, NftTable, Obj, TablesManager

log = get_logger("netpol")

TABLE, FAMILY = netpol.TABLE, netpol.FAMILY
IN, OUT = "in", "out"
RAW = "raw"  # "rawin" / "rawout": a policy's chains for the untracked stage (doNotTrack)
MAPS = {IN: "ingress-pods", OUT: "egress-pods"}
_PROTOS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ESTABLISHED = "ct state established,related accept"
# Egress first (lower priority number): the sender's policy, then the receiver's. A pod's
# traffic to this node itself is egress too; IPv6 neighbour discovery with the node is not
# a connection and must pass.
BASE_CHAINS = {
    "forward-egress": Chain((_ESTABLISHED, "iifname vmap @egress-pods"), Base("filter", "forward", -1)),
    "input-egress": Chain((_ESTABLISHED,
                           "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
                           "iifname vmap @egress-pods"), Base("filter", "input", -1)),
    "forward-ingress": Chain((_ESTABLISHED, "oifname vmap @ingress-pods"), Base("filter", "forward", 0)),
}


def _readable(text: str) -> str:
    """`text` as an nft identifier; a short hash is added when characters were replaced."""
    safe = _UNSAFE.sub("_", text)
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:4]}"


def policy_chain(key: str, direction: str) -> str:
    """`pol-in-<hash>-<namespace>_<name>`: unique by hash, readable by name (nft: <= 255)."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"pol-{direction}-{digest}-{_UNSAFE.sub('_', key)}"[:200]


def pod_chain(interface: str, direction: str) -> str:
    return f"pod-{direction}-{_readable(interface)}"


def _items(rs: Iterable[PortRange]) -> str:
    return ", ".join(str(r.low) if r.high == r.low else f"{r.low}-{r.high}" for r in rs)


def _ports_match(ports: tuple[PortRange, ...] | None, not_ports: tuple[PortRange, ...] = ()) -> list[str]:
    """nft match expressions, one per protocol (an empty string: any protocol); `not_ports`
    (Calico's notPorts, of the rule's one protocol) excluded from each."""
    if ports is None:
        ports = tuple(PortRange(r.protocol) for r in not_ports)
        if not ports:
            return [""]
    out = []
    for proto in sorted({r.protocol for r in ports}):
        rs = [r for r in ports if r.protocol == proto]
        nots = [r for r in not_ports if r.protocol == proto]
        excluded = f" th dport != {{ {_items(nots)} }}" if nots else ""
        if any(r.low is None for r in rs):
            out.append(f"meta l4proto {_PROTOS[proto]}{excluded}")
            continue
        out.append(f"meta l4proto {_PROTOS[proto]} th dport {{ {_items(rs)} }}{excluded}")
    return out


_FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))

PeerSets = dict[str, tuple[Obj, tuple[str, ...]]]  # set name -> (its declaration, elements)


def policy_rules(pol: ResolvedPolicy | None, direction: str, counter: str) -> tuple[tuple[str, ...], PeerSets]:
    """The rules of one policy's chain (each allow, counted, accepted) and the named sets of
    peer addresses they match. None: allows nothing.

    Peers live in named sets, not inline, so a pod that becomes or stops being a peer is an
    element change and the chain is rewritten only when the rules' shape changes. Per
    allow <n> and family: `<chain>-<n>-4` (an interval set: the ipBlocks' CIDRs),
    `<chain>-<n>-4p` (a hash set: the peer pods' addresses) and `<chain>-<n>-4n` (a hash
    set of `address . protocol . port`: the named ports resolved, for ingress the local
    pods' own, for egress the peer pods'; an egress rule matches it alone, since only peer
    pods are in it; an ingress one beside the source sets). The split is for speed: nft
    reads every element of a table's interval sets before it changes any of them (20 ms
    with 300 sets of 25 elements, against 0.7 ms for a hash set, measured here), and pods
    change often while ipBlocks change with their policy.
    """
    if pol is None:
        return (), {}
    untracked = direction.startswith(RAW)  # a doNotTrack policy's own chain: Allow also `notrack`
    direction = direction.removeprefix(RAW)
    field = "saddr" if direction == IN else "daddr"
    rules: list[str] = []
    sets: PeerSets = {}
    for i, a in enumerate(pol.ingress if direction == IN else pol.egress):
        # every rule counts what it matched in a counter of its own (kept across updates)
        rule_counter = f"{counter}-r{a.index}"
        sets[rule_counter] = (Obj("counter"), ())
        accept = f'counter name "{rule_counter}" ' + ("notrack " if untracked and a.action == "Allow" else "") \
            + _verdict(a.action, counter, f"{pol.key} {direction} {a.index}")
        ports = _ports_match(a.ports, a.not_ports)
        proto = _proto_match(a)
        for version, fam, typ in _FAMILIES:
            v6 = version == 6
            named = tuple(f"{addr} . {_PROTOS[proto]} . {port}" for addr, proto, port in a.named
                          if (":" in addr) == v6)
            # ingress: the peers are the source, and the named ports' triples the pod itself
            want_peers = bool(ports) or (direction == IN and bool(named))
            # notNets / notSelector: per family, a set the peer must not be in
            excluded = ""
            if a.not_peers:
                members = tuple(n for n in a.not_peers if (":" in n) == v6)
                if members:
                    name = f"{counter}-{i}-{version}x"
                    sets[name] = (Obj("set", typ, flags=("interval",)), members)
                    excluded = f"{fam} {field} != @{name}"
                else:
                    excluded = f"meta nfproto ipv{version}"
            addr = [""] if a.peers is None else []
            if a.peers is not None and want_peers:
                for suffix, members, obj in ((f"{version}", a.peers, Obj("set", typ, flags=("interval",))),
                                             (f"{version}p", a.hosts, Obj("set", typ))):
                    elements = tuple(n for n in members if (":" in n) == v6)
                    if elements:
                        name = f"{counter}-{i}-{suffix}"
                        sets[name] = (obj, elements)
                        addr.append(f"{fam} {field} @{name}")
            if a.peers is not None or a.not_peers or version == 4:  # any address: the port rules once
                rules += (" ".join(x for x in (am, excluded, proto, pm, accept) if x) for am in addr for pm in ports)
            if named:
                name = f"{counter}-{i}-{version}n"
                sets[name] = (Obj("set", f"{typ} . inet_proto . inet_service"), named)
                match = f"{fam} daddr . meta l4proto . th dport @{name}"
                sources = addr if direction == IN else [""]
                rules += (" ".join(x for x in (am, excluded, match, accept) if x) for am in sources)
    return tuple(rules), sets


# Calico's Pass: the policy chain marks the packet and returns; the pod's tier chain
# returns at once when it sees the mark, and the next tier starts with it cleared.
PASS_MARK = 0x00010000
_PASSED = f"meta mark & {PASS_MARK:#010x} == {PASS_MARK:#010x} return"
_CLEAR_PASS = f"meta mark set meta mark & {~PASS_MARK & 0xFFFFFFFF:#010x}"
_ICMP = {"ICMP": ("icmp", "icmp"), "1": ("icmp", "icmp"), "ICMPv6": ("ipv6-icmp", "icmpv6"),
         "58": ("ipv6-icmp", "icmpv6")}


def _verdict(action: str, counter: str, where: str) -> str:
    """What a matching rule does. Allow counts into the policy's counter and accepts (ends
    this hook); Deny drops; Pass leaves the tier; Log logs and goes on to the next rule."""
    if action == "Deny":
        return "drop"
    if action == "Pass":
        return f"meta mark set meta mark | {PASS_MARK:#010x} return"
    if action == "Log":  # to the agent's NFLOG reader (policy.nflog: why not the kernel log)
        return f'log prefix "{_UNSAFE_LOG.sub("_", where)[:100]}: " group {nflog.GROUP}'
    return f'counter name "{counter}" accept'


_UNSAFE_LOG = re.compile(r'[^A-Za-z0-9_./:* -]')


def _proto_match(a) -> str:
    """A Calico rule's protocol without ports, and its ICMP type and code."""
    if a.proto is None:
        return ""
    l4, icmp = _ICMP.get(a.proto, (a.proto.lower() if not a.proto.isdigit() else a.proto, None))
    out = f"meta l4proto {l4}"
    if a.icmp is not None and icmp is not None:
        out += f" {icmp} type {a.icmp[0]}"
        if a.icmp[1] is not None:
            out += f" {icmp} code {a.icmp[1]}"
    return out


class FilterManager(TablesManager):
    name = "filter"

    def __init__(self, nft: Nft | None = None, *, netns: str | None = None,
                 failsafe_in: tuple[tuple[str, int], ...] | None = None,
                 failsafe_out: tuple[tuple[str, int], ...] | None = None) -> None:
        self.failsafe_in = host_rules.parse_ports(host_rules.FAILSAFE_INBOUND, "") if failsafe_in is None \
            else failsafe_in
        self.failsafe_out = host_rules.parse_ports(host_rules.FAILSAFE_OUTBOUND, "") if failsafe_out is None \
            else failsafe_out
        self._host_base: tuple | None = None  # what the host base chains were made for
        self.table = NftTable(FAMILY, TABLE)
        super().__init__([self.table], nft, netns)
        for name in MAPS.values():
            self.table.objects.set_desired(name, Obj("map", "ifname", "verdict"))
        for name, chain in BASE_CHAINS.items():
            self.table.chains.set_desired(name, chain)
        self.policies: dict[str, ResolvedPolicy] = {}
        self.pods: dict[str, PodFilter] = {}
        self._users: dict[tuple[str, str], set[str]] = {}  # (policy, direction) -> interfaces
        self._sets: dict[tuple[str, str], PeerSets] = {}  # (policy, direction) -> its peer sets
        # (policy, direction) -> {rule counter: (policy, direction, rule, action)}; `counters`
        # is the whole of it as written, swapped in after each transaction (read by the
        # metrics' thread)
        self._rule_counters: dict[tuple[str, str], dict[str, tuple[str, str, int, str]]] = {}
        self.counters: dict[str, tuple[str, str, int, str]] = {}

    # -- desired -------------------------------------------------------------------------
    def on_update(self, msg: object) -> None:
        if isinstance(msg, PolicyUpdate):
            self._on_policy(msg.key, msg.policy)
        elif isinstance(msg, EndpointFilterUpdate):
            self._on_endpoint(msg.interface, msg.filter)

    def _on_policy(self, key: str, pol: ResolvedPolicy | None) -> None:
        if pol is None:
            self.policies.pop(key, None)
        else:
            self.policies[key] = pol
        for direction in (IN, OUT, RAW + IN, RAW + OUT):
            if self._users.get((key, direction)):
                self._set_policy_chain(key, direction)

    def _set_policy_chain(self, key: str, direction: str) -> None:
        name = policy_chain(key, direction)
        pol = self.policies.get(key)
        rules, sets = policy_rules(pol, direction, name)
        allows = () if pol is None else pol.ingress if direction.removeprefix(RAW) == IN else pol.egress
        self._rule_counters[(key, direction)] = {f"{name}-r{a.index}": (key, direction, a.index, a.action)
                                                 for a in allows}
        self.table.chains.set_desired(name, Chain(rules))
        old = self._sets.pop((key, direction), {})
        for set_name, (obj, elements) in sets.items():
            prev = old.pop(set_name, None)
            if prev is None:
                self.table.objects.set_desired(set_name, obj)
            if prev != (obj, elements):
                self.table.set_elements(set_name, dict.fromkeys(elements, ""))
        self._drop_sets(old)
        if sets:
            self._sets[(key, direction)] = sets

    def _drop_sets(self, sets: PeerSets) -> None:
        for set_name in sets:
            self.table.set_elements(set_name, {})
            self.table.objects.delete_desired(set_name)

    def _on_endpoint(self, interface: str, pod: PodFilter | None) -> None:
        old = self.pods.pop(interface, None)
        if pod is not None:
            self.pods[interface] = pod
        stage, sep, rest = interface.partition(":")
        host = bool(sep)  # a host endpoint's stage ("host", "hostfwd", "hostpre", "hostraw") and interface
        ifname = rest if host else interface
        maps = host_rules.STAGE_MAPS.get(stage, MAPS)
        # before DNAT or conntrack, what no rule matches goes on to the later stages
        final = () if stage in ("hostpre", "hostraw") else ("drop",)
        for direction in (IN, OUT):
            before = _keys(old, direction)
            after = _keys(pod, direction)
            pdir = RAW + direction if stage == "hostraw" else direction  # the policies' chains
            element = None if host and ifname == "*" else (maps[direction], ifname)
            for key in before or ():
                if key not in (after or ()):
                    self._unuse(key, pdir, interface)
            for key in after or ():
                users = self._users.setdefault((key, pdir), set())
                if not users:
                    self._set_policy_chain(key, pdir)
                    self.table.objects.set_desired(policy_chain(key, pdir), Obj("counter"))
                users.add(interface)
            chain = host_rules.host_chain(ifname, direction, stage) if host else pod_chain(interface, direction)
            groups = _tiers(pod, direction) if after is not None else ()
            if pod is None or after is None:
                self.table.chains.delete_desired(chain)
                if element is not None:
                    self.table.elements.delete_desired(element)
            elif before != after or _tiers(old, direction) != groups or old is None:
                self.table.chains.set_desired(chain, Chain(self._pod_rules(chain, after, groups, pdir, final)))
                if element is not None:
                    self.table.elements.set_desired(element, f"jump {chain}")
            for n in range(len(groups), len(_tiers(old, direction)) if old is not None else 0):
                self.table.chains.delete_desired(f"{chain}-t{n}")
        if host:
            self._set_host_base()
        self.table.want = bool(self.pods)

    def _set_host_base(self) -> None:
        """The host base chains and maps while this node has host endpoints (host_rules)."""
        hosts = [p for p in self.pods.values() if p.host]
        want = (self.failsafe_in, self.failsafe_out,
                *(any(p.interface == key + "*" for p in hosts)
                  for key in (host_rules.HOST_KEY, host_rules.FORWARD_KEY, host_rules.PRE_KEY, host_rules.RAW_KEY))) \
            if hosts else None
        if want == self._host_base:
            return
        self._host_base = want
        chains = host_rules.base_chains(*want) if want else host_rules.base_chains((), (), False, False, False, False)
        for name, chain in chains.items():
            if want:
                self.table.chains.set_desired(name, chain)
            else:
                self.table.chains.delete_desired(name)
        for name in (n for maps in host_rules.STAGE_MAPS.values() for n in maps.values()):
            if want:
                self.table.objects.set_desired(name, Obj("map", "ifname", "verdict"))
            else:
                self.table.objects.delete_desired(name)

    def _pod_rules(self, chain: str, keys: tuple[str, ...], groups: tuple[int, ...],
                   direction: str, final: tuple[str, ...] = ("drop",)) -> tuple[str, ...]:
        """Only Kubernetes policies (no groups): jump to each, drop the rest. With Calico
        tiers: a chain per tier (`<chain>-t<n>`: its policies in order, a return after
        each when it passed, the end-of-tier drop), jumped in tier order with the pass
        mark cleared; what passes every tier goes on (allowed)."""
        if not groups:
            return (*(f"jump {policy_chain(k, direction)}" for k in keys), *final)
        rules: list[str] = []
        start = 0
        for n, size in enumerate(groups):
            tier_rules = []
            for k in keys[start:start + size]:
                tier_rules += [f"jump {policy_chain(k, direction)}", _PASSED]
            start += size
            self.table.chains.set_desired(f"{chain}-t{n}", Chain((*tier_rules, *final)))
            rules += [_CLEAR_PASS, f"jump {chain}-t{n}"]
        return tuple(rules)

    def _unuse(self, key: str, direction: str, interface: str) -> None:
        users = self._users.get((key, direction), set())
        users.discard(interface)
        if not users:
            self._users.pop((key, direction), None)
            self.table.chains.delete_desired(policy_chain(key, direction))
            self.table.objects.delete_desired(policy_chain(key, direction))
            self._drop_sets(self._sets.pop((key, direction), {}))
            self._rule_counters.pop((key, direction), None)

    def applied(self) -> None:
        self.counters = {n: v for by_name in self._rule_counters.values() for n, v in by_name.items()}
        log.info("filter table applied", isolated_pods=len(self.pods), policies=len(self.policies))

    def read_counters(self) -> dict[tuple[str, str, int, str], tuple[int, int]]:
        """(policy, direction, rule, action) -> (packets, bytes) of every rule in the table,
        listed now (any thread: one netlink dump of the table's counters)."""
        names = self.counters
        if not names or self._nft is None:
            return {}
        out = {}
        for item in self.nft.list_table(FAMILY, TABLE, "counters") or ():
            c = item.get("counter")
            if c is not None and c["name"] in names:
                out[names[c["name"]]] = (c["packets"], c["bytes"])
        return out


def _tiers(pod: PodFilter | None, direction: str) -> tuple[int, ...]:
    if pod is None:
        return ()
    return pod.ingress_tiers if direction == IN else pod.egress_tiers


def _keys(pod: PodFilter | None, direction: str) -> tuple[str, ...] | None:
    if pod is None:
        return None
    return pod.ingress if direction == IN else pod.egress


def render(f: netpol.Filter) -> str | None:
    """The transaction that creates the table for `f` from nothing (for reading and tests);
    None when no local pod is isolated."""
    mgr = FilterManager()
    for msg in filter_messages(None, f):
        mgr.on_update(msg)
    if not mgr.table.want:
        return None
    mgr.table.present = False
    return mgr.table.script()
