"""Typed views of resources: frozen dataclasses over a validated resource.

`IPPool.from_resource(d)` validates `d` (see `datastore.kinds`) and returns a hashable,
read-only view for the code that acts on it: the calculation, IPAM, the BGP peering.
The NetworkPolicy views carry the Kubernetes matching rules (`selects`, `matches_pod`,
`matches_address`); `effective_bgp_config` layers BGPConfigurations over the defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from tortie.datastore import selector
from tortie.datastore.fields import IPNetwork
from tortie.datastore.kinds import VXLAN_DEFAULT_VNI, split_peer_ip, validate
from tortie.errors import ValidationError


class FrozenLabels(dict):
    """Labels of a view: read-only and hashable, so views can live in sets and dict keys."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _read_only(self, *args, **kwargs):
        raise TypeError("the labels of a view are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


@dataclass(frozen=True)
class View:
    """Common metadata of every typed view."""

    KIND: ClassVar[str] = ""
    API: ClassVar[str] = ""  # the apiVersion, where two APIs share a kind's name
    name: str
    labels: Mapping[str, str]
    resource_version: int

    def __post_init__(self) -> None:
        if not isinstance(self.labels, FrozenLabels):
            object.__setattr__(self, "labels", FrozenLabels(self.labels))

    @classmethod
    def checked(cls, resource: Mapping) -> dict:
        """The validated resource, which must be of this view's kind."""
        res = validate(resource)
        if res["kind"] != cls.KIND or (cls.API and res["apiVersion"] != cls.API):
            raise ValidationError(f"expected a {cls.KIND}, got {res['kind']}", field="kind")
        return res

    @classmethod
    def from_resource(cls, resource: Mapping):
        res = cls.checked(resource)
        meta, spec = res["metadata"], res["spec"]
        return cls(name=meta["name"], labels=FrozenLabels(meta.get("labels", {})),
                   resource_version=int(meta.get("resourceVersion", 0)), **cls._spec(meta, spec))

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Egress:
    table: int
    next_hops: tuple[str, ...]  # ECMP over all of them
    interface: str | None = None
    fallback: str = "none"  # none: refused when no next hop is usable; main: the main table
    # Next hops watched by BFD: (address, minTx ms, minRx ms, multiplier); they count only
    # while their session is Up.
    bfd: tuple[tuple[str, int, int, int], ...] = ()
    address: str | None = None  # the pool's traffic leaves source-NATed to it (egress address)
    # Next hops learned from BGP instead (fromPeers): the BGPPeers this selector matches,
    # for these prefixes (the default route when none are given); next_hops is then empty.
    from_peers: str | None = None
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, e: dict) -> Egress:
        if e.get("fromPeers") is not None:
            return cls(e["table"], (), fallback=e.get("fallback", "none"), from_peers=e["fromPeers"],
                       prefixes=tuple(e.get("prefixes") or ()), address=e.get("address"))
        hops = e.get("nextHops")
        if hops is None:
            return cls(e["table"], (e["nextHop"],), e.get("interface"), e.get("fallback", "none"),
                       address=e.get("address"))
        bfd = tuple((h["address"], h["bfd"]["minTx"], h["bfd"]["minRx"], h["bfd"]["multiplier"])
                    for h in hops if h.get("bfd"))
        return cls(e["table"], tuple(h["address"] for h in hops), hops[0].get("interface"),
                   e.get("fallback", "none"), bfd, e.get("address"))


@dataclass(frozen=True)
class PoolBGP:
    """`IPPool.spec.bgp`: the external peers its blocks go to (a BGPPeer selector; None: all)
    and what they carry."""

    peers: str | None = None
    communities: tuple[str, ...] = ()
    as_path_prepend: int = 0

    @classmethod
    def from_spec(cls, b: dict) -> PoolBGP:
        return cls(b.get("peers"), tuple(b.get("communities") or ()), b.get("asPathPrepend", 0))

    def selects(self, peer_labels: Mapping[str, str]) -> bool:
        return self.peers is None or selector.parse(self.peers).matches(peer_labels)


@dataclass(frozen=True)
class IPPool(View):
    KIND: ClassVar[str] = "IPPool"
    cidr: str
    block_size: int
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = False
    node_selector: str = "all()"
    egress: Egress | None = None
    bgp: PoolBGP | None = None
    vxlan_mode: str = "Never"  # Never | Always | CrossSubnet
    vxlan_vni: int = VXLAN_DEFAULT_VNI
    vxlan_mtu: int | None = None  # None: the uplink's MTU minus the encapsulation
    allowed_uses: tuple[str, ...] = ("Workload", "Tunnel")

    @property
    def for_workloads(self) -> bool:
        """Whether pods get addresses from it (a LoadBalancer pool's are Services')."""
        return "Workload" in self.allowed_uses

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        e, b = spec.get("egress"), spec.get("bgp")
        return dict(cidr=spec["cidr"], block_size=spec["blockSize"], nat_outgoing=spec["natOutgoing"],
                    allowed_uses=tuple(spec.get("allowedUses", ("Workload", "Tunnel"))),
                    disabled=spec["disabled"], disable_bgp_export=spec["disableBGPExport"],
                    node_selector=spec["nodeSelector"],
                    egress=Egress.from_spec(e) if e else None, bgp=PoolBGP.from_spec(b) if b else None,
                    vxlan_mode=spec.get("vxlanMode", "Never"), vxlan_vni=spec.get("vxlanVNI", VXLAN_DEFAULT_VNI),
                    vxlan_mtu=spec.get("vxlanMTU"))

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels may take blocks from this pool."""
        return selector.parse(self.node_selector).matches(node_labels)


@dataclass(frozen=True)
class IPAMConfig(View):
    KIND: ClassVar[str] = "IPAMConfig"
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0  # 0: no limit

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(strict_affinity=spec["strictAffinity"], auto_allocate_blocks=spec["autoAllocateBlocks"],
                    max_blocks_per_host=spec["maxBlocksPerHost"])


@dataclass(frozen=True)
class Node(View):
    KIND: ClassVar[str] = "Node"
    ipv4_address: str | None = None  # "10.0.0.1/24": the BGP address and its subnet
    ipv6_address: str | None = None
    as_number: int | None = None  # None: the cluster's default AS
    route_reflector_cluster_id: str | None = None
    addresses: tuple[str, ...] = ()
    vxlan_tunnel_addr: str | None = None  # ipv4VXLANTunnelAddr
    vxlan_tunnel_addr6: str | None = None  # ipv6VXLANTunnelAddr
    vxlan_mac: str | None = None  # vxlanTunnelMACAddr (None: derived from the name)
    vxlan_mtu: int | None = None

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        bgp = spec.get("bgp", {})
        return dict(ipv4_address=bgp.get("ipv4Address"), ipv6_address=bgp.get("ipv6Address"),
                    as_number=bgp.get("asNumber"), route_reflector_cluster_id=bgp.get("routeReflectorClusterID"),
                    addresses=tuple(a["address"] for a in spec.get("addresses", ())),
                    vxlan_tunnel_addr=spec.get("ipv4VXLANTunnelAddr"), vxlan_tunnel_addr6=spec.get("ipv6VXLANTunnelAddr"),
                    vxlan_mac=spec.get("vxlanTunnelMACAddr"), vxlan_mtu=spec.get("vxlanMTU"))

    @property
    def ipv4(self) -> str | None:
        """The bare BGP IPv4 address."""
        return self.ipv4_address.split("/")[0] if self.ipv4_address else None

    @property
    def ipv6(self) -> str | None:
        return self.ipv6_address.split("/")[0] if self.ipv6_address else None


@dataclass(frozen=True)
class BGPPeer(View):
    KIND: ClassVar[str] = "BGPPeer"
    peer_ip: str | None = None  # bare address; None when peerSelector picks nodes as peers
    port: int = 179
    as_number: int | None = None
    node: str | None = None  # only this node peers; None with no nodeSelector: every node
    node_selector: str | None = None
    peer_selector: str | None = None
    keep_original_next_hop: bool = False
    passive: bool = False
    hold_time: int | None = None  # seconds
    keepalive_time: int | None = None
    password: str | None = None
    accept_prefixes: tuple[str, ...] = ()  # what may be imported from an external peer
    bfd: tuple[int, int, int] | None = None  # BFD timers (minTx ms, minRx ms, multiplier)
    max_prefixes: int | None = None  # received prefixes above this close the session

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        ip, port = split_peer_ip(spec["peerIP"]) if "peerIP" in spec else (None, 179)
        b = spec.get("bfd")
        return dict(peer_ip=ip, port=port, as_number=spec.get("asNumber"), node=spec.get("node"),
                    node_selector=spec.get("nodeSelector"), peer_selector=spec.get("peerSelector"),
                    keep_original_next_hop=spec.get("keepOriginalNextHop", False),
                    passive=spec.get("passive", False), hold_time=spec.get("holdTime"),
                    keepalive_time=spec.get("keepAliveTime"), password=spec.get("password"),
                    accept_prefixes=tuple(spec.get("acceptPrefixes", ())),
                    bfd=(b["minTx"], b["minRx"], b["multiplier"]) if b else None,
                    max_prefixes=spec.get("maxPrefixes"))

    def applies_to(self, node: Node) -> bool:
        """Whether `node` is one of the nodes that open this peering."""
        if self.node is not None:
            return self.node == node.name
        return selector.parse(self.node_selector).matches(node.labels)

    def peer_nodes(self, nodes: Iterable[Node]) -> list[Node]:
        """With peerSelector, the nodes this peering points at (else none)."""
        if self.peer_selector is None:
            return []
        sel = selector.parse(self.peer_selector)
        return [n for n in nodes if sel.matches(n.labels)]


@dataclass(frozen=True)
class BGPConfiguration(View):
    KIND: ClassVar[str] = "BGPConfiguration"
    as_number: int | None = None  # None: not set here (see `effective_bgp_config`)
    node_to_node_mesh: bool | None = None
    listen_port: int | None = None
    log_severity: str | None = None
    service_cluster_ips: tuple[str, ...] = ()
    service_external_ips: tuple[str, ...] = ()
    service_load_balancer_ips: tuple[str, ...] = ()
    communities: tuple[str, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        def cidrs(name: str) -> tuple[str, ...]:
            return tuple(c["cidr"] for c in spec.get(name, ()))
        return dict(as_number=spec.get("asNumber"), node_to_node_mesh=spec.get("nodeToNodeMeshEnabled"),
                    listen_port=spec.get("listenPort"), log_severity=spec.get("logSeverityScreen"),
                    service_cluster_ips=cidrs("serviceClusterIPs"),
                    service_external_ips=cidrs("serviceExternalIPs"),
                    service_load_balancer_ips=cidrs("serviceLoadBalancerIPs"),
                    communities=tuple(spec.get("communities", ())))


DEFAULT_AS = 64512
_BGP_DEFAULTS = BGPConfiguration(name="default", labels={}, resource_version=0, as_number=DEFAULT_AS,
                                 node_to_node_mesh=True, listen_port=179, log_severity="Info")


def effective_bgp_config(default: BGPConfiguration | None,
                         node: BGPConfiguration | None = None) -> BGPConfiguration:
    """Built-in defaults, overridden by `default`, overridden by `node.<name>`."""
    eff = _BGP_DEFAULTS
    for layer in (default, node):
        if layer is not None:
            eff = replace(eff, **{f.name: getattr(layer, f.name) for f in fields(layer)
                                  if getattr(layer, f.name) not in (None, ())
                                  and f.name not in ("name", "labels", "resource_version")})
    return eff


@dataclass(frozen=True)
class EndpointPort:
    """A named container port of a pod (Calico's WorkloadEndpoint `ports` item)."""

    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int


@dataclass(frozen=True)
class WorkloadEndpoint(View):
    KIND: ClassVar[str] = "WorkloadEndpoint"
    namespace: str = "default"
    node: str = ""
    orchestrator: str = "k8s"
    workload: str | None = None
    pod: str | None = None
    endpoint: str = "eth0"
    container_id: str | None = None
    ipam_handle: str | None = None  # the handle of its addresses (`ipam_blocks.wep_handle`)
    interface_name: str | None = None  # the host side of the pod's veth
    mac: str | None = None
    ip_networks: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    ports: tuple[EndpointPort, ...] = ()  # its named ports (unnamed ones are left out)

    def named_port(self, name: str, protocol: str) -> tuple[int, ...]:
        """The port numbers the pod gives the name for that protocol (usually one)."""
        return tuple(p.port for p in self.ports if p.name == name and p.protocol == protocol)

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(namespace=meta["namespace"], node=spec["node"], orchestrator=spec["orchestrator"],
                    workload=spec.get("workload"), pod=spec.get("pod"), endpoint=spec["endpoint"],
                    container_id=spec.get("containerID"), ipam_handle=spec.get("ipamHandle"),
                    interface_name=spec.get("interfaceName"),
                    mac=spec.get("mac"), ip_networks=tuple(spec.get("ipNetworks", ())),
                    profiles=tuple(spec.get("profiles", ())),
                    ports=tuple(sorted({EndpointPort(p["name"], p["protocol"], p["port"])
                                        for p in spec.get("ports", ()) if p.get("name")},
                                       key=lambda p: (p.name, p.protocol, p.port))))


@dataclass(frozen=True)
class Namespace(View):
    KIND: ClassVar[str] = "Namespace"

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return {}


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port; a string is a named container port
    end_port: int | None = None  # with port: the range port..end_port


@dataclass(frozen=True)
class PolicyPeer:
    """One `from`/`to` entry: selectors (None: not given) or an ipBlock."""

    pod_selector: selector.Selector | None = None
    namespace_selector: selector.Selector | None = None
    cidr: str | None = None
    except_cidrs: tuple[str, ...] = ()

    def matches_pod(self, pod_labels: Mapping[str, str], pod_namespace: str,
                    namespace_labels: Mapping[str, str], policy_namespace: str) -> bool:
        """Kubernetes' rule: podSelector alone means pods of the policy's namespace;
        namespaceSelector alone, every pod of the matching namespaces; both, both."""
        if self.cidr is not None:
            return False  # ipBlock is about addresses, see `matches_address`
        if self.namespace_selector is None:
            if pod_namespace != policy_namespace:
                return False
        elif not self.namespace_selector.matches(namespace_labels):
            return False
        return self.pod_selector is None or self.pod_selector.matches(pod_labels)

    def matches_address(self, address: str) -> bool:
        if self.cidr is None:
            return False
        ip = ipaddress.ip_address(address)
        net = ipaddress.ip_network(self.cidr)
        return ip.version == net.version and ip in net and not any(
            ip in ipaddress.ip_network(c) for c in self.except_cidrs)


@dataclass(frozen=True)
class PolicyRule:
    peers: tuple[PolicyPeer, ...] = ()  # empty: from/to anywhere
    ports: tuple[PolicyPort, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True)
class NetworkPolicy(View):
    """A networking.k8s.io/v1 NetworkPolicy with its selectors parsed."""

    KIND: ClassVar[str] = "NetworkPolicy"
    API: ClassVar[str] = "networking.k8s.io/v1"
    namespace: str = "default"
    pod_selector: selector.Selector = selector.ALL
    policy_types: tuple[str, ...] = ("Ingress",)
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        def rules(items: list, peers: str) -> tuple[PolicyRule, ...]:
            return tuple(PolicyRule(
                peers=tuple(_policy_peer(p) for p in r.get(peers) or ()),
                ports=tuple(PolicyPort(p["protocol"], p.get("port"), p.get("endPort")) for p in r.get("ports") or ()),
            ) for r in items)
        return dict(namespace=meta["namespace"], pod_selector=selector.from_k8s(spec["podSelector"]),
                    policy_types=tuple(spec["policyTypes"]), ingress=rules(spec.get("ingress") or [], "from"),
                    egress=rules(spec.get("egress") or [], "to"))

    def selects(self, pod_labels: Mapping[str, str], pod_namespace: str) -> bool:
        """Whether the policy applies to this pod (then only what its rules allow gets in/out)."""
        return pod_namespace == self.namespace and self.pod_selector.matches(pod_labels)


def _policy_peer(p: dict) -> PolicyPeer:
    block = p.get("ipBlock")
    return PolicyPeer(
        pod_selector=selector.from_k8s(p["podSelector"]) if "podSelector" in p else None,
        namespace_selector=selector.from_k8s(p["namespaceSelector"]) if "namespaceSelector" in p else None,
        cidr=block["cidr"] if block else None,
        except_cidrs=tuple(block.get("except", ())) if block else (),
    )


VIEWS: dict[str, type[View]] = {
    v.KIND.lower(): v for v in (IPPool, IPAMConfig, Node, BGPPeer, BGPConfiguration, WorkloadEndpoint,
                                 NetworkPolicy, Namespace)
}


__all__ = [
    "DEFAULT_AS", "VIEWS", "BGPConfiguration", "BGPPeer", "Egress", "EndpointPort", "FrozenLabels", "IPAMConfig", "IPPool",
    "Namespace", "NetworkPolicy", "Node", "PolicyPeer", "PolicyPort", "PolicyRule", "PoolBGP", "View", "WorkloadEndpoint",
    "effective_bgp_config",
]
