"""The node's BGP router ID (a 32-bit number written as an IPv4 address).

Calico's rule: the node's IPv4 address; on a node without one (IPv6-only), the setting
`routerID` / `CALICO_ROUTER_ID`, which may be `hash` to derive it from the node name.
tortie does the same with TORTIE_ROUTER_ID (an IPv4 address, or `hash`), and derives it
from the node name by itself when the node has no IPv4 address and nothing is set, so an
IPv6-only node peers without per-node configuration. The same name gives the same ID on
every start, so a restarted node is the same speaker to its peers.
"""

from __future__ import annotations

import hashlib
import ipaddress

from tortie.errors import ValidationError

HASH = "hash"


def check(value: str, field: str = "TORTIE_ROUTER_ID") -> str:
    """A configured router ID: `hash`, or an IPv4 address that is not 0.0.0.0."""
    if value == HASH:
        return value
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValidationError(f"{value!r}: want an IPv4 address (BGP identifiers are 32 bits) or 'hash'",
                              field=field) from None
    if int(ip) == 0:
        raise ValidationError("0.0.0.0 is not a valid BGP identifier", field=field)
    return str(ip)


def from_name(node_name: str) -> str:
    """A router ID from the node's name: the first four bytes of its SHA-256, the first
    octet kept in 1-223 outside 127 (no zero, loopback, multicast or reserved-looking ID)."""
    b = hashlib.sha256(node_name.encode()).digest()[:4]
    first = 1 + b[0] % 223
    if first == 127:
        first = 128
    return str(ipaddress.IPv4Address(bytes([first, *b[1:]])))


def derive(node_name: str, ipv4: str | None, configured: str | None = None) -> tuple[str, str]:
    """(router ID, where it came from: "configured", "ipv4" or "hash")."""
    if configured and configured != HASH:
        return check(configured), "configured"
    if ipv4 and configured != HASH:
        return str(ipaddress.IPv4Address(ipv4)), "ipv4"
    return from_name(node_name), "hash"
