"""The lab's address plan: pure functions from (name, nodes, tor) to namespaces and addresses.

`--tor none` (issue 3): one L2 segment, the nodes peer in a full mesh.

    <lab>-ctl   eth0 10.99.0.2/24 (etcd) ──┐
    <lab>-node1 eth0 10.99.0.11/24 ────────┼── br0 in <lab>-net, 10.99.0.0/24
    <lab>-nodeN eth0 10.99.0.(10+N)/24 ────┘

`--tor bird|frr` (issue 4): each node on its own link to the router, which also sits on
the core segment with etcd and the outside host; the nodes peer with the router only.

    <lab>-nodeI eth0 10.99.I.2/24 ── nI 10.99.I.1/24 ┐
                                          <lab>-tor  ├ eth0 10.99.0.1/24 ── br0 in <lab>-net
    <lab>-ctl eth0 10.99.0.2/24, <lab>-ext eth0 10.99.0.3/24 (default via 10.99.0.1) ──┘

Node I has AS 64512+I behind a router with AS 65000 (one AS per node, so the router's
re-announcements never carry the receiving node's own AS).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from tortie.errors import ValidationError

TOR_KINDS = ("none", "bird", "frr")
IMPLEMENTED_TORS = ("none", "bird", "frr")
DEFAULT_LAB = "tortie"
UNDERLAY_SUBNET = "10.99.0.0/24"
DEFAULT_POOL_CIDR = "10.65.0.0/16"
DEFAULT_BLOCK_SIZE = 26
NODE_AS = 64512   # the mesh's one AS; with a router, node I has NODE_AS + I
TOR_AS = 65000
ETCD_PORT = 2379
MAX_NODES = 200

# Lab names carry no '-' so `<lab>-<role>` can never be mistaken for another lab's namespace.
_LAB_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_MAX_NETNS_NAME = 48


@dataclass(frozen=True)
class NodePlan:
    name: str          # node1 (TORTIE_NODENAME)
    netns: str         # <lab>-node1
    address: str       # underlay address with prefix length, 10.99.0.11/24
    as_number: int
    bridge_port: str   # its veth peer's name: on the bridge (no router) or in the router
    gateway: str | None = None   # default route (the router's address on the node's link)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class TorPlan:
    kind: str          # bird | frr
    name: str
    netns: str
    address: str       # on the core segment, with prefix length
    as_number: int

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
    core_gateway: str | None = None  # default route of ctl and ext (the router)

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{self.ctl_address.split('/')[0]}:{ETCD_PORT}"

    def netns_names(self) -> list[str]:
        """Every namespace of the plan, in build order (teardown goes in reverse)."""
        extra = [t.netns for t in self.tors] + ([self.ext_netns] if self.ext_netns else [])
        return [self.net_netns, self.ctl_netns, *extra, *(n.netns for n in self.nodes)]


def check_lab_name(name: str) -> str:
    if not _LAB_RE.match(name):
        raise ValidationError(
            f"lab name {name!r}: want 1-16 lower-case letters and digits, starting with a letter",
            field="name")
    return name


def make_plan(lab: str, nodes: int, tor: str = "none") -> Plan:
    check_lab_name(lab)
    if tor not in TOR_KINDS:
        raise ValidationError(f"unknown tor {tor!r} (want one of {', '.join(TOR_KINDS)})", field="tor")
    if tor not in IMPLEMENTED_TORS:
        raise ValidationError(f"--tor {tor} is not built yet", field="tor")
    if not 1 <= nodes <= MAX_NODES:
        raise ValidationError(f"--nodes {nodes}: want 1..{MAX_NODES}", field="nodes")
    net = ipaddress.ip_network(UNDERLAY_SUBNET)
    base, plen = net.network_address, net.prefixlen
    common = dict(lab=lab, tor=tor, ctl_netns=f"{lab}-ctl", ctl_address=f"{base + 2}/{plen}",
                  net_netns=f"{lab}-net", bridge="br0", subnet=str(net))
    if tor == "none":
        return Plan(**common, nodes=tuple(
            NodePlan(name=f"node{i}", netns=f"{lab}-node{i}", address=f"{base + 10 + i}/{plen}",
                     as_number=NODE_AS, bridge_port=f"n{i}")
            for i in range(1, nodes + 1)))
    # With a router: node I's link is 10.99.I.0/24, the router .1, the node .2.
    node_plans = tuple(
        NodePlan(name=f"node{i}", netns=f"{lab}-node{i}", address=f"{base + 256 * i + 2}/{plen}",
                 as_number=NODE_AS + i, bridge_port=f"n{i}", gateway=str(base + 256 * i + 1))
        for i in range(1, nodes + 1))
    return Plan(**common, nodes=node_plans,
                tors=(TorPlan(kind=tor, name="tor", netns=f"{lab}-tor", address=f"{base + 1}/{plen}",
                              as_number=TOR_AS),),
                ext_netns=f"{lab}-ext", ext_address=f"{base + 3}/{plen}", core_gateway=str(base + 1))


def node_link_router_address(node: NodePlan) -> str:
    """The router's side of a node's own link (with prefix length)."""
    assert node.gateway is not None
    return f"{node.gateway}/{node.address.split('/')[1]}"


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
    return bool(re.match(rf"^{re.escape(lab)}-(ctl|net|ext|tor\d*|node\d+|pod-.+)$", netns))
