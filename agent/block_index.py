"""Which of this node's blocks a learned prefix falls inside, without parsing it into an
`ipaddress` object: a speaker can hold tens of thousands of learned /32s, and each one is
checked on every change of our blocks (see calc.import_refusal)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


class BlockIndex:
    """This node's blocks, keyed by (IP version, prefix length) -> network integer."""

    def __init__(self, blocks: Iterable[tuple[str, ipaddress._BaseNetwork]] = ()) -> None:
        self._by_len: dict[tuple[int, int], dict[int, str]] = {}
        for cidr, net in blocks:
            self._by_len.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = cidr
        self._shortest = {v: min(p for (ver, p) in self._by_len if ver == v)
                          for v in {ver for ver, _ in self._by_len}}

    def __bool__(self) -> bool:
        return bool(self._by_len)

    def containing(self, prefix: str) -> str | None:
        """The block of ours that `prefix` (canonical "addr/len") is a strict subnet of."""
        addr, _, plen_s = prefix.rpartition("/")
        plen = int(plen_s)
        version = 6 if ":" in addr else 4
        shortest = self._shortest.get(version)
        if shortest is None or plen <= shortest:
            return None  # nothing of ours is less specific (the common case: others' blocks)
        bits = 128 if version == 6 else 32
        value = int.from_bytes(socket.inet_pton(_FAMILY[version], addr), "big")
        for (ver, blen), nets in self._by_len.items():
            if ver == version and plen > blen:
                cidr = nets.get(value >> (bits - blen) << (bits - blen))
                if cidr is not None:
                    return cidr
        return None
