"""The lab's address plan: pure functions from (name, nodes, tor) to namespaces and addresses.

Layout for `--tor none` (issue 3):

    <lab>-ctl  eth0 10.99.0.2/24 (etcd) ─┐
    <lab>-node1 eth0 10.99.0.11/24 ──────┼── br0 in <lab>-net, subnet 10.99.0.0/24
    <lab>-nodeN eth0 10.99.0.(10+N)/24 ──┘

`--tor bird|frr` (issue 4) adds `<lab>-tor` as the segment's router (10.99.0.1) and
`<lab>-ext` behind it; the plan already carries `tors` and `outside` so status and the
builder need no new shape for that.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from tortie.errors import ValidationError

TOR_KINDS = ("none", "bird", "frr")
IMPLEMENTED_TORS = ("none",)
DEFAULT_LAB = "tortie"
UNDERLAY_SUBNET = "10.99.0.0/24"
DEFAULT_POOL_CIDR = "10.65.0.0/16"
DEFAULT_BLOCK_SIZE = 26
NODE_AS = 64512
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
    bridge_port: str   # its veth peer's name on the underlay bridge

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

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{self.ctl_address.split('/')[0]}:{ETCD_PORT}"

    def netns_names(self) -> list[str]:
        """Every namespace of the plan, in build order (teardown goes in reverse)."""
        return [self.net_netns, self.ctl_netns, *(n.netns for n in self.nodes)]


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
        raise ValidationError(f"--tor {tor} is not built yet (issue 4); use --tor none", field="tor")
    if not 1 <= nodes <= MAX_NODES:
        raise ValidationError(f"--nodes {nodes}: want 1..{MAX_NODES}", field="nodes")
    net = ipaddress.ip_network(UNDERLAY_SUBNET)
    plen = net.prefixlen
    node_plans = tuple(
        NodePlan(
            name=f"node{i}",
            netns=f"{lab}-node{i}",
            address=f"{net.network_address + 10 + i}/{plen}",
            as_number=NODE_AS,
            bridge_port=f"n{i}",
        )
        for i in range(1, nodes + 1)
    )
    return Plan(
        lab=lab, tor=tor,
        ctl_netns=f"{lab}-ctl", ctl_address=f"{net.network_address + 2}/{plen}",
        net_netns=f"{lab}-net", bridge="br0", subnet=str(net),
        nodes=node_plans,
    )


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
