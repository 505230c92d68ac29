"""Messages the calculation sends to the nftables managers (through the dataplane driver)."""

from __future__ import annotations

from dataclasses import dataclass

from .netpol import PodFilter, ResolvedPolicy


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
    """natOutgoing's inputs, whole (a few CIDRs and addresses)."""

    nat_pools: frozenset[str]
    all_pools: frozenset[str]
    node_addresses: frozenset[str]
