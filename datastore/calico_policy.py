"""Calico's policy model: `tortie.io/v1` NetworkPolicy (namespaced), GlobalNetworkPolicy
and Tier -- their schemas (for `datastore.kinds`; the views are `datastore.calico_views`).

Evaluation, as Calico documents it: tiers by `order` (lowest first; no order: last, then
by name), policies by `order` within a tier (no order: last, then by name), first
matching rule wins; `Pass` skips the rest of its tier; an endpoint that some policy of a
tier selects and that no rule of them matched is denied at the end of that tier.
Kubernetes NetworkPolicies sit in the tier `default` at order 1000.

A rule's `source` (ingress) or `destination` (egress) names the peer: `selector`,
`namespaceSelector`, `nets`, `notNets`, `notSelector`; ports are always the
`destination`'s (`ports`, `notPorts`: numbers, "low:high" ranges, names). What is
accepted but not implemented is refused in one line naming the field ("is not supported
yet"), never silently ignored.
"""

from __future__ import annotations

import re
from typing import Any

from tortie.datastore.fields import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    IFNAME,
    PORT_NAME,
    Fields,
    parse_cidr,
    parse_ip,
    string,
)
from tortie.errors import ValidationError

ACTIONS = ("Allow", "Deny", "Log", "Pass")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")
NAMED_PROTOCOLS = (*PORT_PROTOCOLS, "ICMP", "ICMPv6")
DEFAULT_TIER = "default"
DEFAULT_TIER_ORDER = 1_000_000.0  # Calico's, unless a Tier "default" says otherwise
K8S_ORDER = 1000.0  # Kubernetes NetworkPolicies, in the default tier
_RANGE = re.compile(r"(\d{1,5}):(\d{1,5})")
# Accepted (Calico has them) but not implemented yet: refused with this reason.
_NOT_YET: dict[str, str] = {}


# --- schemas -------------------------------------------------------------------------------


def _order(f: Fields) -> None:
    value = f.raw("order")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{value!r} is not a number", field=f.at("order"))
    f.keep("order", value)


def _port(protocol_ok: bool) -> Any:
    def check(v: Any, where: str) -> int | str:
        if not protocol_ok:
            raise ValidationError("ports need protocol TCP, UDP or SCTP", field=where)
        if isinstance(v, bool):
            raise ValidationError("must be a port number, a range low:high or a port name", field=where)
        if isinstance(v, int):
            if not 1 <= v <= 65535:
                raise ValidationError("must be between 1 and 65535", field=where)
            return v
        if isinstance(v, str):
            m = _RANGE.fullmatch(v)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if not 1 <= lo <= 65535 or not 1 <= hi <= 65535:
                    raise ValidationError("ports must be between 1 and 65535", field=where)
                if lo > hi:
                    raise ValidationError(f"range {v} is reversed (low:high)", field=where)
                return v
            if PORT_NAME.fullmatch(v):
                return v
        raise ValidationError(f"{v!r} is not a port number, a range low:high or a port name", field=where)
    return check


def _cidr(v: Any, where: str) -> str:
    return str(parse_cidr(string(v, where), where, masked=False))


def _entity(f: Fields, *, peer: bool, ports_ok: bool) -> None:
    """One `source` / `destination`. `peer`: the side that names the other end (ingress
    source, egress destination); the other side may only carry destination ports."""
    for name in ("selector", "namespaceSelector", "notSelector"):
        f.selector(name)
    f.list("nets", _cidr)
    f.list("notNets", _cidr)
    f.list("ports", _port(ports_ok))
    for v in f.list("notPorts", _port(ports_ok)) or ():
        if isinstance(v, str) and not _RANGE.fullmatch(v):
            raise ValidationError(f"{v!r}: named ports are not supported yet in notPorts", field=f.at("notPorts"))
    where = f.path
    side = where.rsplit(".", 1)[-1]
    if not peer:
        for name in ("selector", "namespaceSelector", "notSelector", "nets", "notNets"):
            if f.raw(name) is not None:
                raise ValidationError(f"is not supported yet (only the {'source' if side == 'destination' else 'destination'}"
                                      " of a rule names the peer)", field=f.at(name))
    if side == "source":
        for name in ("ports", "notPorts"):
            if f.raw(name) is not None:
                raise ValidationError("is not supported yet (source ports)", field=f.at(name))
    if f.raw("nets") is not None and (f.raw("selector") is not None or f.raw("namespaceSelector") is not None):
        raise ValidationError("is not supported yet together with selector or namespaceSelector", field=f.at("nets"))


def _rule(direction: str) -> Any:
    def check(v: Any, where: str) -> dict:
        r = Fields(v, where)
        r.str("action", required=True, choices=ACTIONS)
        proto = r.raw("protocol")
        if isinstance(proto, bool) or (proto is not None and not isinstance(proto, (int, str))):
            raise ValidationError("must be a protocol name or number", field=r.at("protocol"))
        if isinstance(proto, int):
            r.int("protocol", 1, 255)
        elif proto is not None:
            r.str("protocol", choices=NAMED_PROTOCOLS)

        def icmp(i: Fields) -> None:
            i.int("type", 0, 254)
            i.int("code", 0, 255)
            if i.raw("code") is not None and i.raw("type") is None:
                raise ValidationError("needs a type", field=i.at("code"))
        r.obj_field("icmp", icmp)
        if r.raw("icmp") is not None and proto not in ("ICMP", "ICMPv6", 1, 58):
            raise ValidationError("needs protocol ICMP or ICMPv6", field=r.at("icmp"))
        ports_ok = proto in PORT_PROTOCOLS
        for side in ("source", "destination"):
            r.obj_field(side, lambda e, side=side: _entity(
                e, peer=(side == "source") == (direction == "ingress"), ports_ok=ports_ok))
        return r.done()
    return check


def policy_spec(global_: bool) -> Any:
    def spec(f: Fields, meta: dict) -> None:
        f.str("tier", default=DEFAULT_TIER, pattern=DNS_LABEL, max_len=63)
        _order(f)
        f.selector("selector", default="all()")
        if global_:
            f.selector("namespaceSelector")
        if global_:
            f.bool("applyOnForward")  # also the traffic a host endpoint forwards (pods')
            # before DNAT, on what arrives on a host endpoint: ingress only, and forwarded
            # traffic too (as Calico requires)
            # before conntrack, on every packet in and out of a host endpoint (replies too)
            if f.bool("doNotTrack"):
                if not f.raw("applyOnForward"):
                    raise ValidationError("doNotTrack needs applyOnForward: true", field=f.at("applyOnForward"))
                if f.raw("preDNAT"):
                    raise ValidationError("cannot be combined with doNotTrack", field=f.at("preDNAT"))
            if f.bool("preDNAT"):
                if not f.raw("applyOnForward"):
                    raise ValidationError("preDNAT needs applyOnForward: true", field=f.at("applyOnForward"))
                if f.raw("egress") or "Egress" in (f.raw("types") or ()):
                    raise ValidationError("a preDNAT policy has ingress rules only", field=f.at("egress"))
        for name, why in _NOT_YET.items():
            if global_ and f.bool(name):
                raise ValidationError(f"is not supported yet ({why})", field=f.at(name))
        f.list("ingress", _rule("ingress"))
        f.list("egress", _rule("egress"))
        types = f.list("types", string)
        if types is None:
            has_in, has_out = bool(f.raw("ingress")), bool(f.raw("egress"))
            f.out["types"] = ["Ingress"] if has_in or not has_out else []
            if has_out:
                f.out["types"].append("Egress")
        elif not set(types) <= {"Ingress", "Egress"} or len(set(types)) != len(types):
            raise ValidationError("must be distinct values of Ingress, Egress", field="spec.types")
    return spec


def tier_spec(f: Fields, meta: dict) -> None:
    if not DNS_LABEL.fullmatch(meta["name"]):
        raise ValidationError(f"{meta['name']!r} is not valid (a DNS label)", field="metadata.name")
    _order(f)


def host_endpoint_spec(f: Fields, meta: dict) -> None:
    """A node's own interface (`*`: all of them but the pods'), protected by the
    GlobalNetworkPolicies whose selector matches the endpoint's labels."""
    f.str("node", required=True, pattern=DNS_SUBDOMAIN)
    name = f.raw("interfaceName", required=True)
    if name != "*":
        f.str("interfaceName", required=True, pattern=IFNAME)
    else:
        f.keep("interfaceName", name)
    f.list("expectedIPs", lambda v, where: str(parse_ip(string(v, where), where)))
    for name in ("profiles", "ports"):
        if f.raw(name):
            raise ValidationError("is not supported yet on host endpoints", field=f.at(name))
