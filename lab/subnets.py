"""`tortie-lab up --subnets 2` (issue 13): the nodes on two L3 segments joined by a plain
router that does not peer with tortie, so nothing but VXLAN (or BGP with that router)
carries pod traffic between them.

    <lab>-node1..K  eth0 10.99.0.(10+I)/24   ── br0 (the core: etcd, ext)  ┐
                                                             <lab>-gw eth0 10.99.0.1/24
    <lab>-nodeK+1.. eth0 10.99.200.(10+I)/24 ── br1 in <lab>-net           ┘ eth1 10.99.200.1/24

The first half of the nodes (rounded up) sit on the core segment, the rest on the second;
the router forwards between them and holds no route to any pod. Nodes of the second
segment route by default through it; the core's hosts and nodes know the second segment
through it. The nodes keep their full BGP mesh (its sessions cross the router), but a
route learned from a node on the other segment has a next hop on no link of this node:
the kernel refuses it, so with `vxlanMode: Never` pods across the router do not reach
each other.
"""

from __future__ import annotations

import ipaddress

from tortie.errors import ValidationError

SECOND_SUBNET = "10.99.200.0/24"
BRIDGE = "br1"
SUBNET_COUNTS = (1, 2)


def check(subnets: int, nodes: int, tor: str, uplinks: int) -> None:
    if subnets not in SUBNET_COUNTS:
        raise ValidationError(f"--subnets {subnets}: want 1 or 2", field="subnets")
    if subnets == 2 and (tor != "none" or uplinks != 1):
        raise ValidationError("--subnets 2 wants --tor none and one uplink (its router does not peer "
                              "with tortie)", field="subnets")
    if subnets == 2 and nodes < 2:
        raise ValidationError("--subnets 2 wants at least 2 nodes", field="subnets")


def router_netns(lab: str) -> str:
    return f"{lab}-gw"


def on_second(nodes: int) -> range:
    """The node numbers on the second segment: the second half."""
    return range((nodes + 1) // 2 + 1, nodes + 1)


def gateways(core_subnet: str) -> tuple[str, str]:
    """The router's address on the core and on the second segment (with prefix)."""
    core, second = ipaddress.ip_network(core_subnet), ipaddress.ip_network(SECOND_SUBNET)
    return f"{core.network_address + 1}/{core.prefixlen}", f"{second.network_address + 1}/{second.prefixlen}"


def second_uplink(i: int) -> dict:
    """Node i's address on the second segment, its router and bridge (br1 in <lab>-net)."""
    net = ipaddress.ip_network(SECOND_SUBNET)
    return dict(address=f"{net.network_address + 10 + i}/{net.prefixlen}",
                gateway=str(net.network_address + 1), bridge=BRIDGE)


def build_router(plan) -> None:
    """The second segment's bridge and the router between the two (before the nodes)."""
    from tortie.lab import nsutil

    if plan.subnets != 2:
        return
    gw = router_netns(plan.lab)
    core, second = gateways(plan.subnet)
    nsutil.ip_batch(plan.net_netns, [
        f"link add {BRIDGE} type bridge forward_delay 0 stp_state 0", f"link set {BRIDGE} up",
        f"link add gw type veth peer name eth0 netns {gw}", f"link set gw master {plan.bridge} up",
        f"link add gws type veth peer name eth1 netns {gw}", f"link set gws master {BRIDGE} up"])
    nsutil.ip_batch(gw, [f"addr add {core} dev eth0", "link set eth0 up",
                         f"addr add {second} dev eth1", "link set eth1 up"])
    nsutil.sysctl(gw, "net.ipv4.ip_forward", "1")


def add_routes(plan) -> None:
    """The core's hosts and nodes reach the second segment through the router."""
    from tortie.lab import nsutil

    if plan.subnets != 2:
        return
    via = gateways(plan.subnet)[0].split("/")[0]
    core = [plan.ctl_netns, *(m.netns for m in plan.members if m.netns != plan.ctl_netns)]
    core += [plan.ext_netns] if plan.ext_netns else []
    core += [n.netns for n in plan.nodes if not n.uplinks[0].gateway]
    for ns in core:
        nsutil.ip_batch(ns, [f"route replace {SECOND_SUBNET} via {via}"])


def status(plan) -> dict | None:
    """The second segment and its router, for `status -o json` (None with one subnet)."""
    if plan.subnets != 2:
        return None
    core, second = gateways(plan.subnet)
    return {"router": {"namespace": router_netns(plan.lab), "core_address": core, "address": second, "bgp": False},
            "segment": {"namespace": plan.net_netns, "bridge": BRIDGE, "subnet": SECOND_SUBNET},
            "nodes": {n.name: n.uplinks[0].address for n in plan.nodes}}
