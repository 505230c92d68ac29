"""The lab's address plan: pure functions from (name, nodes, tor, uplinks) to namespaces,
links and addresses. The builder (underlay.py) only walks the plan.

`--tor none` (issue 3): one L2 segment, the nodes peer in a full mesh.

    <lab>-ctl   eth0 10.99.0.2/24 (etcd) ──┐
    <lab>-node1 eth0 10.99.0.11/24 ────────┼── br0 in <lab>-net, 10.99.0.0/24
    <lab>-nodeN eth0 10.99.0.(10+N)/24 ────┤
    <lab>-ext   eth0 10.99.0.3/24 ─────────┘  (default via node1, the gateway node)

`--tor bird|frr` (issue 4): each node on its own link to the router, which also sits on
the core segment (br0) with etcd and the outside host; the nodes peer with the router only.

    <lab>-nodeI eth0 10.99.I.2/24 ── nI 10.99.I.1/24 ┐
                                          <lab>-tor  ├ eth0 10.99.0.1/24 ── br0 in <lab>-net
    <lab>-ctl eth0 10.99.0.2/24, <lab>-ext eth0 10.99.0.3/24 (default via the router) ──┘

`--uplinks 2` (issue 5): K segments shared by all nodes (bridge upK in <lab>-net,
10.99.(100+K).0/24), each with its own router <lab>-torK (.1 there, 10.99.0.(3+K) on the
core, tor1 keeps 10.99.0.1); node I is .(10+I) on each, eth(K-1), default route over all.

`--etcd-members 3` (issue 12): three members, each in its own namespace on the core
segment: <lab>-etcdI eth0 10.99.0.(5+I)/24, peers of each other; <lab>-ctl keeps the pod
server and tortiectl. One member (the default) runs in <lab>-ctl on 10.99.0.2 as before.
`--etcd-tls`: https on client and peer ports, certificates of a lab CA (lab/pki.py).

Node I has AS 64512+I behind routers with AS 65000+K (one AS per node, so a router's
re-announcements never carry the receiving node's own AS).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tortie.errors import ValidationError
from tortie.lab import family
from tortie.lab import subnets as lab_subnets

if TYPE_CHECKING:
    from tortie.lab.state import LabState

TOR_KINDS = ("none", "bird", "frr")
DEFAULT_LAB = "tortie"
UNDERLAY_SUBNET = "10.99.0.0/24"
DEFAULT_POOL_CIDR = "10.65.0.0/16"
DEFAULT_BLOCK_SIZE = 26
NODE_AS = 64512   # the mesh's one AS; with routers, node I has NODE_AS + I
TOR_AS = 65000    # router K has TOR_AS + K - 1
ETCD_PORT = 2379
MAX_NODES = 200
MAX_UPLINKS = 2
ETCD_MEMBER_COUNTS = (1, 3)

# Lab names carry no '-' so `<lab>-<role>` can never be mistaken for another lab's namespace.
_LAB_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_MAX_NETNS_NAME = 48


@dataclass(frozen=True)
class Uplink:
    """One veth from a node to the network: the node's end and the far end."""
    ifname: str            # in the node: eth0, eth1
    address: str           # the node's address on it, with prefix length
    gateway: str | None    # the router's address on it (None on the flat segment)
    router: str | None     # the router's name (tor, tor1, ...)
    far_netns: str         # where the other end lives: the router, or the bridge's namespace
    far_ifname: str
    far_address: str | None = None  # the router's address on a point-to-point link
    bridge: str | None = None       # the bridge the far end joins (in far_netns)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class NodePlan:
    name: str          # node1 (TORTIE_NODENAME)
    netns: str         # <lab>-node1
    as_number: int
    uplinks: tuple[Uplink, ...]

    @property
    def address(self) -> str:
        """The node's underlay address (first uplink) with prefix length: TORTIE_NODE_IP."""
        return self.uplinks[0].address

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(u.gateway for u in self.uplinks if u.gateway)


@dataclass(frozen=True)
class Segment:
    """A bridge in <lab>-net: the core (br0), or an uplink segment shared by all nodes."""
    name: str
    bridge: str
    subnet: str


@dataclass(frozen=True)
class TorPlan:
    kind: str          # bird | frr
    name: str
    netns: str
    address: str       # on the core segment, with prefix length
    as_number: int
    segment: Segment | None = None     # its shared uplink segment (--uplinks 2)
    segment_address: str | None = None  # its address there

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class EtcdMember:
    name: str      # n1 (etcd's --name)
    netns: str
    address: str   # on the core segment, with prefix length

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class Plan:
    lab: str
    tor: str
    ctl_netns: str
    ctl_address: str
    net_netns: str
    bridge: str
    subnet: str
    nodes: tuple[NodePlan, ...]
    tors: tuple[TorPlan, ...] = ()
    ext_netns: str | None = None
    ext_address: str | None = None
    core_gateways: tuple[str, ...] = ()  # default route of ctl and ext (the routers)
    uplinks: int = 1
    etcd_members: tuple[EtcdMember, ...] = ()  # empty in records of older labs: one, in ctl
    etcd_tls: bool = False
    subnets: int = 1  # 2: the nodes on two segments behind <lab>-gw (lab.subnets)
    ip_family: str = family.DEFAULT_FAMILY  # ipv4 | ipv6 | dual (lab/family.py)

    @property
    def versions(self) -> tuple[int, ...]:
        return family.versions(self.ip_family)

    @property
    def members(self) -> tuple[EtcdMember, ...]:
        return self.etcd_members or (EtcdMember("n1", self.ctl_netns, self.ctl_address),)

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        scheme = "https" if self.etcd_tls else "http"
        # etcd is reached over IPv4 wherever the lab has it (an IPv6-only lab: over IPv6)
        v = self.versions[0]
        return tuple(f"{scheme}://{family.bracket(family.of(m.ip, v))}:{ETCD_PORT}" for m in self.members)

    @property
    def etcd_endpoint(self) -> str:
        """The first member's endpoint (the only one of a one-member lab)."""
        return self.etcd_endpoints[0]

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(t.segment for t in self.tors if t.segment)

    def netns_names(self) -> list[str]:
        """Every namespace of the plan, in build order (teardown goes in reverse)."""
        extra = [t.netns for t in self.tors] + ([self.ext_netns] if self.ext_netns else [])
        extra += [m.netns for m in self.members if m.netns != self.ctl_netns]
        extra += [f"{self.lab}-gw"] if self.subnets == 2 else []
        return [self.net_netns, self.ctl_netns, *extra, *(n.netns for n in self.nodes)]

    def links_of(self, router: str) -> list[tuple[NodePlan, Uplink]]:
        """The (node, uplink) pairs a router talks BGP over."""
        return [(n, u) for n in self.nodes for u in n.uplinks if u.router == router]


def check_lab_name(name: str) -> str:
    if not _LAB_RE.match(name):
        raise ValidationError(
            f"lab name {name!r}: want 1-16 lower-case letters and digits, starting with a letter",
            field="name")
    return name


def make_plan(lab: str, nodes: int, tor: str = "none", uplinks: int = 1, *,
              etcd_members: int = 1, etcd_tls: bool = False, subnets: int = 1,
              ip_family: str = family.DEFAULT_FAMILY) -> Plan:
    check_lab_name(lab)
    family.check(ip_family)
    lab_subnets.check(subnets, nodes, tor, uplinks)
    if ip_family == "ipv6" and (etcd_members > 1 or etcd_tls):
        raise ValidationError("--etcd-members 3 and --etcd-tls with --ip-family ipv6 are not supported yet",
                              field="ip-family")
    if etcd_members not in ETCD_MEMBER_COUNTS:
        raise ValidationError(f"--etcd-members {etcd_members}: want one of "
                              f"{', '.join(map(str, ETCD_MEMBER_COUNTS))}", field="etcd-members")
    if tor not in TOR_KINDS:
        raise ValidationError(f"unknown tor {tor!r} (want one of {', '.join(TOR_KINDS)})", field="tor")
    if not 1 <= nodes <= MAX_NODES:
        raise ValidationError(f"--nodes {nodes}: want 1..{MAX_NODES}", field="nodes")
    if not 1 <= uplinks <= MAX_UPLINKS:
        raise ValidationError(f"--uplinks {uplinks}: want 1..{MAX_UPLINKS}", field="uplinks")
    if uplinks > 1 and tor == "none":
        raise ValidationError("--uplinks 2 needs routers (--tor bird or frr)", field="uplinks")
    net = ipaddress.ip_network(UNDERLAY_SUBNET)
    base, plen = net.network_address, net.prefixlen
    net_netns = f"{lab}-net"
    members = () if etcd_members == 1 else tuple(
        EtcdMember(f"n{i}", f"{lab}-etcd{i}", f"{base + 5 + i}/{plen}") for i in range(1, etcd_members + 1))
    common = dict(lab=lab, tor=tor, ctl_netns=f"{lab}-ctl", ctl_address=f"{base + 2}/{plen}",
                  net_netns=net_netns, bridge="br0", subnet=str(net), uplinks=uplinks,
                  etcd_members=members, etcd_tls=etcd_tls, subnets=subnets, ip_family=ip_family)
    if tor == "none":
        # No router: the outside host sits on the segment and enters through node1 (a
        # gateway node, which knows every block over the mesh); pods answer it directly.
        second = lab_subnets.on_second(nodes) if subnets == 2 else ()
        flat = tuple(
            NodePlan(name=f"node{i}", netns=f"{lab}-node{i}", as_number=NODE_AS, uplinks=(
                Uplink("eth0", f"{base + 10 + i}/{plen}", None, None, net_netns, f"n{i}", bridge="br0")
                if i not in second else _second_uplink(i, net_netns),))
            for i in range(1, nodes + 1))
        return Plan(**common, nodes=flat, ext_netns=f"{lab}-ext", ext_address=f"{base + 3}/{plen}",
                    core_gateways=(flat[0].ip,))
    if uplinks == 1:
        # Node I's own link 10.99.I.0/24: the router .1, the node .2.
        tors = (TorPlan(kind=tor, name="tor", netns=f"{lab}-tor", address=f"{base + 1}/{plen}",
                        as_number=TOR_AS),)
        node_plans = tuple(
            NodePlan(name=f"node{i}", netns=f"{lab}-node{i}", as_number=NODE_AS + i, uplinks=(
                Uplink("eth0", f"{base + 256 * i + 2}/{plen}", str(base + 256 * i + 1), "tor",
                       tors[0].netns, f"n{i}", far_address=f"{base + 256 * i + 1}/{plen}"),))
            for i in range(1, nodes + 1))
    else:
        # Segment K 10.99.(100+K).0/24 shared by all nodes: router K .1, node I .(10+I).
        tors = tuple(
            TorPlan(kind=tor, name=f"tor{k}", netns=f"{lab}-tor{k}",
                    address=f"{base + (1 if k == 1 else 3 + k)}/{plen}", as_number=TOR_AS + k - 1,
                    segment=Segment(f"up{k}", f"up{k}", f"{base + 256 * (100 + k)}/{plen}"),
                    segment_address=f"{base + 256 * (100 + k) + 1}/{plen}")
            for k in range(1, uplinks + 1))
        node_plans = tuple(
            NodePlan(name=f"node{i}", netns=f"{lab}-node{i}", as_number=NODE_AS + i, uplinks=tuple(
                Uplink(f"eth{k - 1}", f"{base + 256 * (100 + k) + 10 + i}/{plen}",
                       str(base + 256 * (100 + k) + 1), t.name, net_netns, f"n{i}u{k}", bridge=f"up{k}")
                for k, t in enumerate(tors, 1)))
            for i in range(1, nodes + 1))
    return Plan(**common, nodes=node_plans, tors=tors, ext_netns=f"{lab}-ext",
                ext_address=f"{base + 3}/{plen}", core_gateways=tuple(t.ip for t in tors))


def _second_uplink(i: int, net_netns: str) -> Uplink:
    u = lab_subnets.second_uplink(i)
    return Uplink("eth0", u["address"], u["gateway"], None, net_netns, f"n{i}", bridge=u["bridge"])


def plan_from_dict(d: dict) -> Plan:
    """The plan back from its JSON form (dataclasses.asdict) in the lab's record."""
    p = dict(d)
    p["nodes"] = tuple(NodePlan(**{**n, "uplinks": tuple(Uplink(**u) for u in n["uplinks"])})
                       for n in p["nodes"])
    p["tors"] = tuple(TorPlan(**{**t, "segment": Segment(**t["segment"]) if t.get("segment") else None})
                      for t in p.get("tors", ()))
    p["core_gateways"] = tuple(p.get("core_gateways", ()))
    p["etcd_members"] = tuple(EtcdMember(**m) for m in p.get("etcd_members", ()))
    return Plan(**p)


def plan_of(st: LabState) -> Plan:
    """The plan of a lab from its record (`state.LabState.plan`)."""
    return plan_from_dict(st.plan)


def split_pod(ref: str) -> tuple[str, str]:
    """'ns/name' -> (ns, name), validated as Kubernetes names; a bare name means 'default'."""
    ns, _, name = ref.rpartition("/")
    ns = ns or "default"
    for what, value in (("namespace", ns), ("name", name)):
        if not _K8S_NAME_RE.match(value):
            raise ValidationError(f"pod {what} {value!r} is not a valid Kubernetes name", field="pod")
    return ns, name


def pod_netns(lab: str, namespace: str, name: str) -> str:
    """`<lab>-pod-<ns>-<name>`, or a short hash of it when that would be too long."""
    full = f"{lab}-pod-{namespace}-{name}"
    if len(full) <= _MAX_NETNS_NAME:
        return full
    return f"{lab}-pod-{hashlib.sha256(f'{namespace}/{name}'.encode()).hexdigest()[:12]}"


def is_lab_netns(lab: str, netns: str) -> bool:
    """Whether a namespace name belongs to lab `lab` (by the naming scheme alone)."""
    return bool(re.match(rf"^{re.escape(lab)}-(ctl|net|ext|gw|tor\d*|etcd\d+|node\d+|pod-.+)$", netns))
