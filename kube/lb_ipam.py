"""Load-balancer addresses for Services, from IPPools with `allowedUses: [LoadBalancer]`.

Pure (no I/O): the caller gives the Service, the pools and the addresses already taken.
Calico's conventions: a Service of type LoadBalancer is tortie's to serve unless it names
another `spec.loadBalancerClass` (`LB_CLASS` is ours); `spec.loadBalancerIP` (deprecated in
Kubernetes, still honoured) must lie in one of those pools; otherwise the first free
address of the first pool with one. A Service already given an address keeps it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from tortie.errors import ValidationError

LB_CLASS = "tortie.io/loadbalancer"


def lb_pools(pools: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pools (resources) load-balancer addresses come from, by name."""
    return sorted((p for p in pools if "LoadBalancer" in p["spec"].get("allowedUses", ())
                   and not p["spec"].get("disabled")), key=lambda p: p["metadata"]["name"])


def ours(service: Mapping[str, Any]) -> bool:
    spec = service.get("spec") or {}
    return spec.get("type") == "LoadBalancer" and spec.get("loadBalancerClass") in (None, LB_CLASS)


def assigned(service: Mapping[str, Any]) -> list[str]:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    return [i["ip"] for i in ingress if i.get("ip")]


def choose(service: Mapping[str, Any], pools: Iterable[Mapping[str, Any]], taken: Iterable[str]) -> str | None:
    """The address this Service should have (None: not ours, or no LoadBalancer pool);
    ValidationError when what it asks for cannot be given."""
    if not ours(service):
        return None
    have = assigned(service)
    if have:
        return have[0]
    usable = [ipaddress.ip_network(p["spec"]["cidr"]) for p in lb_pools(pools)]
    taken = {ipaddress.ip_address(a) for a in taken}
    wanted = (service.get("spec") or {}).get("loadBalancerIP")
    if wanted:
        ip = ipaddress.ip_address(wanted)
        if not any(ip in net for net in usable):
            raise ValidationError(f"{wanted} is in no IPPool with allowedUses LoadBalancer",
                                  field="spec.loadBalancerIP")
        if ip in taken:
            raise ValidationError(f"{wanted} is another Service's", field="spec.loadBalancerIP")
        return str(ip)
    if not usable:
        return None
    for net in usable:
        for ip in net.hosts() if net.num_addresses > 2 else net:
            if ip not in taken:
                return str(ip)
    raise ValidationError("every IPPool with allowedUses LoadBalancer is full", field="status.loadBalancer")


__all__ = ["LB_CLASS", "assigned", "choose", "lb_pools", "ours"]
