"""The calculation: datastore events and learned routes in, dataplane messages out. Pure.

`Calculation` is what the agent runs: it folds each datastore event (or learned-route
delta) into its `ClusterState` and indexes, and emits only the desired state that changed,
as messages for the dataplane driver's managers (`routing.messages`, `policy.messages`,
`bgp.messages`). Its cost follows the event, not the cluster: a pod ADD touches that pod's
routes, its exports and the policies that select it or name it as a peer.

The same answers computed whole from a state (`desired()`, `policy_routing()`, ...) are in
`agent.calc_desired`; the names outside code uses are re-exported here. No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping

from tortie.agent.block_index import BlockIndex
from tortie.agent.calc_desired import (
    Desired,
    EgressLearned,
    EgressPlan,
    _announces_egress,
    _pool_of,
    _pools_holding,
    _prefixes,
    bgp_peers,
    desired,
    egress_exports,
    egress_imports,
    egress_plan,
    export_policies,
    host_prefix,
    import_refusal,
    network_policy,
    node_addresses,
    own_blocks,
    policy_routing,
)
from tortie.agent.calc_policy import PolicyCalculator
from tortie.agent.calc_services import ServiceCalculator, service_export_policies
from tortie.agent.state import ClusterState
from tortie.bgp.messages import BGPConfigUpdate, ExportDelta
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import netpol
from tortie.policy.messages import NatUpdate
from tortie.routing.messages import RouteDelta, RouteKey, RulesUpdate
from tortie.routing.model import Route, Rule, learned_route, route_key

__all__ = ["Calculation", "ClusterState", "Desired", "EgressPlan", "desired", "egress_exports", "egress_imports",
           "egress_plan", "export_policies", "host_prefix", "network_policy", "node_addresses", "policy_routing"]

log = get_logger("calc")


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

