"""The calculation: datastore events and learned routes in, dataplane messages out. Pure.

`Calculation` is what the agent runs: it folds each datastore event (or learned-route
delta) into its `ClusterState` and indexes, and emits only the desired state that changed,
as messages for the dataplane driver's managers (`routing.messages`, `policy.messages`,
`bgp.messages`). Its cost follows the event, not the cluster: a pod ADD touches that pod's
routes, its exports and the policies that select it or name it as a peer.

`desired()`, `policy_routing()`, `node_addresses()` and `network_policy()` are the same
answers computed whole from a state: the reference that the incremental path is tested
against (the sum of the deltas equals a full recompute, a property test), and what a
snapshot (start, compaction) recomputes before diffing against what was already emitted.
No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from tortie.agent.block_index import BlockIndex
from tortie.agent.calc_policy import PolicyCalculator
from tortie.agent.calc_services import ServiceCalculator, service_export_policies, service_exports
from tortie.agent.state import ClusterState
from tortie.bgp.messages import BGPConfigUpdate, ExportDelta, ExportPolicy
from tortie.bgp.peers import compute_peers
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import netpol
from tortie.policy.messages import NatUpdate
from tortie.routing.messages import RouteDelta, RouteKey, RulesUpdate
from tortie.routing.model import MAIN_TABLE, Route, Rule, learned_route, route_key

__all__ = ["Calculation", "ClusterState", "Desired", "EgressPlan", "desired", "egress_exports", "egress_imports",
           "egress_plan", "export_policies", "host_prefix", "network_policy", "node_addresses", "policy_routing"]

log = get_logger("calc")

# Policy routing priorities (inside the range the rule manager owns). Pool destinations
# come first so pod-to-pod traffic keeps the cluster routes; then per-pool egress.
PRIO_TO_POOLS = 100
PRIO_EGRESS = 110
PRIO_EGRESS_FLOOR = 111  # `from <pool> unreachable`: what the pool's table does not route


@dataclass(frozen=True)
class Desired:
    block_routes: frozenset[Route]
    workload_routes: frozenset[Route]
    bgp_routes: frozenset[Route]
    exports: frozenset[str]
    rules: frozenset[Rule] = frozenset()
    egress_routes: frozenset[Route] = frozenset()
    refused: Mapping[str, str] = field(default_factory=dict)  # learned prefix -> why not installed


def _pool_of(net: ipaddress._BaseNetwork, pools: Mapping[str, res.IPPool]) -> res.IPPool | None:
    for pool in pools.values():
        pnet = ipaddress.ip_network(pool.cidr)
        if pnet.version == net.version and net.subnet_of(pnet):
            return pool
    return None


def node_addresses(state: ClusterState) -> list[str]:
    """Every node's addresses: its BGP ones and those in `spec.addresses` (a node with
    several uplinks lists them all there), bare, sorted. Traffic to them is pod-to-node."""
    out = set()
    for n in state.nodes.values():
        out.update(a for a in (n.ipv4, n.ipv6) if a)
        out.update(str(ipaddress.ip_interface(a).ip) for a in n.addresses)
    return sorted(out)


def bgp_peers(state: ClusterState, node: str) -> tuple:
    """This node's BGP peers (`bgp.peers.Peer`), from the datastore."""
    me = state.nodes.get(node)
    if me is None:
        return ()
    return tuple(compute_peers(me, list(state.nodes.values()), list(state.bgp_peers.values()),
                               state.bgp_config(node)))


def bfd_silenced(state: ClusterState, node: str, bfd_up: frozenset[str]) -> frozenset[str]:
    """BGP peers watched by BFD whose session is not Up: the routes they are the next hop
    of are left out (at once when BFD goes Down, not after the BGP hold time)."""
    return frozenset(p.address for p in bgp_peers(state, node) if p.bfd and p.address not in bfd_up)


def import_refusal(prefix: str, blocks: BlockIndex, local: Container[str],
                   elsewhere: Container[str]) -> str | None:
    """Why a learned prefix must not be installed, or None: it would take traffic for a
    local pod (its own /32), or for a part of one of this node's blocks, away from this
    node. A /32 in our block that a pod on another node holds is no hijack: that pod
    borrowed the address, and its node announces it."""
    if prefix in local:
        return "a local pod's address"
    cidr = blocks.containing(prefix)
    if cidr is None or prefix in elsewhere:
        return None
    return f"inside this node's block {cidr}"


def workload_prefixes(state: ClusterState, node: str) -> tuple[set[str], set[str]]:
    """The host prefixes of this node's wired pods, and of pods on other nodes."""
    local: set[str] = set()
    elsewhere: set[str] = set()
    for wep in state.weps.values():
        if wep.node == node and wep.interface_name:
            local.update(_prefixes(wep))
        elif wep.node != node:
            elsewhere.update(_prefixes(wep))
    return local, elsewhere


def _prefixes(wep: res.WorkloadEndpoint) -> list[str]:
    return [str(ipaddress.ip_network(c, strict=False)) for c in wep.ip_networks]


def own_blocks(state: ClusterState, node: str) -> list[str]:
    """This node's confirmed blocks."""
    return sorted(c for (n, c), confirmed in state.affinities.items() if n == node and confirmed)


def host_prefix(address: str) -> str:
    """An address as a /32 or /128."""
    addr = ipaddress.ip_address(address)
    return f"{addr}/{addr.max_prefixlen}"


def _pools_holding(wep: res.WorkloadEndpoint, pools: Mapping[str, res.IPPool]) -> set[str]:
    """The names of the pools an endpoint has addresses in."""
    out = set()
    for cidr in wep.ip_networks:
        pool = _pool_of(ipaddress.ip_network(cidr, strict=False), pools)
        if pool is not None:
            out.add(pool.name)
    return out


def egress_exports(state: ClusterState, node: str) -> set[str]:
    """The egress addresses (/32, /128) this node announces: those of the pools it holds
    pods of, so replies to the pods' translated traffic come back to it."""
    pools = {p.name: p for p in state.pools.values() if _announces_egress(p)}
    if not pools:
        return set()
    held: set[str] = set()
    for wep in state.weps.values():
        if wep.node == node and wep.interface_name:
            held |= _pools_holding(wep, pools)
    return {host_prefix(pools[name].egress.address) for name in held}


def _announces_egress(pool: res.IPPool) -> bool:
    """A pool's egress address goes out over BGP unless the pool exports nothing: then the
    replies must come back by routes of the operator's own (disableBGPExport)."""
    return bool(pool.egress and pool.egress.address) and not pool.disable_bgp_export


def export_policies(state: ClusterState, peers: Iterable) -> tuple[ExportPolicy, ...]:
    """Per pool, how its exports go out (`IPPool.spec.bgp`): its blocks to the external
    peers (routers) whose BGPPeer labels match `bgp.peers` and to every other tortie node
    (pods must reach pods), with its communities and prepending; its egress address only
    to those external peers (all of them without `bgp.peers`), never to other nodes (they
    would route the replies of this node's flows to another node)."""
    peers = list(peers)
    external = [p for p in peers if p.external]
    internal = frozenset(p.address for p in peers if not p.external)
    out = []
    for pool in sorted(state.pools.values(), key=lambda p: p.name):
        b = pool.bgp or res.PoolBGP()
        chosen = frozenset(p.address for p in external if b.peers is None or (
            (bp := state.bgp_peers.get(p.name)) is not None and b.selects(bp.labels)))
        if b.peers is not None or b.communities or b.as_path_prepend:
            out.append(ExportPolicy(pool.cidr, None if b.peers is None else internal | chosen,
                                    b.communities, b.as_path_prepend))
        if pool.egress and pool.egress.address:
            out.append(ExportPolicy(host_prefix(pool.egress.address), chosen, b.communities, b.as_path_prepend))
    return tuple(out)


def desired(
    state: ClusterState,
    node: str,
    learned: Mapping[str, tuple[str, ...]] = (),
    own_addresses: frozenset[str] = frozenset(),
    bfd_up: frozenset[str] = frozenset(),
    egress_learned: EgressLearned | None = None,
) -> Desired:
    """What this node's managers should hold.

    - blackhole per confirmed block, so traffic to an unused address in it stops here
      instead of leaking to the default route;
    - a /32 (/128) link route per local workload address;
    - exports: confirmed blocks in pools that allow export, plus local addresses that sit
      in no block of ours (borrowed from another node's block);
    - routes learned over BGP, except our own blocks coming back to us.
    """
    blocks = own_blocks(state, node)
    block_nets = [ipaddress.ip_network(c) for c in blocks]
    block_routes = frozenset(Route(dst=c, type="blackhole") for c in blocks)

    workload_routes: set[Route] = set()
    exports: set[str] = set()
    for c, net in zip(blocks, block_nets, strict=True):
        pool = _pool_of(net, state.pools)
        if pool is not None and not pool.disable_bgp_export:
            exports.add(c)
    for wep in state.weps.values():
        if wep.node != node or not wep.interface_name:
            continue
        for cidr in wep.ip_networks:
            net = ipaddress.ip_network(cidr, strict=False)
            workload_routes.add(Route(dst=str(net), dev=wep.interface_name, scope="link"))
            if any(net.version == b.version and net.subnet_of(b) for b in block_nets):
                continue
            pool = _pool_of(net, state.pools)
            if pool is not None and not pool.disable_bgp_export:
                exports.add(str(net))  # borrowed: the owner's block route is less specific

    exports |= egress_exports(state, node) | service_exports(state, node)
    own = set(blocks)
    bgp_routes = set()
    refused = {}
    skip = own_addresses | bfd_silenced(state, node, bfd_up)
    local, elsewhere = workload_prefixes(state, node)
    owned = BlockIndex(zip(blocks, block_nets, strict=True))
    for prefix, hops in dict(learned).items():
        hops = tuple(sorted(h for h in hops if h not in skip))
        if prefix in own or not hops:
            continue
        why = import_refusal(prefix, owned, local, elsewhere)
        if why:
            refused[prefix] = why
            continue
        bgp_routes.add(learned_route(prefix, hops))  # canonical from ExaBGP: no re-validation
    rules, egress_routes = policy_routing(state, bfd_up, node, egress_learned)
    return Desired(frozenset(block_routes), frozenset(workload_routes), frozenset(bgp_routes),
                   frozenset(exports), rules, egress_routes, refused)


@dataclass(frozen=True)
class EgressPlan:
    """One egress pool on this node: the routes its table should get, or why none."""

    pool: str
    cidr: str
    table: int
    next_hops: tuple[str, ...]  # all the routes' next hops (static, or learned: fromPeers)
    routes: tuple[Route, ...]  # the default route (fromPeers: one per prefix some peer announces)
    problem: str | None = None  # set when routes is empty
    fallback: str = "none"  # "main": no floor under the table (see policy_routing)
    bfd: tuple[tuple[str, int, int, int], ...] = ()  # next hops BFD watches (Egress.bfd)
    from_peers: str | None = None  # the BGPPeer selector the next hops are learned from
    missing: tuple[str, ...] = ()  # fromPeers prefixes no selected peer announces now
    address: str | None = None  # egress address (Egress.address)


# What a peer announced that egress pools take (IPPool egress.fromPeers): peer address ->
# prefix -> next hop, only while its session is established (the speaker's egress view).
EgressLearned = Mapping[str, Mapping[str, str]]


def _default(version: int) -> str:
    return "0.0.0.0/0" if version == 4 else "::/0"


def egress_peers(state: ClusterState, node: str, pool: res.IPPool) -> list:
    """The BGP peers of this node a fromPeers pool takes its next hops from: those made by a
    BGPPeer whose labels the selector matches, of the pool's family."""
    from tortie.datastore import selector

    sel = selector.parse(pool.egress.from_peers)
    names = {bp.name for bp in state.bgp_peers.values() if sel.matches(bp.labels)}
    return [p for p in bgp_peers(state, node) if p.name in names and p.version == pool.version]


def egress_imports(state: ClusterState, node: str) -> dict[str, frozenset[str]]:
    """Per BGP peer address: the prefixes fromPeers pools take from it (the speaker keeps
    them out of the learned table and hands them to the agent apart)."""
    out: dict[str, set[str]] = {}
    for p in state.pools.values():
        if p.egress and p.egress.from_peers is not None:
            prefixes = p.egress.prefixes or (_default(p.version),)
            for peer in egress_peers(state, node, p):
                out.setdefault(peer.address, set()).update(prefixes)
    return {a: frozenset(v) for a, v in out.items()}


def _learned_plan(state: ClusterState, node: str, p: res.IPPool, bfd_up: frozenset[str],
                  learned: EgressLearned) -> tuple[list[Route], tuple[str, ...], str | None]:
    """A fromPeers pool's routes: per prefix, ECMP over the selected peers that announce it
    (a peer watched by BFD counts only while its session is Up); the prefixes none
    announces; why there is no route at all."""
    e = p.egress
    selected = egress_peers(state, node, p)
    silenced = sorted(q.address for q in selected if q.bfd and q.address not in bfd_up)
    routes, missing = [], []
    for prefix in e.prefixes or (_default(p.version),):
        hops = sorted({learned[q.address][prefix] for q in selected
                       if q.address not in silenced and prefix in learned.get(q.address, {})},
                      key=ipaddress.ip_address)
        if hops:
            routes.append(Route(dst=prefix, table=e.table, gateways=tuple(hops)))
        else:
            missing.append(prefix)
    problem = None
    if not selected:
        problem = f"no BGP peer of this node matches fromPeers {e.from_peers!r}"
    elif not routes:
        problem = f"no next hop: no BGP peer matching {e.from_peers!r} announces {', '.join(missing)}"
        if silenced:
            problem += f" (BFD down: {', '.join(silenced)})"
    return routes, tuple(missing), problem


def egress_plan(state: ClusterState, bfd_up: frozenset[str] = frozenset(), node: str = "",
                learned: EgressLearned | None = None) -> tuple[EgressPlan, ...]:
    """Per egress pool (by name): the routes of its table (the default route by ECMP over its
    usable next hops; for fromPeers, what the selected peers announce), or the reason it has
    none (its traffic is then refused: see `policy_routing`). A next hop watched by BFD is
    usable only while its session is Up (`bfd_up`)."""
    plans: list[EgressPlan] = []
    taken: dict[tuple[int, int], EgressPlan] = {}
    for p in sorted((p for p in state.pools.values() if p.egress), key=lambda p: p.name):
        e = p.egress
        version = ipaddress.ip_network(p.cidr).version
        missing: tuple[str, ...] = ()
        if e.from_peers is not None:
            routes, missing, problem = _learned_plan(state, node, p, bfd_up, learned or {})
            hops = tuple(sorted({h for r in routes for h in r.gateways}, key=ipaddress.ip_address))
        else:
            watched = {b[0] for b in e.bfd}
            hops = tuple(sorted(h for h in e.next_hops if h not in watched or h in bfd_up))
            problem = None  # (next hops of the pool's family: the schema refuses others)
            # With `interface`, the next hops are reached through that device only (the
            # route waits for the device like any other).
            routes = [Route(dst=_default(version), table=e.table, gateways=hops, dev=e.interface)] if hops else []
            if not hops:
                problem = "no next hop is up (BFD down: " + ", ".join(sorted(watched)) + ")"
        if problem is None and (first := taken.get((e.table, version))) is not None \
                and set(first.routes) != set(routes):
            problem = f"table {e.table} is pool {first.pool}'s, with next hops {', '.join(first.next_hops)}"
        if problem is not None:
            log.warning("egress not installable", pool=p.name, why=problem, fallback=e.fallback)
            plans.append(EgressPlan(p.name, p.cidr, e.table, hops, (), problem, e.fallback, e.bfd,
                                    e.from_peers, missing, e.address))
            continue
        plan = EgressPlan(p.name, p.cidr, e.table, hops, tuple(routes), None, e.fallback, e.bfd,
                          e.from_peers, missing, e.address)
        taken.setdefault((e.table, version), plan)
        plans.append(plan)
    return tuple(plans)


def policy_routing(state: ClusterState, bfd_up: frozenset[str] = frozenset(), node: str = "",
                   learned: EgressLearned | None = None,
                   plans: tuple[EgressPlan, ...] | None = None) -> tuple[frozenset[Rule], frozenset[Route]]:
    """Per-pool egress: `from <pool> lookup <table>`, the table's default via the pool's
    next hop, and under it `from <pool> unreachable`: fail closed. When the table has no
    route (the next hop is on no up link, the kernel refused it, the link went down, no
    selected peer announces it) the pool's traffic is refused; it never falls through to
    the main table and leaves by another uplink. A pool whose route cannot be planned gets
    the floor only. A pool with `fallback: main` has no floor: what its table does not
    route takes the main table.

    Only while some pool has egress routing; then every pool's range is first sent to the
    main table, so traffic between pods (any pool) never takes an egress uplink.

    An egress address gets a blackhole in the main table: replies to the pool's flows are
    un-NATed (conntrack, prerouting) before any route is looked up, so only packets no flow
    of this node knows meet it, and they stop here instead of bouncing off the default
    route back to the router that sent them.
    """
    if plans is None:
        plans = egress_plan(state, bfd_up, node, learned)
    if not plans:
        return frozenset(), frozenset()
    rules = {Rule(priority=PRIO_TO_POOLS, dst=p.cidr, table=MAIN_TABLE) for p in state.pools.values()}
    for plan in plans:
        if plan.routes:
            rules.add(Rule(priority=PRIO_EGRESS, src=plan.cidr, table=plan.table))
        if plan.fallback == "none":
            rules.add(Rule(priority=PRIO_EGRESS_FLOOR, src=plan.cidr, action="unreachable"))
    routes = {r for p in plans for r in p.routes}
    routes |= {Route(dst=host_prefix(p.address), type="blackhole") for p in plans if p.address}
    return frozenset(rules), frozenset(routes)


def network_policy(state: ClusterState, node: str) -> netpol.Filter:
    """This node's pods under the cluster's NetworkPolicies (see `policy.netpol`)."""
    return netpol.compute(node, [*state.weps.values()],
                          [*state.policies.values(), *state.calico_policies.values(), *state.global_policies.values()],
                          state.namespaces, state.tiers, state.host_endpoints.values())


# --- the incremental calculation ----------------------------------------------------------

# Route classes (see routing.route_mgr.CLASS_PRIORITY): "bgp-adopted" holds the learned
# routes a restarted agent found in the kernel until the peers' full tables are in.
BLOCKS, WORKLOADS, BGP, ADOPTED, EGRESS = "blocks", "workloads", "bgp", "bgp-adopted", "egress"
RULES_EGRESS = "egress"


class _RouteOut:
    """What was emitted for one route class (`emitted`), what the managers were sent
    (`sent`), and the keys touched since the last `take()`."""

    __slots__ = ("cls", "emitted", "sent", "touched")

    def __init__(self, cls: str) -> None:
        self.cls = cls
        self.emitted: dict[RouteKey, Route] = {}
        self.sent: dict[RouteKey, Route] = {}
        self.touched: set[RouteKey] = set()

    def set(self, route: Route) -> None:
        k = route.key
        if self.emitted.get(k) != route:
            self.emitted[k] = route
            self.touched.add(k)

    def remove(self, k: RouteKey) -> None:
        if self.emitted.pop(k, None) is not None:
            self.touched.add(k)

    def replace(self, routes: Iterable[Route]) -> None:
        want = {r.key: r for r in routes}
        for k in [k for k in self.emitted if k not in want]:
            self.remove(k)
        for r in want.values():
            self.set(r)

    def take(self) -> RouteDelta | None:
        if not self.touched:
            return None
        emitted, sent = self.emitted, self.sent
        routes, removed = [], []
        for k in self.touched:
            want = emitted.get(k)
            if want is None:
                if sent.pop(k, None) is not None:
                    removed.append(k)
            elif sent.get(k) != want:
                sent[k] = want
                routes.append(want)
        self.touched = set()
        if not routes and not removed:
            return None
        return RouteDelta(self.cls, tuple(routes), tuple(removed))


def _count(counts: dict[str, int], before: Iterable[str], after: Iterable[str]) -> None:
    """Reference counts: one less for each of `before`, one more for each of `after`."""
    for k in before:
        n = counts[k] - 1
        if n:
            counts[k] = n
        else:
            del counts[k]
    for k in after:
        counts[k] = counts.get(k, 0) + 1


def _wep_routes(wep: res.WorkloadEndpoint) -> list[Route]:
    return [Route(dst=str(ipaddress.ip_network(c, strict=False)), dev=wep.interface_name, scope="link")
            for c in wep.ip_networks]


class Calculation:
    """This node's desired dataplane state, kept current event by event.

    Feed it `on_snapshot(items)` (full keys -> values; start and compaction), then
    `on_update(key, value)` per datastore event and `on_learned(changed, removed)` per
    learned-route delta; `take_messages()` returns what changed since the last call.
    """

    def __init__(self, node: str, prefix: str = "/tortie/",
                 own_addresses: frozenset[str] = frozenset()) -> None:
        self.node = node
        self.own_addresses = frozenset(own_addresses)
        self.state = ClusterState(prefix=prefix)
        st = self.state
        self.policy = PolicyCalculator(node, st.weps, st.policies, st.namespaces, st.calico_policies,
                                       st.global_policies, st.tiers, st.host_endpoints)
        self.services = ServiceCalculator(node, self.state)
        self.learned: dict[str, tuple[str, ...]] = {}
        self._out = {c: _RouteOut(c) for c in (BLOCKS, WORKLOADS, BGP, ADOPTED, EGRESS)}
        self._blocks: list[tuple[str, ipaddress._BaseNetwork]] = []  # own confirmed blocks
        self._block_index = BlockIndex()
        self._block_set: frozenset[str] = frozenset()
        self._exports: set[str] = set()
        self._block_exports: set[str] = set()
        self._borrowed: dict[str, int] = {}  # local addresses outside our blocks -> endpoints
        # host prefixes of wired local pods, and of pods on other nodes (endpoint counts):
        # what a learned route may not take over, and what it may (see import_refusal)
        self._local_prefixes: Counter[str] = Counter()
        self._elsewhere: Counter[str] = Counter()
        self.refused: dict[str, str] = {}  # learned prefixes not installed -> why
        self._pool_pods: dict[str, int] = {}  # pool name -> local endpoints with addresses in it
        self._egress_exports: set[str] = set()  # egress addresses of the pools we hold pods of
        self._export_added: set[str] = set()
        self._export_removed: set[str] = set()
        self._rules: frozenset[Rule] | None = None
        self.egress: tuple[EgressPlan, ...] = ()  # this node's egress pools (for status)
        self.egress_learned: dict[str, dict[str, str]] = {}  # the speaker's egress view (EgressLearned)
        self.egress_imports: dict[str, frozenset[str]] = {}  # what the speaker should set apart for it
        self.bfd_up: frozenset[str] = frozenset()  # BFD peers whose session is Up
        self.bfd_peers: dict[str, tuple[int, int, int]] = {}  # BGP peers watched by BFD: timers
        self._silenced: frozenset[str] = frozenset()  # of those, the ones not Up
        self._rules_msg: RulesUpdate | None = None
        self._nat: NatUpdate | None = None
        self._nat_msg: NatUpdate | None = None
        self._bgp: BGPConfigUpdate | None = None
        self._bgp_msg: BGPConfigUpdate | None = None

    # -- inputs ---------------------------------------------------------------------------
    def on_snapshot(self, items: Mapping[str, bytes]) -> None:
        """Replace the whole datastore view; emitted state is diffed against a full recompute."""
        self.state.clear()
        for key, value in items.items():
            self.state.apply(key, value)
        self._recompute()

    def on_update(self, key: str, value: bytes | None) -> bool:
        """One datastore event; True if the calculation reads that key."""
        st = self.state
        rel = st.relative(key)
        if rel is None:
            return False
        found = keys.parse_resource(rel)
        if found is None:
            aff = keys.parse_affinity(rel)
            if aff is None or not st.apply_relative(rel, value, key):
                return False
            if aff[0] == self.node:
                self._blocks_changed()
            return True
        kind, namespace, name = found
        old = self._lookup(kind, namespace, name)
        if not st.apply_relative(rel, value, key):
            return False
        new = self._lookup(kind, namespace, name)
        if old is new:
            return True
        if kind == "workloadendpoint":
            self._wep_changed(old, new)
        elif kind in ("networkpolicy", "networkpolicy.tortie.io", "globalnetworkpolicy"):
            self.policy.on_policy(netpol.policy_key(old or new))
        elif kind in ("tier", "hostendpoint"):
            self.policy.on_tier()
        elif kind == "namespace":
            self.policy.on_namespace(name)
        elif kind in ("service", "endpointslice"):
            before = self.services.exports
            if kind == "service":
                self.services.on_service(namespace, name)
            else:
                self.services.on_slice(namespace, name, old, new)
            if self.services.exports != before:
                self._exports_recompute()
        elif kind == "ippool":
            self.services.on_pools()
            self._exports_recompute()
            self._policy_routing()
            self._nat_recompute()
            self._bgp_recompute()
        elif kind == "node":
            self._nat_recompute()
            self._bgp_recompute()
            self._peers_changed()
        elif kind in ("bgppeer", "bgpconfiguration"):
            self.services.on_bgp_config()
            self._exports_recompute()
            self._bgp_recompute()
            self._peers_changed()
        return True

    def on_egress_learned(self, view: EgressLearned) -> None:
        """The speaker's egress view changed: per established peer, what it announces of the
        prefixes fromPeers pools take (see `egress_imports`)."""
        view = {peer: dict(routes) for peer, routes in view.items()}
        if view != self.egress_learned:
            self.egress_learned = view
            self._policy_routing()

    def on_learned(self, changed: Mapping[str, tuple[str, ...]], removed: Iterable[str] = ()) -> None:
        """Routes the speaker learned (prefix -> next hops) and withdrew."""
        learned = self.learned
        for prefix, hops in changed.items():
            learned[prefix] = hops
            self._learned_one(prefix)
        for prefix in removed:
            if learned.pop(prefix, None) is not None:
                self._learned_one(prefix)

    def replace_learned(self, rib: Mapping[str, tuple[str, ...]]) -> None:
        """The speaker's whole table (its first, or after a restart of the speaker)."""
        learned = self.learned
        gone = [p for p in learned if p not in rib]
        self.on_learned({p: h for p, h in rib.items() if learned.get(p) != h}, gone)

    def adopt(self, routes: Iterable[Route]) -> None:
        """Learned routes a previous agent left in the kernel: kept until `drop_adopted()`."""
        for r in routes:
            self._out[ADOPTED].set(r)

    def drop_adopted(self) -> None:
        self._out[ADOPTED].replace(())

    def take_messages(self) -> list:
        """What changed since the last call, in the order the managers should see it."""
        out: list = []
        for cls in (BLOCKS, WORKLOADS, BGP, ADOPTED, EGRESS):
            msg = self._out[cls].take()
            if msg is not None:
                out.append(msg)
        if self._rules_msg is not None:
            out.append(self._rules_msg)
            self._rules_msg = None
        if self._nat_msg is not None:
            out.append(self._nat_msg)
            self._nat_msg = None
        out += self.policy.take()
        out += self.services.take()
        if self._bgp_msg is not None:
            out.append(self._bgp_msg)
            self._bgp_msg = None
        if self._export_added or self._export_removed:
            out.append(ExportDelta(frozenset(self._export_added), frozenset(self._export_removed)))
            self._export_added, self._export_removed = set(), set()
        return out

    # -- reading ----------------------------------------------------------------------------
    @property
    def exports(self) -> frozenset[str]:
        return frozenset(self._exports)

    def routes(self, cls: str) -> dict[RouteKey, Route]:
        return dict(self._out[cls].emitted)

    def route_count(self, cls: str) -> int:
        return len(self._out[cls].emitted)

    # -- internals --------------------------------------------------------------------------
    def _lookup(self, kind: str, namespace: str | None, name: str):
        spec = (self.state.NAMESPACED if namespace is not None else self.state.KINDS).get(kind)
        if spec is None:
            return None
        table = getattr(self.state, spec[0])
        return table.get((namespace, name) if namespace is not None else name)

    def _recompute(self) -> None:
        st = self.state
        blocks = own_blocks(st, self.node)
        self._set_blocks(blocks)
        self._local_prefixes, self._elsewhere = Counter(), Counter()
        for wep in st.weps.values():
            self._count_wep(wep, 1)
        want = desired(st, self.node, self.learned, self.own_addresses, self.bfd_up, self.egress_learned)
        for prefix in set(want.refused) - set(self.refused):
            log.warning("learned route refused", prefix=prefix, why=want.refused[prefix])
        self.refused = dict(want.refused)
        self._out[BLOCKS].replace(want.block_routes)
        self._out[WORKLOADS].replace(want.workload_routes)
        self._out[BGP].replace(want.bgp_routes)
        self._out[EGRESS].replace(want.egress_routes)
        self.egress = egress_plan(st, self.bfd_up, self.node, self.egress_learned)
        self.egress_imports = egress_imports(st, self.node)
        self._set_rules(want.rules)
        self.services.recompute()  # before the exports: they hold the Services' announcements
        self._exports_recompute()  # builds the borrowed index; equals want.exports (tested)
        self._nat_recompute()
        self._bgp_recompute()
        self.policy.recompute()

    def _local(self, wep: res.WorkloadEndpoint | None) -> bool:
        return wep is not None and wep.node == self.node and bool(wep.interface_name)

    def _count_wep(self, wep: res.WorkloadEndpoint | None, n: int) -> None:
        if wep is None:
            return
        counter = self._local_prefixes if self._local(wep) else self._elsewhere if wep.node != self.node else None
        if counter is not None:
            for prefix in _prefixes(wep):
                counter[prefix] += n
                if counter[prefix] <= 0:
                    del counter[prefix]

    def _wep_changed(self, old: res.WorkloadEndpoint | None, new: res.WorkloadEndpoint | None) -> None:
        self._count_wep(old, -1)
        self._count_wep(new, 1)
        for prefix in {*(_prefixes(old) if old else ()), *(_prefixes(new) if new else ())}:
            if prefix in self.learned:  # a learned /32 may now take over a pod, or may no longer
                self._learned_one(prefix)
        if self._local(old) or self._local(new):
            out = self._out[WORKLOADS]
            want = {r.key: r for r in _wep_routes(new)} if self._local(new) else {}
            if self._local(old):
                for r in _wep_routes(old):
                    if r.key not in want:
                        out.remove(r.key)
            for r in want.values():
                out.set(r)
            before, after = self._borrowed_of(old), self._borrowed_of(new)
            pools_before, pools_after = self._pools_of(old), self._pools_of(new)
            if before != after or pools_before != pools_after:
                _count(self._borrowed, before, after)
                _count(self._pool_pods, pools_before, pools_after)
                self._egress_exports = self._held_egress()
                self._set_exports(self._block_exports | self._borrowed.keys() | self._egress_exports | self.services.exports)
        self.policy.on_wep(old, new)

    def _pools_of(self, wep: res.WorkloadEndpoint | None) -> set[str]:
        return _pools_holding(wep, self.state.pools) if self._local(wep) else set()

    def _held_egress(self) -> set[str]:
        pools = self.state.pools
        return {host_prefix(p.egress.address) for name in self._pool_pods
                if (p := pools.get(name)) is not None and _announces_egress(p)}

    def _borrowed_of(self, wep: res.WorkloadEndpoint | None) -> list[str]:
        """A local endpoint's addresses outside our blocks, in a pool that exports: announced
        as /32 (/128) since the owner's block route is less specific."""
        if not self._local(wep):
            return []
        out = []
        for cidr in wep.ip_networks:
            net = ipaddress.ip_network(cidr, strict=False)
            if any(net.version == b.version and net.subnet_of(b) for _, b in self._blocks):
                continue
            pool = _pool_of(net, self.state.pools)
            if pool is not None and not pool.disable_bgp_export:
                out.append(str(net))
        return out

    def _set_blocks(self, blocks: list[str]) -> None:
        self._blocks = [(c, ipaddress.ip_network(c)) for c in blocks]
        self._block_index = BlockIndex(self._blocks)
        self._block_set = frozenset(blocks)

    def _blocks_changed(self) -> None:
        blocks = own_blocks(self.state, self.node)
        if frozenset(blocks) == self._block_set:
            return
        before = self._block_set
        self._set_blocks(blocks)
        self._out[BLOCKS].replace(Route(dst=c, type="blackhole") for c in blocks)
        self._exports_recompute()
        changed = before ^ self._block_set
        for prefix in changed:  # our own block coming back is never routed
            if prefix in self.learned:
                self._learned_one(prefix)
        # ... nor what is more specific than a block of ours (see import_refusal): only what
        # lies inside a block that came or went can change its answer
        inside = BlockIndex((c, ipaddress.ip_network(c)) for c in changed).containing
        for prefix in [p for p in self.learned if inside(p)]:
            self._learned_one(prefix)

    def _exports_recompute(self) -> None:
        """Blocks of pools that export, and local addresses outside our blocks (borrowed)."""
        pools = self.state.pools
        self._block_exports = set()
        for c, net in self._blocks:
            pool = _pool_of(net, pools)
            if pool is not None and not pool.disable_bgp_export:
                self._block_exports.add(c)
        self._borrowed, self._pool_pods = {}, {}
        for wep in self.state.weps.values():
            _count(self._borrowed, (), self._borrowed_of(wep))
            _count(self._pool_pods, (), self._pools_of(wep))
        self._egress_exports = self._held_egress()
        self._set_exports(self._block_exports | self._borrowed.keys() | self._egress_exports | self.services.exports)

    def _set_exports(self, exports: set[str]) -> None:
        for p in exports - self._exports:
            if p in self._export_removed:
                self._export_removed.discard(p)
            else:
                self._export_added.add(p)
        for p in self._exports - exports:
            if p in self._export_added:
                self._export_added.discard(p)
            else:
                self._export_removed.add(p)
        self._exports = exports

    def _learned_one(self, prefix: str) -> None:
        hops = self.learned.get(prefix)
        out = self._out[BGP]
        if hops is not None and prefix not in self._block_set:
            own, silenced = self.own_addresses, self._silenced
            hops = tuple(sorted(h for h in hops if h not in own and h not in silenced))
            if hops:
                why = import_refusal(prefix, self._block_index, self._local_prefixes, self._elsewhere)
                if why is None:
                    self.refused.pop(prefix, None)
                    out.set(learned_route(prefix, hops))
                    return
                if self.refused.get(prefix) != why:
                    log.warning("learned route refused", prefix=prefix, why=why, via=hops)
                    self.refused[prefix] = why
                out.remove(route_key(prefix))
                return
        self.refused.pop(prefix, None)
        out.remove(route_key(prefix))

    def on_bfd(self, peer: str, up: bool) -> None:
        """A BFD session (to an egress next hop or a BGP peer) went Up or Down."""
        bfd_up = self.bfd_up | {peer} if up else self.bfd_up - {peer}
        if bfd_up != self.bfd_up:
            self.bfd_up = bfd_up
            self._policy_routing()
            self._refresh_silenced()

    def _policy_routing(self) -> None:
        st = self.state
        self.egress = egress_plan(st, self.bfd_up, self.node, self.egress_learned)
        self.egress_imports = egress_imports(st, self.node)
        rules, routes = policy_routing(st, plans=self.egress)
        self._set_rules(rules)
        self._out[EGRESS].replace(routes)

    def _peers_changed(self) -> None:
        """The BGP peers (or their labels) changed: fromPeers pools may select others."""
        if any(p.egress and p.egress.from_peers is not None for p in self.state.pools.values()):
            self._policy_routing()

    def _set_rules(self, rules: frozenset[Rule]) -> None:
        if rules != self._rules:
            self._rules = rules
            self._rules_msg = RulesUpdate(RULES_EGRESS, rules)

    def _nat_recompute(self) -> None:
        pools = self.state.pools.values()
        msg = NatUpdate(frozenset(p.cidr for p in pools if p.nat_outgoing),
                        frozenset(p.cidr for p in pools),
                        frozenset(node_addresses(self.state)),
                        frozenset((p.cidr, p.egress.address) for p in pools if p.egress and p.egress.address))
        if msg != self._nat:
            self._nat = self._nat_msg = msg

    def _bgp_recompute(self) -> None:
        st = self.state
        conf = st.bgp_config(self.node)
        peers = bgp_peers(st, self.node)
        msg = BGPConfigUpdate(peers, frozenset(p.cidr for p in st.pools.values()),
                              tuple(getattr(conf, "communities", ()) or ()),
                              export_policies(st, peers) + service_export_policies(st, self.node, peers))
        if msg != self._bgp:
            self._bgp = self._bgp_msg = msg
        self.bfd_peers = {p.address: p.bfd for p in peers if p.bfd}
        self._refresh_silenced()

    def _refresh_silenced(self) -> None:
        silenced = frozenset(a for a in self.bfd_peers if a not in self.bfd_up)
        if silenced != self._silenced:
            self._silenced = silenced
            for prefix in list(self.learned):
                self._learned_one(prefix)

