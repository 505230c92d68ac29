"""The kinds of resource and their schemas: `validate()` checks and normalizes a resource.

A resource is the familiar Kubernetes shape -- apiVersion, kind, metadata, spec. `validate()`
returns it normalized (CIDRs canonical, defaults filled in), raising ValidationError that
names the offending field. Each `Kind` names its spec schema, written in the mini-language
of `datastore.fields`. Where a resource lives in etcd is `datastore.keys`'s business:
`key_for` / `parse_key` only add the kind (namespaced or not) to it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tortie.datastore import calico_policy, keys, selector
from tortie.datastore.fields import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    IFNAME,
    PORT_NAME,
    Fields,
    ip_interface,
    label_map,
    parse_cidr,
    parse_ip,
    string,
)
from tortie.datastore.kinds_service import endpoint_slice_body, service_spec, service_status
from tortie.errors import ValidationError

API_VERSION = "tortie.io/v1"
MAX_ANNOTATIONS = 256 << 10  # bytes of keys and values together (Kubernetes' limit)

_HANDLE = re.compile(r"[^/\s]+")  # as `ipam_blocks.check_name` takes it
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_COMMUNITY = re.compile(r"\d{1,10}:\d{1,10}(:\d{1,10})?")  # standard a:b or large a:b:c

# Kubernetes bookkeeping a user may paste from a cluster: dropped, not refused.
_K8S_IGNORED = ("generation", "managedFields", "selfLink", "ownerReferences", "finalizers",
                "generateName", "deletionTimestamp", "deletionGracePeriodSeconds")


def _metadata(kind: Kind, meta: Any) -> dict:
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in _K8S_IGNORED}
    f = Fields(meta, "metadata", strict=kind.api_version == API_VERSION)
    f.str("name", required=True, pattern=kind.name_pattern, max_len=253)
    if kind.namespaced:
        f.str("namespace", default="default", pattern=DNS_LABEL, max_len=63)
    elif f.raw("namespace") is not None:
        raise ValidationError(f"{kind.name} is not namespaced", field="metadata.namespace")
    if f.raw("labels") is not None:
        f.keep("labels", label_map(f.raw("labels"), "metadata.labels"))
    if f.raw("annotations") is not None:
        annotations = label_map(f.raw("annotations"), "metadata.annotations", values_too=False)
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS:
            raise ValidationError(f"{size} bytes in all; at most {MAX_ANNOTATIONS} (256 KiB, as in Kubernetes)",
                                  field="metadata.annotations")
        f.keep("annotations", annotations)
    f.str("resourceVersion", pattern=re.compile(r"\d+"))
    f.str("uid")
    f.str("creationTimestamp")
    return f.done()


@dataclass(frozen=True)
class Kind:
    name: str  # as written in `kind:`
    api_version: str
    namespaced: bool
    spec: Callable[[Fields, dict], None]  # validates spec, given the validated metadata
    aliases: tuple[str, ...] = ()
    name_pattern: re.Pattern = DNS_SUBDOMAIN
    spec_required: bool = True
    serialized: bool = False  # writes of this kind are linearized by a serial key
    store_name: str = ""  # the key segment when the lower-case name is taken by another API's kind
    # Kinds whose content is not under spec (EndpointSlice): validates the top-level fields
    # given (resource, metadata) and returns them, replacing spec.
    body: Callable[[dict, dict], dict] | None = None
    status: Callable[[Any], dict | None] | None = None  # kinds whose status is kept (Service)

    @property
    def key(self) -> str:
        """Lower-case singular: the key segment and the CLI's canonical name."""
        return self.store_name or self.name.lower()

    def prefix(self, namespace: str | None = None) -> str:
        """The key prefix of this kind (of one namespace of it), relative to the datastore prefix."""
        return keys.resource_prefix(self.key, namespace if self.namespaced else None)


# Ranges a pool may not overlap, as Calico refuses them: a pod given one of these
# addresses would break its node (169.254.1.1 and fe80::ecee:eeff:feee:eeee are the pods' gateways).
_RESERVED = tuple((ipaddress.ip_network(cidr), what) for cidr, what in (
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
    ("::1/128", "loopback"), ("fe80::/10", "link-local"), ("ff00::/8", "multicast")))


def _millis(f: Fields, name: str, default: int) -> None:
    """A BFD interval: milliseconds, as an integer or "300ms" / "1s"; 10 ms to 60 s."""
    value = f.raw(name)
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)(ms|s)", value)
        if not m:
            raise ValidationError(f"{value!r} is not an interval like 300ms or 1s", field=f.at(name))
        f.obj = {**f.obj, name: int(m.group(1)) * (1000 if m.group(2) == "s" else 1)}
    f.int(name, 10, 60_000, default=default)


def bfd_spec(f: Fields) -> None:
    """BFD timers (RFC 5880): minTx, minRx (intervals, default 300 ms), multiplier (3)."""
    _millis(f, "minTx", 300)
    _millis(f, "minRx", 300)
    f.int("multiplier", 1, 255, default=3)


def _pool_spec(f: Fields, meta: dict) -> None:
    net = f.cidr("cidr", required=True)
    for reserved, what in _RESERVED:
        if reserved.version == net.version and net.overlaps(reserved):
            raise ValidationError(f"{net} overlaps the {what} range {reserved}", field="spec.cidr")
    v6 = net.version == 6
    lo, default = (116, 122) if v6 else (20, 26)
    size = f.int("blockSize", lo, 128 if v6 else 32, default=default)
    if size < net.prefixlen:
        raise ValidationError(f"must be at least the pool's prefix length /{net.prefixlen}",
                              field="spec.blockSize")
    f.bool("natOutgoing", False)
    f.bool("disabled", False)
    _allowed_uses(f)
    f.bool("disableBGPExport", False)
    f.selector("nodeSelector", default="all()")
    f.str("ipipMode", choices=("Never",))  # accepted from Calico YAML; this kernel has no ipip
    vxlan_spec(f)

    def egress(e: Fields) -> None:
        # Main (254), local (255), default (253) and unspec (0) belong to the kernel.
        table = e.int("table", 1, 0xFFFFFFFF, required=True)
        if table in (253, 254, 255):
            raise ValidationError("253-255 are the kernel's tables", field="spec.egress.table")
        where = "spec.egress"
        if e.raw("nextHop") is not None and e.raw("nextHops") is not None:
            raise ValidationError("give nextHop or nextHops, not both", field=f"{where}.nextHops")
        if e.raw("fromPeers") is not None:
            # Next hops learned from BGP: the peers' own announcements say where to go, so
            # static next hops beside them would be a second, conflicting source of truth.
            for static in ("nextHop", "nextHops", "interface"):
                if e.raw(static) is not None:
                    raise ValidationError(f"give fromPeers or {static}, not both (fromPeers learns the next hops)",
                                          field=f"{where}.fromPeers")
            e.selector("fromPeers")

            def prefix(value, at: str) -> str:
                p = parse_cidr(string(value, at), at)
                if p.version != net.version:
                    raise ValidationError(f"{value!r} is not an IPv{net.version} prefix (the pool's family)", field=at)
                return str(p)

            prefixes = e.list("prefixes", prefix)
            if prefixes is not None and not prefixes:
                raise ValidationError("must name at least one prefix (leave it out for the default route)",
                                      field=f"{where}.prefixes")
            if prefixes and len(set(prefixes)) != len(prefixes):
                raise ValidationError("names a prefix twice", field=f"{where}.prefixes")
        elif e.raw("prefixes") is not None:
            raise ValidationError("needs fromPeers (static next hops take the default route)", field=f"{where}.prefixes")
        elif e.raw("nextHops") is None:
            if e.raw("nextHop") is None:
                raise ValidationError("is required (or nextHops, or fromPeers)", field=f"{where}.nextHop")
            e.ip("nextHop", required=True, version=net.version)
            e.str("interface", pattern=IFNAME)
        else:
            if e.raw("interface") is not None:
                raise ValidationError("with nextHops, give the interface per next hop", field=f"{where}.interface")

            def hop(value, at: str) -> dict:
                h = Fields(value, at)
                h.ip("address", required=True, version=net.version)
                h.str("interface", pattern=IFNAME)
                if h.int("weight", 1, 256) not in (None, 1):
                    raise ValidationError("weights other than 1 are not supported yet", field=f"{at}.weight")
                h.obj_field("bfd", bfd_spec)
                return h.done()

            hops = e.list("nextHops", hop)
            if not hops:
                raise ValidationError("must name at least one next hop", field=f"{where}.nextHops")
            if len({h["address"] for h in hops}) != len(hops):
                raise ValidationError("names a next hop twice", field=f"{where}.nextHops")
            if len({h.get("interface") for h in hops}) > 1:
                raise ValidationError("next hops on different interfaces are not supported yet (leave "
                                      "interface out: the kernel finds each next hop's link)",
                                      field=f"{where}.nextHops")
        # What the pool's traffic does when no next hop can be used: refused (none), or the
        # main table's routes (main).
        e.str("fallback", choices=("none", "main"), default="none")
        # The pool's traffic to outside every pool is source-NATed to this address; nodes with
        # pods of the pool announce it (/32, /128) so replies come back (other pools: the store).
        address = e.ip("address", version=net.version)
        if address is not None and ipaddress.ip_address(address) in net:
            raise ValidationError(f"{address} is inside the pool's own range {net}", field=f"{where}.address")

    f.obj_field("egress", egress)

    def bgp(b: Fields) -> None:
        # To which external peers (BGPPeers by label) the pool's blocks go, and with what.
        b.selector("peers")
        b.list("communities", community)
        b.int("asPathPrepend", 0, 10, default=0)

    f.obj_field("bgp", bgp)


POOL_USES = ("Workload", "Tunnel", "LoadBalancer")


def _allowed_uses(f: Fields) -> None:
    """Calico's allowedUses: what the pool's addresses are for (default Workload, Tunnel).
    A LoadBalancer pool gives Services their load-balancer addresses and never a pod one;
    as in Calico it has no other use."""
    def use(v: Any, where: str) -> str:
        if v not in POOL_USES:
            raise ValidationError(f"{v!r} is not one of {', '.join(POOL_USES)}", field=where)
        return v

    uses = f.list("allowedUses", use)  # unset: the default, not stored (pools written before stay equal)
    if uses is None:
        pass
    elif not uses or len(set(uses)) != len(uses):
        raise ValidationError("must name distinct uses, at least one", field="spec.allowedUses")
    elif "LoadBalancer" in uses and len(uses) > 1:
        raise ValidationError("LoadBalancer cannot be combined with other uses", field="spec.allowedUses")
    elif set(uses) in ({"Workload"}, {"Tunnel"}):
        # IPAM has one path for pods and VTEP addresses (agent.vxlan_addr): one without the other
        # cannot be honoured yet
        raise ValidationError("Workload and Tunnel apart are not supported yet (give both, or LoadBalancer)",
                              field="spec.allowedUses")


VXLAN_MODES = ("Never", "Always", "CrossSubnet")
VXLAN_DEFAULT_VNI = 4096  # Calico's default (FelixConfiguration vxlanVNI)
MTU_RANGE = (1280, 65535)  # 1280: what IPv6 needs of every link


def vxlan_spec(f: Fields) -> None:
    """The pool's overlay (Calico's fields): vxlanMode, and the VNI of the node's VXLAN
    device (every VXLAN pool of a family must agree: `store._check_pool`); vxlanMTU
    overrides the MTU of the device and of the pool's pods (default: uplink - 50/70)."""
    # No defaults stored (a pool written before stays byte for byte): the view fills them in.
    f.str("vxlanMode", choices=VXLAN_MODES)
    f.int("vxlanVNI", 1, (1 << 24) - 1)
    f.int("vxlanMTU", *MTU_RANGE)


_COMMUNITY_MAX = {1: 0xFFFF, 2: 0xFFFFFFFF}  # by the number of ':': standard a:b, large a:b:c


def community(v: Any, where: str) -> str:
    """A BGP community `AS:VALUE` (16 bits each) or large community `A:B:C` (32 bits each)."""
    if not isinstance(v, str) or not _COMMUNITY.fullmatch(v) or \
            any(int(x) > _COMMUNITY_MAX[v.count(":")] for x in v.split(":")):
        raise ValidationError(f"{v!r} is not a community (a:b, 0-65535 each) or large community "
                              "(a:b:c, 0-4294967295 each)", field=where)
    return v


def _ipam_config_spec(f: Fields, meta: dict) -> None:
    if meta["name"] != "default":
        raise ValidationError("the IPAMConfig must be named 'default'", field="metadata.name")
    f.bool("strictAffinity", False)
    f.bool("autoAllocateBlocks", True)
    f.int("maxBlocksPerHost", 0, 1 << 20, default=0)


def _node_spec(f: Fields, meta: dict) -> None:
    def bgp(b: Fields) -> None:
        for fam, version in (("ipv4Address", 4), ("ipv6Address", 6)):
            if b.raw(fam) is not None:
                b.keep(fam, ip_interface(b.raw(fam), b.at(fam), version))
        b.asn("asNumber")
        b.ip("routeReflectorClusterID", version=4)

    def address(v: Any, where: str) -> dict:
        # An address, or (as Calico writes CalicoNodeIP entries) address/prefix: the subnet
        # it sits on.
        a = Fields(v, where)
        text = a.str("address", required=True)
        version = 6 if ":" in text else 4
        a.keep("address", ip_interface(text, a.at("address"), version) if "/" in text
               else str(parse_ip(text, a.at("address"), version)))
        a.str("type", choices=("InternalIP", "ExternalIP", "CalicoNodeIP"))
        return a.done()

    f.obj_field("bgp", bgp)
    f.list("addresses", address)
    # The node's VTEP, as Calico keeps it: the tunnel address (the agent takes it from a
    # VXLAN pool's IPAM), an optional fixed MAC (else derived from the node name), and an
    # MTU that overrides the pools' for this node's device and pods.
    f.ip("ipv4VXLANTunnelAddr", version=4)
    f.ip("ipv6VXLANTunnelAddr", version=6)
    mac = f.str("vxlanTunnelMACAddr", pattern=_MAC)
    if mac is not None:
        if int(mac[:2], 16) & 1:
            raise ValidationError("must be a unicast MAC (the low bit of the first byte clear)",
                                  field="spec.vxlanTunnelMACAddr")
        f.keep("vxlanTunnelMACAddr", mac.lower())
    f.int("vxlanMTU", *MTU_RANGE)


_PEER_IP = re.compile(r"(?P<ip>[0-9.]+|\[[0-9a-fA-F:.]+\]|[0-9a-fA-F:.]+?)(?::(?P<port>\d+))?")


def split_peer_ip(value: str, field: str = "spec.peerIP") -> tuple[str, int]:
    """"10.0.0.1", "10.0.0.1:1179", "fd00::1", "[fd00::1]:1179" -> (address, port)."""
    if value.count(":") > 1 and not value.startswith("["):
        return str(parse_ip(value, field)), 179  # a bare IPv6 address
    m = _PEER_IP.fullmatch(value)
    if not m:
        raise ValidationError(f"{value!r} is not IP or IP:port", field=field)
    port = int(m["port"] or 179)
    if not 1 <= port <= 65535:
        raise ValidationError("port must be 1-65535", field=field)
    return str(parse_ip(m["ip"].strip("[]"), field)), port


def _bgp_peer_spec(f: Fields, meta: dict) -> None:
    peer_ip = f.str("peerIP")
    if peer_ip is not None:
        split_peer_ip(peer_ip)
    f.asn("asNumber")
    f.str("node", pattern=DNS_SUBDOMAIN)
    f.selector("nodeSelector")
    f.selector("peerSelector")
    if f.bool("keepOriginalNextHop"):
        raise ValidationError("is not supported yet (routes to this peer carry this node as next hop)",
                              field="spec.keepOriginalNextHop")
    f.bool("passive")
    hold = f.seconds("holdTime", 3, 65535)
    keepalive = f.seconds("keepAliveTime", 1, 21845)
    if hold is not None and keepalive is not None and keepalive != hold // 3:
        raise ValidationError(f"is not supported yet with holdTime other than holdTime/3 ({hold // 3}s): "
                              "keepalives go out every third of the hold time", field="spec.keepAliveTime")
    f.str("password", max_len=80)  # TCP MD5 (RFC 2385) key
    f.list("acceptPrefixes", lambda v, where: str(parse_cidr(string(v, where), where)))
    f.obj_field("bfd", bfd_spec)  # a BFD Down withdraws what the peer announced at once
    # received prefixes above this close the session for a while (external peers: 50,000
    # unless set; see bgp.peers.DEFAULT_MAX_PREFIXES_EXTERNAL)
    f.int("maxPrefixes", 1, 10_000_000)
    if f.raw("node") and f.raw("nodeSelector"):
        raise ValidationError("give node or nodeSelector, not both", field="spec.nodeSelector")
    if (peer_ip is None) == (f.raw("peerSelector") is None):
        raise ValidationError("give exactly one of peerIP and peerSelector", field="spec.peerIP")
    if peer_ip is not None and f.raw("asNumber") is None:
        raise ValidationError("is required with peerIP", field="spec.asNumber")


def _bgp_config_spec(f: Fields, meta: dict) -> None:
    if meta["name"] != "default" and not meta["name"].startswith("node."):
        raise ValidationError("must be 'default' or 'node.<nodename>'", field="metadata.name")
    # No defaults stored: a node.<name> configuration overrides only what it sets.
    f.asn("asNumber")
    f.bool("nodeToNodeMeshEnabled")
    f.int("listenPort", 1, 65535)
    f.str("logSeverityScreen", choices=("Debug", "Info", "Warning", "Error", "Fatal"))  # ExaBGP's log level

    def cidr_item(v: Any, where: str) -> dict:
        c = Fields(v, where)
        c.cidr("cidr", required=True)
        return c.done()

    for name in ("serviceClusterIPs", "serviceExternalIPs", "serviceLoadBalancerIPs"):
        f.list(name, cidr_item)  # announced to the routers (agent.calc_services.service_exports)

    f.list("communities", community)  # attached to every prefix this node exports


def _wep_spec(f: Fields, meta: dict) -> None:
    f.str("node", required=True, pattern=DNS_SUBDOMAIN)
    f.str("orchestrator", default="k8s")
    f.str("workload")
    f.str("pod")
    f.str("endpoint", default="eth0")
    f.str("containerID")
    # the IPAM handle of the endpoint's addresses (`<network>.<containerID>`): what
    # `ipam check` matches allocations against, whatever the CNI network is called
    f.str("ipamHandle", pattern=_HANDLE, max_len=512)
    f.str("interfaceName", pattern=IFNAME)
    f.str("mac", pattern=re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}"))

    def net(v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise ValidationError("must be a CIDR string", field=where)
        return str(parse_cidr(v, where))

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("name", pattern=PORT_NAME)
        p.str("protocol", default="TCP", choices=("TCP", "UDP", "SCTP"))
        p.int("port", 1, 65535, required=True)
        return p.done()

    f.list("ipNetworks", net)
    if f.list("profiles", lambda v, where: string(v, where)):
        raise ValidationError("is not supported yet (policy comes from NetworkPolicy)", field="spec.profiles")
    f.list("ports", port)


def _netpol_spec(f: Fields, meta: dict) -> None:
    """networking.k8s.io/v1 NetworkPolicy, with the API server's defaulting."""
    def label_selector(name: str, sub: Fields) -> None:
        if sub.raw(name) is not None:
            selector.from_k8s(sub.raw(name), sub.at(name))
            sub.keep(name, sub.raw(name))

    def peer(v: Any, where: str) -> dict:
        p = Fields(v, where)
        label_selector("podSelector", p)
        label_selector("namespaceSelector", p)

        def ip_block(b: Fields) -> None:
            net = b.cidr("cidr", required=True, masked=False)

            def inside(v: Any, where: str) -> str:
                ex = parse_cidr(string(v, where), where, masked=False)
                if ex.version != net.version or not ex.subnet_of(net):
                    raise ValidationError(f"{ex} is not inside {net}", field=where)
                return str(ex)

            b.list("except", inside)

        p.obj_field("ipBlock", ip_block)
        if p.raw("ipBlock") is not None and (p.raw("podSelector") is not None or p.raw("namespaceSelector") is not None):
            raise ValidationError("ipBlock cannot be combined with selectors", field=f"{where}.ipBlock")
        if not p.out:
            raise ValidationError("needs podSelector, namespaceSelector or ipBlock", field=where)
        return p.done()

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("protocol", default="TCP", choices=("TCP", "UDP", "SCTP"))
        number = p.raw("port")
        if isinstance(number, str):
            p.str("port", pattern=PORT_NAME)
        elif number is not None:
            p.int("port", 1, 65535)
        if p.raw("endPort") is not None:
            if not isinstance(number, int):
                raise ValidationError("needs a numeric port", field=f"{where}.endPort")
            p.int("endPort", number, 65535)
        return p.done()

    def rule(peers: str) -> Callable[[Any, str], dict]:
        def check(v: Any, where: str) -> dict:
            r = Fields(v, where)
            r.list(peers, peer)
            r.list("ports", port)
            return r.done()
        return check

    label_selector("podSelector", f)
    if f.raw("podSelector") is None:
        raise ValidationError("is required (use {} for all pods)", field="spec.podSelector")
    f.list("ingress", rule("from"))
    f.list("egress", rule("to"))
    types = f.list("policyTypes", lambda v, where: string(v, where))
    if types is None:
        f.out["policyTypes"] = ["Ingress", *(["Egress"] if f.raw("egress") is not None else [])]
    elif not set(types) <= {"Ingress", "Egress"} or len(set(types)) != len(types):
        raise ValidationError("must be distinct values of Ingress, Egress", field="spec.policyTypes")


def _namespace_spec(f: Fields, meta: dict) -> None:
    f.list("finalizers", string)


_WEP_NAME = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?")
KINDS: dict[str, Kind] = {
    k.key: k for k in (
        Kind("IPPool", API_VERSION, False, _pool_spec, ("ippools", "pool", "pools"), serialized=True),
        Kind("IPAMConfig", API_VERSION, False, _ipam_config_spec, ("ipamconfigs", "ipamconfiguration")),
        Kind("Node", API_VERSION, False, _node_spec, ("nodes", "no"), spec_required=False),
        Kind("BGPPeer", API_VERSION, False, _bgp_peer_spec, ("bgppeers", "peer", "peers")),
        Kind("BGPConfiguration", API_VERSION, False, _bgp_config_spec,
             ("bgpconfigurations", "bgpconfig", "bgpconfigs"), spec_required=False),
        Kind("WorkloadEndpoint", API_VERSION, True, _wep_spec,
             ("workloadendpoints", "wep", "weps"), name_pattern=_WEP_NAME),
        Kind("NetworkPolicy", "networking.k8s.io/v1", True, _netpol_spec,
             ("networkpolicies", "netpol", "netpols", "policy", "policies")),
        Kind("Namespace", "v1", False, _namespace_spec, ("namespaces", "ns"),
             name_pattern=DNS_LABEL, spec_required=False),
        # Calico's policy model (datastore.calico_policy); tortie.io/v1 NetworkPolicy is
        # stored apart from the Kubernetes kind of the same name.
        Kind("NetworkPolicy", API_VERSION, True, calico_policy.policy_spec(global_=False),
             ("networkpolicies.tortie.io", "tnp", "tnps"), store_name="networkpolicy.tortie.io"),
        Kind("GlobalNetworkPolicy", API_VERSION, False, calico_policy.policy_spec(global_=True),
             ("globalnetworkpolicies", "gnp", "gnps")),
        Kind("Tier", API_VERSION, False, calico_policy.tier_spec, ("tiers",), spec_required=False),
        Kind("HostEndpoint", API_VERSION, False, calico_policy.host_endpoint_spec, ("hostendpoints", "hep", "heps")),
        Kind("Service", "v1", True, service_spec, ("services", "svc"), name_pattern=DNS_LABEL,
             status=service_status),
        Kind("EndpointSlice", "discovery.k8s.io/v1", True, lambda f, meta: None,
             ("endpointslices", "endpointslice", "eps"), spec_required=False, body=endpoint_slice_body),
    )
}
_ALIASES = {a: k for k in KINDS.values() for a in (k.key, *k.aliases)}
_BY_API = {(k.api_version, k.name): k for k in KINDS.values()}


def kind_of(resource: Mapping) -> Kind:
    """The kind of a validated resource (by apiVersion and kind)."""
    return _BY_API[(resource["apiVersion"], resource["kind"])]


def kind_for(name: str) -> Kind:
    """The kind for `IPPool`, `ippool`, `ippools`, `pool`, ... (case-insensitive)."""
    kind = _ALIASES.get(name.lower())
    if kind is None:
        raise ValidationError(
            f"unknown resource kind {name!r} (known: {', '.join(k.name for k in KINDS.values())})",
            field="kind")
    return kind


def validate(resource: Any) -> dict:
    """A checked, normalized copy of resource; ValidationError names the bad field."""
    if not isinstance(resource, Mapping):
        raise ValidationError("a resource must be a mapping with apiVersion, kind, metadata, spec")
    kind_name = resource.get("kind")
    if not isinstance(kind_name, str):
        raise ValidationError("is required", field="kind")
    kind = _BY_API.get((resource.get("apiVersion"), kind_name)) or kind_for(kind_name)
    if kind.name != kind_name:
        raise ValidationError(f"{kind_name!r} is not a kind; did you mean {kind.name!r}?", field="kind")
    if resource.get("apiVersion") != kind.api_version:
        raise ValidationError(f"{kind.name} is {kind.api_version!r}, not {resource.get('apiVersion')!r}",
                              field="apiVersion")
    top = {"addressType", "endpoints", "ports"} if kind.body else {"spec"}
    unknown = set(resource) - {"apiVersion", "kind", "metadata", "status"} - top
    if unknown:
        field = sorted(unknown)[0]
        raise ValidationError(f"unknown field {field!r}", field=field)
    meta = _metadata(kind, resource.get("metadata"))
    if kind.body is not None:
        return {"apiVersion": kind.api_version, "kind": kind.name, "metadata": meta, **kind.body(resource, meta)}
    if resource.get("spec") is None and kind.spec_required:
        raise ValidationError("is required", field="spec")
    spec = Fields(resource.get("spec"), "spec")
    kind.spec(spec, meta)
    out = {"apiVersion": kind.api_version, "kind": kind.name, "metadata": meta, "spec": spec.done()}
    status = kind.status(resource.get("status")) if kind.status else None
    if status:
        out["status"] = status
    return out


def key_for(kind: Kind, name: str, namespace: str | None = None) -> str:
    """The key of one resource, relative to the datastore prefix (namespaced kinds: in
    namespace `default` unless given)."""
    if kind.namespaced:
        return keys.resource_key(kind.key, name, namespace or "default")
    return keys.resource_key(kind.key, name)


def parse_key(relative_key: str) -> tuple[Kind, str | None, str] | None:
    """(kind, namespace, name) of a resource key relative to the prefix, or None (also for
    an unknown kind, or a namespace on a cluster-wide kind or none on a namespaced one)."""
    parsed = keys.parse_resource(relative_key)
    if parsed is None:
        return None
    kind_key, namespace, name = parsed
    kind = KINDS.get(kind_key)
    if kind is None or (namespace is not None) != kind.namespaced:
        return None
    return kind, namespace, name


__all__ = ["API_VERSION", "KINDS", "Kind", "key_for", "kind_for", "kind_of", "parse_key", "split_peer_ip", "validate"]
