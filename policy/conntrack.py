"""Flushing the UDP conntrack entries of Service backends that went away.

A UDP "connection" lives in conntrack as long as datagrams keep coming, so a client that
keeps sending to a Service would follow a DNAT to a backend that is gone, forever. As
kube-proxy does, the proxy deletes the UDP entries whose reply comes from such a backend
(the entry's reply source is the DNAT target) after each transaction that removes one.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

from tortie.log import get_logger

log = get_logger("proxy")


def flush_udp_to(gone: Iterable[tuple[int, str]], netns: str | None = None) -> int:
    """Delete UDP conntrack entries whose reply source is one of (family, address); how many."""
    from pyroute2 import Conntrack
    from pyroute2.conntrack import NFCTAttrTuple

    ctx = contextlib.nullcontext()
    if netns is not None:
        from tortie.lab.nsutil import in_netns

        ctx = in_netns(netns)
    deleted = 0
    with ctx, Conntrack() as ct:
        for family, address in sorted(gone):
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            want = NFCTAttrTuple(family=af, saddr=address, proto=socket.IPPROTO_UDP)
            for entry in list(ct.dump_entries(tuple_reply=want)):
                with contextlib.suppress(OSError):  # gone meanwhile
                    ct.delete(entry)
                    deleted += 1
    if deleted:
        log.info("udp conntrack entries flushed", backends=sorted(a for _, a in gone), entries=deleted)
    return deleted


__all__ = ["flush_udp_to"]
