"""The calculation: datastore state in, desired dataplane state out. Pure.

`ClusterState` is what the syncer has seen, parsed into typed views; `desired()`
turns it (plus the routes BGP learned) into what the managers should hold for this
node. No I/O here, so every rule of the routing contract is unit tested in isolation.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from tortie import errors
from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import netpol
from tortie.routing.model import MAIN_TABLE, Route, Rule, learned_route

log = get_logger("calc")

IPAM_AFFINITY = "ipam/affinity/"


@dataclass
class ClusterState:
    """Everything the agent knows from the datastore, keyed like the datastore."""

    prefix: str = "/tortie/"
    pools: dict[str, res.IPPool] = field(default_factory=dict)
    nodes: dict[str, res.Node] = field(default_factory=dict)
    bgp_peers: dict[str, res.BGPPeer] = field(default_factory=dict)
    bgp_configs: dict[str, res.BGPConfiguration] = field(default_factory=dict)
    weps: dict[tuple[str, str], res.WorkloadEndpoint] = field(default_factory=dict)
    # (node, block cidr) -> confirmed? A pending claim is never routed or exported.
    affinities: dict[tuple[str, str], bool] = field(default_factory=dict)
    policies: dict[tuple[str, str], res.NetworkPolicy] = field(default_factory=dict)
    namespaces: dict[str, res.Namespace] = field(default_factory=dict)

    _KINDS = {
        "ippool": ("pools", res.IPPool),
        "node": ("nodes", res.Node),
        "bgppeer": ("bgp_peers", res.BGPPeer),
        "bgpconfiguration": ("bgp_configs", res.BGPConfiguration),
        "namespace": ("namespaces", res.Namespace),
    }
    _NAMESPACED = {
        "workloadendpoint": ("weps", res.WorkloadEndpoint),
        "networkpolicy": ("policies", res.NetworkPolicy),
    }

    def clear(self) -> None:
        for name in ("pools", "nodes", "bgp_peers", "bgp_configs", "weps", "affinities", "policies",
                     "namespaces"):
            getattr(self, name).clear()

    def apply(self, key: str, value: bytes | None) -> bool:
        """Fold one datastore key into the state; True if it matters to the calculation."""
        if not key.startswith(self.prefix):
            return False
        rel = key[len(self.prefix):]
        try:
            if rel.startswith("resources/"):
                return self._apply_resource(rel.split("/")[1:], value)
            if rel.startswith(IPAM_AFFINITY):
                node, cidr = rel[len(IPAM_AFFINITY):].split("/", 1)
                cidr = cidr.replace("-", "/")
                if value is None:
                    self.affinities.pop((node, cidr), None)
                else:
                    self.affinities[(node, cidr)] = json.loads(value).get("state") == "confirmed"
                return True
        except (ValueError, KeyError, TypeError, errors.ValidationError) as exc:
            # A value the calculation cannot read is skipped, not fatal: one bad
            # resource must not stop the node's dataplane.
            log.warning("skipping unreadable datastore value", key=key, error=str(exc))
        return False

    def _apply_resource(self, parts: list[str], value: bytes | None) -> bool:
        kind = parts[0]
        if kind in self._NAMESPACED and len(parts) == 3:
            attr, typ = self._NAMESPACED[kind]
            table = getattr(self, attr)
            k = (parts[1], parts[2])
            if value is None:
                table.pop(k, None)
            else:
                table[k] = typ.from_resource(json.loads(value))
            return True
        if kind in self._KINDS and len(parts) == 2:
            attr, typ = self._KINDS[kind]
            table = getattr(self, attr)
            if value is None:
                table.pop(parts[1], None)
            else:
                table[parts[1]] = typ.from_resource(json.loads(value))
            return True
        return False

    def bgp_config(self, node: str) -> res.BGPConfiguration:
        """The cluster default overridden by this node's `node.<name>` configuration."""
        return res.effective_bgp_config(self.bgp_configs.get("default"),
                                        self.bgp_configs.get(f"node.{node}"))


# Policy routing priorities (inside the range the rule manager owns). Pool destinations
# come first so pod-to-pod traffic keeps the cluster routes; then per-pool egress.
PRIO_TO_POOLS = 100
PRIO_EGRESS = 110


@dataclass(frozen=True)
class Desired:
    block_routes: frozenset[Route]
    workload_routes: frozenset[Route]
    bgp_routes: frozenset[Route]
    exports: frozenset[str]
    rules: frozenset[Rule] = frozenset()
    egress_routes: frozenset[Route] = frozenset()


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


def own_blocks(state: ClusterState, node: str) -> list[str]:
    """This node's confirmed blocks."""
    return sorted(c for (n, c), confirmed in state.affinities.items() if n == node and confirmed)


def desired(
    state: ClusterState,
    node: str,
    learned: Mapping[str, tuple[str, ...]] = (),
    own_addresses: frozenset[str] = frozenset(),
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

    own = set(blocks)
    bgp_routes = set()
    for prefix, hops in dict(learned).items():
        hops = tuple(sorted(h for h in hops if h not in own_addresses))
        if prefix in own or not hops:
            continue
        bgp_routes.add(learned_route(prefix, hops))  # canonical from ExaBGP: no re-validation
    rules, egress_routes = policy_routing(state)
    return Desired(frozenset(block_routes), frozenset(workload_routes), frozenset(bgp_routes),
                   frozenset(exports), rules, egress_routes)


def policy_routing(state: ClusterState) -> tuple[frozenset[Rule], frozenset[Route]]:
    """Per-pool egress: `from <pool> lookup <table>`, the table's default via the pool's next hop.

    Only while some pool has egress routing; then every pool's range is first sent to the
    main table, so traffic between pods (any pool) never takes an egress uplink.
    """
    egress_pools = sorted((p for p in state.pools.values() if p.egress), key=lambda p: p.name)
    if not egress_pools:
        return frozenset(), frozenset()
    rules = {Rule(priority=PRIO_TO_POOLS, dst=p.cidr, table=MAIN_TABLE) for p in state.pools.values()}
    routes: dict[tuple[int, int], Route] = {}
    for p in egress_pools:
        rules.add(Rule(priority=PRIO_EGRESS, src=p.cidr, table=p.egress.table))
        version = ipaddress.ip_network(p.cidr).version
        if ipaddress.ip_address(p.egress.next_hop).version != version:
            log.warning("egress next hop of another family; skipped", pool=p.name)
            continue
        key = (p.egress.table, version)
        if key in routes and routes[key].gateways != (p.egress.next_hop,):
            log.warning("pools share an egress table with different next hops; first one wins",
                        pool=p.name, table=p.egress.table)
            continue
        # With `interface`, the next hop is reached through that device only (the route
        # waits for the device like any other).
        routes[key] = Route(dst="0.0.0.0/0" if version == 4 else "::/0", table=p.egress.table,
                            gateways=(p.egress.next_hop,), dev=p.egress.interface)
    return frozenset(rules), frozenset(routes.values())


def network_policy(state: ClusterState, node: str) -> netpol.Filter:
    """This node's pods under the cluster's NetworkPolicies (see `policy.netpol`)."""
    return netpol.compute(node, state.weps.values(), state.policies.values(), state.namespaces)
