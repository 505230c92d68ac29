"""ClusterState: what the agent's syncer has seen of the datastore, as typed views.

Keyed like the datastore. `apply(key, value)` folds one key in and returns whether the
calculation reads it; a value it cannot parse is skipped with a warning (one bad resource
must not stop the node's dataplane).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tortie import errors
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.log import get_logger

log = get_logger("calc")


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
    # Calico's policy model: tortie.io/v1 NetworkPolicies, GlobalNetworkPolicies, Tiers
    calico_policies: dict[tuple[str, str], res.CalicoNetworkPolicy] = field(default_factory=dict)
    global_policies: dict[str, res.GlobalNetworkPolicy] = field(default_factory=dict)
    tiers: dict[str, res.Tier] = field(default_factory=dict)
    host_endpoints: dict[str, res.HostEndpoint] = field(default_factory=dict)
    services: dict[tuple[str, str], res.Service] = field(default_factory=dict)
    slices: dict[tuple[str, str], res.EndpointSlice] = field(default_factory=dict)

    KINDS = {
        "ippool": ("pools", res.IPPool),
        "node": ("nodes", res.Node),
        "bgppeer": ("bgp_peers", res.BGPPeer),
        "bgpconfiguration": ("bgp_configs", res.BGPConfiguration),
        "namespace": ("namespaces", res.Namespace),
        "globalnetworkpolicy": ("global_policies", res.GlobalNetworkPolicy),
        "tier": ("tiers", res.Tier),
        "hostendpoint": ("host_endpoints", res.HostEndpoint),
    }
    NAMESPACED = {
        "workloadendpoint": ("weps", res.WorkloadEndpoint),
        "networkpolicy": ("policies", res.NetworkPolicy),
        "networkpolicy.tortie.io": ("calico_policies", res.CalicoNetworkPolicy),
        "service": ("services", res.Service),
        "endpointslice": ("slices", res.EndpointSlice),
    }

    def clear(self) -> None:
        for name in ("pools", "nodes", "bgp_peers", "bgp_configs", "weps", "affinities", "policies",
                     "namespaces", "calico_policies", "global_policies", "tiers", "host_endpoints",
                     "services", "slices"):
            getattr(self, name).clear()

    def relative(self, key: str) -> str | None:
        return key[len(self.prefix):] if key.startswith(self.prefix) else None

    def apply(self, key: str, value: bytes | None) -> bool:
        """Fold one datastore key into the state; True if it matters to the calculation."""
        return self.apply_relative(self.relative(key), value, key)

    def apply_relative(self, rel: str | None, value: bytes | None, key: str = "") -> bool:
        if rel is None:
            return False
        try:
            found = keys.parse_resource(rel)
            if found is not None:
                return self._apply_resource(found, value)
            aff = keys.parse_affinity(rel)
            if aff is not None:
                if value is None:
                    self.affinities.pop(aff, None)
                else:
                    self.affinities[aff] = json.loads(value).get("state") == "confirmed"
                return True
        except (ValueError, KeyError, TypeError, errors.ValidationError) as exc:
            log.warning("skipping unreadable datastore value", key=key or rel, error=str(exc))
        return False

    def _apply_resource(self, found: tuple[str, str | None, str], value: bytes | None) -> bool:
        kind, namespace, name = found
        if namespace is not None:
            spec = self.NAMESPACED.get(kind)
            k: object = (namespace, name)
        else:
            spec = self.KINDS.get(kind)
            k = name
        if spec is None:
            return False
        table = getattr(self, spec[0])
        if value is None:
            table.pop(k, None)
        else:
            table[k] = spec[1].from_resource(json.loads(value))
        return True

    def bgp_config(self, node: str) -> res.BGPConfiguration:
        """The cluster default overridden by this node's `node.<name>` configuration."""
        return res.effective_bgp_config(self.bgp_configs.get("default"),
                                        self.bgp_configs.get(f"node.{node}"))
