"""Typed views of Calico's policy kinds (schemas: `datastore.calico_policy`).

They expose the Kubernetes view's matching interface (`selects`, `policy_types`, rules
with `peers` and `ports`), so `policy.netpol` resolves both kinds the same way; a rule's
extra parts (`action`, `protocol`, `icmp_*`, `not_peers`, `not_ports`) ride along, and a
policy's `tier` and `order` place it (`policy.tiers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from tortie.datastore import selector
from tortie.datastore.calico_policy import _RANGE, DEFAULT_TIER, PORT_PROTOCOLS
from tortie.datastore.views import PolicyPeer, PolicyPort, View

_ALL = selector.parse("all()")


def _peers(e: Mapping, namespaced: bool, negated: bool = False) -> tuple[PolicyPeer, ...]:
    """The peers an entity names (`negated`: its notNets and notSelector): each net its
    own peer, the selectors one. A global policy's selector without a namespaceSelector
    reaches every namespace (Calico); a namespaced one's, its own namespace only."""
    peers = [PolicyPeer(cidr=c) for c in e.get("notNets" if negated else "nets") or ()]
    sel = e.get("notSelector" if negated else "selector")
    ns_sel = e.get("namespaceSelector")
    if negated and sel is None:
        return tuple(peers)
    if sel is not None or ns_sel is not None:
        peers.append(PolicyPeer(
            pod_selector=selector.parse(sel) if sel is not None else None,
            namespace_selector=selector.parse(ns_sel) if ns_sel is not None else None if namespaced else _ALL))
    return tuple(peers)


def _ports(items, protocol: str | None) -> tuple[PolicyPort, ...]:
    out = []
    for p in items or ():
        m = _RANGE.fullmatch(p) if isinstance(p, str) else None
        out.append(PolicyPort(protocol, int(m.group(1)), int(m.group(2))) if m else PolicyPort(protocol, p, None))
    return tuple(out)


@dataclass(frozen=True)
class CalicoRule:
    action: str
    peers: tuple[PolicyPeer, ...] = ()  # empty: any address
    ports: tuple[PolicyPort, ...] = ()  # empty: any protocol and port
    protocol: str | None = None  # a protocol without ports: "ICMP", "ICMPv6", "47"
    icmp_type: int | None = None
    icmp_code: int | None = None
    not_peers: tuple[PolicyPeer, ...] = ()
    not_ports: tuple[PolicyPort, ...] = ()

    @classmethod
    def from_spec(cls, r: dict, direction: str, namespaced: bool) -> CalicoRule:
        peer = r.get("source" if direction == "ingress" else "destination") or {}
        dest = r.get("destination") or {}
        proto = None if r.get("protocol") is None else str(r["protocol"])
        port_proto = proto if proto in PORT_PROTOCOLS else None
        ports = _ports(dest.get("ports"), port_proto)
        if not ports and port_proto:
            ports = (PolicyPort(port_proto, None, None),)  # every port of the protocol
        icmp = r.get("icmp") or {}
        return cls(action=r["action"], peers=_peers(peer, namespaced), ports=ports,
                   protocol=None if port_proto else proto, icmp_type=icmp.get("type"),
                   icmp_code=icmp.get("code"), not_peers=_peers(peer, namespaced, negated=True),
                   not_ports=_ports(dest.get("notPorts"), port_proto))


def _order(spec: dict) -> float | None:
    return float(spec["order"]) if spec.get("order") is not None else None


@dataclass(frozen=True)
class CalicoNetworkPolicy(View):
    """tortie.io/v1 NetworkPolicy: the endpoints of its namespace its selector matches."""

    KIND: ClassVar[str] = "NetworkPolicy"
    API: ClassVar[str] = "tortie.io/v1"
    GLOBAL: ClassVar[bool] = False
    namespace: str = ""
    tier: str = DEFAULT_TIER
    order: float | None = None
    pod_selector: selector.Selector = _ALL
    namespace_selector: selector.Selector | None = None
    policy_types: tuple[str, ...] = ("Ingress",)
    ingress: tuple[CalicoRule, ...] = ()
    egress: tuple[CalicoRule, ...] = ()
    apply_on_forward: bool = False  # a host endpoint's forwarded traffic too (global only)
    pre_dnat: bool = False  # on what arrives on a host endpoint, before DNAT (global only)
    do_not_track: bool = False  # before conntrack, every packet (global only)

    @classmethod
    def _spec(cls, meta: dict, spec: dict) -> dict:
        namespaced = not cls.GLOBAL
        return dict(namespace=meta.get("namespace", "") if namespaced else "",
                    tier=spec.get("tier", DEFAULT_TIER), order=_order(spec),
                    pod_selector=selector.parse(spec.get("selector", "all()")),
                    namespace_selector=(selector.parse(spec["namespaceSelector"])
                                        if spec.get("namespaceSelector") is not None else None),
                    policy_types=tuple(spec["types"]), apply_on_forward=bool(spec.get("applyOnForward")),
                    pre_dnat=bool(spec.get("preDNAT")), do_not_track=bool(spec.get("doNotTrack")),
                    ingress=tuple(CalicoRule.from_spec(r, "ingress", namespaced) for r in spec.get("ingress") or ()),
                    egress=tuple(CalicoRule.from_spec(r, "egress", namespaced) for r in spec.get("egress") or ()))

    def selects(self, pod_labels: Mapping[str, str], pod_namespace: str,
                namespace_labels: Mapping[str, str] | None = None) -> bool:
        if not self.GLOBAL and pod_namespace != self.namespace:
            return False
        if self.namespace_selector is not None and not self.namespace_selector.matches(namespace_labels or {}):
            return False
        return self.pod_selector.matches(pod_labels)


@dataclass(frozen=True)
class GlobalNetworkPolicy(CalicoNetworkPolicy):
    """Every namespace's endpoints its selector (and namespaceSelector) match."""

    KIND: ClassVar[str] = "GlobalNetworkPolicy"
    GLOBAL: ClassVar[bool] = True


@dataclass(frozen=True)
class Tier(View):
    KIND: ClassVar[str] = "Tier"
    API: ClassVar[str] = "tortie.io/v1"
    order: float | None = None

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(order=_order(spec))


@dataclass(frozen=True)
class HostEndpoint(View):
    KIND: ClassVar[str] = "HostEndpoint"
    API: ClassVar[str] = "tortie.io/v1"
    node: str = ""
    interface_name: str = ""  # "*": every interface of the node but the pods'
    expected_ips: tuple[str, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(node=spec["node"], interface_name=spec["interfaceName"],
                    expected_ips=tuple(spec.get("expectedIPs") or ()))


VIEWS = {"networkpolicy.tortie.io": CalicoNetworkPolicy, "globalnetworkpolicy": GlobalNetworkPolicy, "tier": Tier,
         "hostendpoint": HostEndpoint}
