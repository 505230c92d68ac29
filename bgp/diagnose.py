"""Why a BGP session is down, in words for `tortiectl node status`.

ExaBGP does not say why it cannot connect (only its debug log does), so the speaker dials
the peers that are down itself, the way ExaBGP would -- from the same source address,
MD5-signed when the peer has a password -- and names what happens: refused, no answer,
MD5 mismatch. `reason_text` puts ExaBGP's own `down` reasons in the same words.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Mapping

from tortie.bgp.peers import Peer
from tortie.bgp.session import PeerState
from tortie.bgp.status import notification_text


async def diagnose(peers: Mapping[str, Peer], states: Mapping[str, PeerState],
                   local_for: Callable[[Peer], str | None]) -> None:
    """One round: dial every active peer down for 3 s or more; note what happened in its state."""
    now = time.time()
    due = [(addr, peer) for addr, peer in peers.items()
           if (st := states.get(addr)) is not None and not peer.passive
           and st.state != "established" and now - st.since >= 3]
    results = await asyncio.gather(*(probe(peer, local_for(peer)) for _, peer in due), return_exceptions=True)
    for (addr, _), reason in zip(due, results, strict=True):
        st = states.get(addr)
        if st is None or st.state == "established":
            continue  # gone, or it came up meanwhile
        if isinstance(reason, BaseException):
            reason = f"cannot dial: {reason}"
        st.probe_error = reason or "TCP connects, but no BGP session yet"
        if st.last_error == "reconfigured":
            st.last_error = ""  # the probe says why the redefined session stays down


async def probe(peer: Peer, local: str | None, timeout: float = 2.0) -> str | None:
    """Dial the peer the way ExaBGP does; None when TCP gets through."""
    signed = await tcp_probe(local, peer.address, peer.port, peer.password, timeout)
    if signed is None:
        return None
    if signed == "refused":
        return "connect refused"
    if peer.password:
        plain = await tcp_probe(local, peer.address, peer.port, None, timeout)
        if plain is None or plain == "refused":
            return "MD5 mismatch: the peer answers unsigned connections, not ours (no or another password)"
        return "no answer to MD5-signed connection: wrong MD5 password, or the peer is unreachable"
    return "no answer: the peer is unreachable, or expects an MD5 password"


def reason_text(reason: str) -> str:
    """ExaBGP's `down` reason, in the words the status shows."""
    low = reason.lower()
    for marker, direction in (("notification sent", "sent"), ("notification received", "received")):
        if marker in low:
            try:
                code, sub = low.split("(")[1].split(")")[0].split(",")
                text = notification_text(int(code), int(sub))
            except (IndexError, ValueError):
                text = reason
            return f"notification {direction}: {text}" if direction == "sent" else f"peer sent notification: {text}"
    if "closing connection" in low or "closed" in low:
        return "connection closed by the peer"
    return reason


_TCP_MD5SIG = 14


def _md5sig(peer: str, key: str) -> bytes:
    """struct tcp_md5sig for setsockopt(TCP_MD5SIG)."""
    addr = ipaddress.ip_address(peer)
    if addr.version == 4:
        sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + addr.packed
    else:
        sa = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + addr.packed + b"\0\0\0\0"
    raw = key.encode()
    return sa.ljust(128, b"\0") + struct.pack("=BBHI", 0, 0, len(raw), 0) + raw.ljust(80, b"\0")


async def tcp_probe(local: str | None, peer: str, port: int, password: str | None,
                    timeout: float) -> str | None:
    """None when a TCP connection gets through, else "refused", "timeout" or the error."""
    fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if password:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_MD5SIG, _md5sig(peer, password))
        if local:
            sock.bind((local, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (peer, port)), timeout)
        return None
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return "refused"
        return exc.strerror or str(exc)
    finally:
        sock.close()
