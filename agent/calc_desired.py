"""The desired state computed whole from a `ClusterState`. Pure, no I/O.

`desired()`, `policy_routing()`, `node_addresses()` and `network_policy()` are the same
answers `agent.calc.Calculation` keeps current event by event, computed whole from a
state: the reference that the incremental path is tested against (the sum of the deltas
equals a full recompute, a property test), and what a snapshot (start, compaction)
recomputes before diffing against what was already emitted. The calculation also uses
the helpers here (own blocks, host prefixes, the egress plan, export policies).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from tortie.agent.block_index import BlockIndex
from tortie.agent.calc_services import service_exports
from tortie.agent.state import ClusterState
from tortie.bgp.messages import ExportPolicy
from tortie.bgp.peers import compute_peers
from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import netpol
from tortie.routing.model import MAIN_TABLE, Route, Rule, learned_route

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
