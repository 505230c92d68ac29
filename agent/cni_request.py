"""What a CNI ADD asks of IPAM: how many addresses of each family, from which pools, and
whether the network config's MTU suits them. Checked before anything is allocated."""

from __future__ import annotations

from tortie.cni import protocol as p


def counts(req: p.CNIRequest, asked: tuple[list[str], list[str]] = ([], [])
           ) -> tuple[int, int, dict[int, list[str] | None] | None]:
    """(IPv4 count, IPv6 count, pools per IP version or None). `asked`: the pod's
    annotations, which override the network config's `ipv4_pools` / `ipv6_pools` per family."""
    ipam = req.ipam_config

    def flag(name: str, default: bool) -> bool:
        v = ipam.get(name, default)
        return v if isinstance(v, bool) else str(v).lower() == "true"

    v4, v6 = int(flag("assign_ipv4", True)), int(flag("assign_ipv6", False))
    if not v4 and not v6:
        raise p.CNIError(p.INVALID_CONFIG, "ipam: assign_ipv4 and assign_ipv6 are both off")
    p.check_mtu(req.config, ipv6=bool(v6))
    # Per family, as in Calico: ipv4_pools picks the IPv4 pools only, so a dual-stack pod
    # that names its IPv4 pool takes its IPv6 address from the node's IPv6 pools.
    pools = {4: [*(asked[0] or ipam.get("ipv4_pools") or [])] or None,
             6: [*(asked[1] or ipam.get("ipv6_pools") or [])] or None}
    return v4, v6, pools if pools[4] or pools[6] else None
