"""What the speaker keeps per BGP session, and where it speaks from."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field


@dataclass
class PeerState:
    state: str = "idle"
    since: float = field(default_factory=time.time)
    last_error: str = ""
    gr_time: int = 0  # the restart time the peer offered in its OPEN (0: no graceful restart)
    eor: set[str] = field(default_factory=set)  # families the peer sent end-of-RIB for
    needs_full: bool = False  # came up; owed the full export set and our end-of-RIB
    router_id: str = ""  # from its OPEN: the originator id of what we reflect for it
    probe_error: str = ""  # what dialing it ourselves shows (see bgp.diagnose)
    expiry: asyncio.TimerHandle | None = None


def source_for(address: str) -> str | None:
    """The source address the kernel would use towards `address` (a UDP connect sends nothing)."""
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((address, 179))
            return s.getsockname()[0]
    except OSError:
        return None
