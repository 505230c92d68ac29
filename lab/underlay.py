"""The lab's underlay: the namespaces of the plan (`topology.Plan`) and the links,
addresses and routes between them, before anything runs in them.

`build(plan)` walks the plan; `cross_routes` are what a router needs again after its links
went down (`Lab.router_start`); `ptp_routes` the static routes of `--cni ptp`.
"""

from __future__ import annotations

from tortie.lab import family, nsutil
from tortie.lab import subnets as lab_subnets
from tortie.lab.cniexec import PTP_SUBNET
from tortie.lab.topology import Plan, TorPlan


def build(plan: Plan) -> None:
    """Every namespace of the plan (the caller records them in the lab's state first, so
    teardown finds them), its bridges, veths, addresses and routes: the core segment, the
    routers, the nodes' uplinks."""
    for ns in plan.netns_names():
        nsutil.netns_add(ns)
        if 6 in plan.versions:  # a link cut and restored (router stop, link down) keeps its IPv6 addresses
            nsutil.sysctl(ns, "net.ipv6.conf.all.keep_addr_on_down", "1")
    bridges = [plan.bridge, *(seg.bridge for seg in plan.segments)]
    nsutil.ip_batch(plan.net_netns, [
        line for br in bridges for line in (f"link add {br} type bridge forward_delay 0 stp_state 0",
                                            f"link set {br} up")])
    lab_subnets.build_router(plan)  # --subnets 2: the second segment and its router
    # The core segment: etcd, the routers' core side, the outside host.
    core = [(plan.ctl_netns, "ctl", "eth0", plan.ctl_address, plan.bridge)]
    core += [(m.netns, f"etcd{m.name[1:]}", "eth0", m.address, plan.bridge)
             for m in plan.members if m.netns != plan.ctl_netns]
    core += [(t.netns, t.name, "eth0", t.address, plan.bridge) for t in plan.tors]
    if plan.ext_netns and plan.ext_address:
        core.append((plan.ext_netns, "ext", "eth0", plan.ext_address, plan.bridge))
    # Routers on their shared uplink segments (--uplinks 2).
    core += [(t.netns, f"{t.name}s", "eth1", t.segment_address, t.segment.bridge)
             for t in plan.tors if t.segment and t.segment_address]
    lines = []
    for ns, port, ifname, _, bridge in core:
        lines += [f"link add {port} type veth peer name {ifname} netns {ns}",
                  f"link set {port} master {bridge} up"]
    nsutil.ip_batch(plan.net_netns, lines)
    router_ns = {t.netns for t in plan.tors}
    fam = plan.ip_family
    for ns, _, ifname, addr, _ in core:
        default = [] if ns in router_ns or not plan.core_gateways else family.default_lines(plan.core_gateways, fam)
        if default and len(plan.core_gateways) > 1:  # --uplinks 2: replies go back the way they came
            default += [f"route add {family.of(t.segment.subnet, v)} via {family.of(t.ip, v)}"
                        for v in plan.versions for t in plan.tors if t.segment]
            nsutil.multipath_failover(ns, [ifname])
        nsutil.ip_batch(ns, [*family.addr_lines(addr, ifname, fam), f"link set {ifname} up", *default])
    for t in plan.tors:
        nsutil.sysctl(t.netns, "net.ipv4.ip_forward", "1")
        if 6 in plan.versions:
            nsutil.sysctl(t.netns, "net.ipv6.conf.all.forwarding", "1")
        nsutil.ip_batch(t.netns, cross_routes(plan, t))
    # The nodes' uplinks: onto a bridge, or point to point into a router.
    far: dict[str, list[str]] = {}
    for n in plan.nodes:
        for u in n.uplinks:
            cmds = far.setdefault(u.far_netns, [])
            cmds.append(f"link add {u.far_ifname} type veth peer name {u.ifname} netns {n.netns}")
            if u.bridge:
                cmds.append(f"link set {u.far_ifname} master {u.bridge}")
            if u.far_address:
                cmds += family.addr_lines(u.far_address, u.far_ifname, fam)
            cmds.append(f"link set {u.far_ifname} up")
    for ns, cmds in far.items():
        nsutil.ip_batch(ns, cmds)
    for n in plan.nodes:
        cmds = [c for u in n.uplinks for c in (*family.addr_lines(u.address, u.ifname, fam),
                                                f"link set {u.ifname} up")]
        if n.gateways:
            cmds += family.default_lines(n.gateways, fam)
        nsutil.ip_batch(n.netns, cmds)
        if len(n.gateways) > 1:
            nsutil.multipath_failover(n.netns, [u.ifname for u in n.uplinks])
    lab_subnets.add_routes(plan)


def ptp_routes(plan: Plan) -> None:
    """The reference-plugin baseline routes node i's pod range via node i (static, no BGP)."""
    index = {n.name: i for i, n in enumerate(plan.nodes, 1)}
    for tor in plan.tors:  # nodes reach each other through the routers' static routes
        nsutil.ip_batch(tor.netns, [f"route add {PTP_SUBNET.format(i=index[n.name])} via {u.ip}"
                                    for n, u in plan.links_of(tor.name)])
    if plan.tors:
        return
    for i, node in enumerate(plan.nodes, 1):
        nsutil.ip_batch(node.netns, [
            f"route add {PTP_SUBNET.format(i=j)} via {other.ip}"
            for j, other in enumerate(plan.nodes, 1) if j != i])


def cross_routes(plan: Plan, tor: TorPlan) -> list[str]:
    """Each router reaches the other routers' uplink segments over the core, so a reply that
    the ECMP hash sends through the other router still finds its way back."""
    return [f"route replace {family.of(o.segment.subnet, v)} via {family.of(o.ip, v)}"
            for v in plan.versions for o in plan.tors if o is not tor and o.segment]
