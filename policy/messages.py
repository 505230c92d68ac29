"""Messages the calculation sends to the nftables managers (through the dataplane driver)."""

from __future__ import annotations

from dataclasses import dataclass

from .netpol import Filter, PodFilter, ResolvedPolicy


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """One NetworkPolicy resolved for this node ("<namespace>/<name>"); None: gone or unused."""

    key: str
    policy: ResolvedPolicy | None


@dataclass(frozen=True, slots=True)
class EndpointFilterUpdate:
    """A local pod's filter, by host interface; None: the pod is gone or not isolated."""

    interface: str
    filter: PodFilter | None


@dataclass(frozen=True, slots=True)
class NatUpdate:
    """natOutgoing's and the egress addresses' inputs, whole (a few CIDRs and addresses)."""

    nat_pools: frozenset[str]
    all_pools: frozenset[str]
    node_addresses: frozenset[str]
    egress_addresses: frozenset[tuple[str, str]] = frozenset()  # (pool CIDR, its egress address)


def filter_messages(old: Filter | None, new: Filter) -> list[PolicyUpdate | EndpointFilterUpdate]:
    """The messages that turn a FilterManager fed `old` into one fed `new` (a whole-Filter
    recompute diffed into deltas): policies first, then endpoints; removals last."""
    old_pols = {p.key: p for p in old.policies} if old else {}
    old_pods = {p.interface: p for p in old.pods} if old else {}
    new_pols = {p.key: p for p in new.policies}
    new_pods = {p.interface: p for p in new.pods}
    out: list[PolicyUpdate | EndpointFilterUpdate] = []
    out += (PolicyUpdate(k, p) for k, p in new_pols.items() if old_pols.get(k) != p)
    out += (EndpointFilterUpdate(i, p) for i, p in new_pods.items() if old_pods.get(i) != p)
    out += (EndpointFilterUpdate(i, None) for i in old_pods if i not in new_pods)
    out += (PolicyUpdate(k, None) for k in old_pols if k not in new_pols)
    return out
