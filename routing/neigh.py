"""Neighbour and FDB entries over raw rtnetlink: the VXLAN manager's batches.

One message per entry, many entries per sendmsg (`NetlinkSocket.transact`), as the route
manager does for routes. An FDB entry of a VXLAN device (family AF_BRIDGE, NTF_SELF) says
where the VTEP with that MAC lives (NDA_DST: the node's underlay address); a neighbour
entry (AF_INET/AF_INET6) maps the remote tunnel address to that MAC. tortie's entries are
permanent (NUD_PERMANENT): the kernel never ages or probes them, and entries in other
states on the device (a failed resolution) are the kernel's, never touched.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from . import netlink as nl

RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTNLGRP_NEIGH = 3
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad1, pad2, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

# (kind, key): ("fdb", mac) -> underlay address; ("neigh", tunnel address) -> mac
Key = tuple[str, str]


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _ATTR.pack(n, atype) + payload + b"\0" * (-n & 3)


def _ip(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def encode(msg_type: int, seq: int, ifindex: int, key: Key, value: str) -> bytes:
    """One RTM_NEWNEIGH (create or replace) / RTM_DELNEIGH for an entry on `ifindex`."""
    kind, k = key
    if kind == "fdb":
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0)
        body += _attr(NDA_LLADDR, mac_bytes(k)) + _attr(NDA_DST, _ip(value))
    else:
        fam = socket.AF_INET6 if ":" in k else socket.AF_INET
        body = _NDMSG.pack(fam, 0, 0, ifindex, NUD_PERMANENT, 0, 0)
        body += _attr(NDA_DST, _ip(k)) + _attr(NDA_LLADDR, mac_bytes(value))
    flags = nl.NLM_F_CREATE | nl.NLM_F_REPLACE if msg_type == RTM_NEWNEIGH else 0
    return nl.encode_raw(msg_type, flags, seq, body)


def dump_request(family: int, ifindex: int) -> bytes:
    """A dump of one device's entries (the kernel filters by NDA_IFINDEX)."""
    return _NDMSG.pack(family, 0, 0, 0, 0, 0, 0) + _attr(NDA_IFINDEX, _I32.pack(ifindex))


def parse(buf: bytes) -> Iterator[tuple[int, int, Key, str, bool]]:
    """(message type, ifindex, key, value, permanent) of each neighbour message."""
    for off, length, mtype in nl.iter_messages(buf):
        if mtype not in (RTM_NEWNEIGH, RTM_DELNEIGH):
            continue
        fam, _, _, ifindex, state, _flags, _ = _NDMSG.unpack_from(buf, off + 16)
        dst = lladdr = None
        for atype, at, n in nl.iter_attrs(buf, off + 16 + _NDMSG.size, off + length):
            if atype == NDA_DST and n in (4, 16):
                dst = socket.inet_ntop(socket.AF_INET6 if n == 16 else socket.AF_INET, buf[at:at + n])
            elif atype == NDA_LLADDR and n == 6:
                lladdr = mac_text(buf[at:at + n])
        permanent = bool(state & NUD_PERMANENT)
        if fam == AF_BRIDGE:
            if lladdr is not None and dst is not None:
                yield mtype, ifindex, ("fdb", lladdr), dst, permanent
        elif fam in (socket.AF_INET, socket.AF_INET6) and dst is not None:
            yield mtype, ifindex, ("neigh", dst), lladdr or "", permanent


def family_of(version: int) -> int:
    return _FAMILY[version]
