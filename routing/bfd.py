"""BFD (RFC 5880, asynchronous mode; RFC 5881, single hop over IPv4/IPv6 UDP).

Bidirectional Forwarding Detection tells within a few hundred milliseconds that a next
hop stopped forwarding, where a neighbour table or BGP's hold time take seconds. tortie
runs it to the egress next hops that ask for it (`IPPool.spec.egress.nextHops[].bfd`):
a next hop counts only while its session is Up.

    bfd = BFD(on_change=lambda peer, up: ...)     # called on BFD's own thread
    bfd.set_sessions({"10.99.101.1": Timers(min_tx=0.1, min_rx=0.1, multiplier=3)})
    bfd.start(); ...; bfd.states(); bfd.stop()

One thread owns every socket and timer (a selector and the sessions' deadlines), so neither the
agent's event loop nor the dataplane driver can delay a packet or a detection. Control
packets arrive on UDP 3784 with TTL 255 (GTSM: RFC 5881 section 5); each session sends
from its own port in 49152-65535. While a session is not Up it sends once a second, as
the RFC requires; once Up it moves to its configured rate through a Poll Sequence. The
detection time is the remote multiplier times the agreed receive interval.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tortie.log import get_logger

log = get_logger("bfd")

PORT = 3784
SRC_PORTS = range(49152, 65536)
TTL = 255
ADMIN_DOWN, DOWN, INIT, UP = 0, 1, 2, 3
STATE_NAMES = {ADMIN_DOWN: "AdminDown", DOWN: "Down", INIT: "Init", UP: "Up"}
# Diagnostic codes (RFC 5880 4.1)
DIAG_NONE, DIAG_DETECT_EXPIRED, DIAG_NEIGHBOR_DOWN, DIAG_ADMIN_DOWN = 0, 1, 3, 7
FLAG_P, FLAG_F, FLAG_A, FLAG_D, FLAG_M = 0x20, 0x10, 0x04, 0x02, 0x01
PACKET = struct.Struct("!BBBBIIIII")
SLOW = 1.0  # seconds: the transmit interval while not Up (RFC 5880 6.8.3)
MIN_INTERVAL = 0.01  # 10 ms: below it timers are refused (schema) and clamped (here)
IP_RECVTTL, IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT = 12, 51, 52


@dataclass(frozen=True)
class Timers:
    min_tx: float = 0.3  # seconds: how often we would like to send
    min_rx: float = 0.3  # seconds: how often we can take packets
    multiplier: int = 3


def fastest(asks: Iterable[tuple[str, Timers]]) -> dict[str, Timers]:
    """One session per address (RFC 5880 allows no more): where an egress next hop and a
    BGP peer (or two pools) share an address with different timers, the quickest detection
    (min_rx x multiplier, then min_tx) wins, so nobody's failover gets slower than asked."""
    out: dict[str, Timers] = {}
    for addr, t in asks:
        have = out.get(addr)
        if have is None or (t.min_rx * t.multiplier, t.min_tx) < (have.min_rx * have.multiplier, have.min_tx):
            out[addr] = t
    return out


def encode(state: int, diag: int, mult: int, my_disc: int, your_disc: int, min_tx: float, min_rx: float,
           poll: bool = False, final: bool = False) -> bytes:
    flags = (state << 6) | (FLAG_P if poll else 0) | (FLAG_F if final else 0)
    return PACKET.pack((1 << 5) | diag, flags, mult, PACKET.size, my_disc, your_disc,
                       int(min_tx * 1e6), int(min_rx * 1e6), 0)


@dataclass(frozen=True)
class Packet:
    diag: int
    state: int
    poll: bool
    final: bool
    mult: int
    my_disc: int
    your_disc: int
    min_tx: float
    min_rx: float


def decode(data: bytes) -> Packet | None:
    """A control packet, or None when RFC 5880 6.8.6 says to discard it."""
    if len(data) < PACKET.size:
        return None
    vd, flags, mult, length, my, your, tx, rx, _echo = PACKET.unpack_from(data)
    if vd >> 5 != 1 or length < PACKET.size or length > len(data) or mult == 0 or my == 0:
        return None
    if flags & (FLAG_A | FLAG_M) or (flags & FLAG_P and flags & FLAG_F):
        return None  # authentication is not spoken here; multipoint is reserved
    state = flags >> 6
    if your == 0 and state not in (DOWN, ADMIN_DOWN):
        return None
    return Packet(vd & 0x1F, state, bool(flags & FLAG_P), bool(flags & FLAG_F), mult, my, your,
                  tx / 1e6, rx / 1e6)


class Session:
    """One peer's session: RFC 5880's state variables and its two timers."""

    def __init__(self, peer: str, timers: Timers, my_disc: int, sock: socket.socket) -> None:
        self.peer, self.timers, self.my_disc, self.sock = peer, timers, my_disc, sock
        self.state, self.diag = DOWN, DIAG_NONE
        self.remote_disc = 0
        self.remote_state = DOWN
        self.remote_min_rx = 1e-6  # until the peer says (1 us: send at our own rate)
        self.remote_min_tx = 0.0
        self.remote_mult = 0
        self.poll = False  # a Poll Sequence is under way (our timers changed)
        self.final = False  # the next packet answers the peer's Poll
        self.next_tx = 0.0
        self.detect_at: float | None = None
        self.since = time.monotonic()
        self.reported_up = False  # what the client was last told (see BFD._set_state)

    @property
    def min_tx(self) -> float:
        """What we advertise: at least 1 s while not Up (RFC 5880 6.8.3)."""
        return self.timers.min_tx if self.state == UP else max(SLOW, self.timers.min_tx)

    def tx_interval(self) -> float:
        base = max(self.min_tx, self.remote_min_rx)
        return base * random.uniform(0.75, 1.0 if self.timers.multiplier > 1 else 0.9)

    def detect_time(self) -> float:
        return self.remote_mult * max(self.timers.min_rx, self.remote_min_tx)

    def packet(self) -> bytes:
        final, self.final = self.final, False
        return encode(self.state, self.diag, self.timers.multiplier, self.my_disc, self.remote_disc,
                      self.min_tx, self.timers.min_rx, poll=self.poll and not final, final=final)


class BFD:
    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self.on_change = on_change
        self._sessions: dict[str, Session] = {}
        self._by_disc: dict[int, Session] = {}
        self._want: dict[str, Timers] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._listeners: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._changed = False

    # -- the caller's side (any thread) ------------------------------------------------
    def set_sessions(self, want: Mapping[str, Timers]) -> None:
        """The peers to run sessions with, and their timers (whole; others are ended)."""
        with self._lock:
            self._want = {str(ipaddress.ip_address(p)): t for p, t in want.items()}
            self._changed = True
        self._wake()

    def states(self) -> dict[str, dict]:
        with self._lock:
            return {p: {"state": STATE_NAMES[s.state], "diag": s.diag, "since": s.since,
                        "remote_state": STATE_NAMES[s.remote_state]} for p, s in self._sessions.items()}

    def start(self) -> None:
        for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError:
                continue
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, PORT))
            self._sel.register(sock, selectors.EVENT_READ, "listen")
            self._listeners.append(sock)
        self._thread = threading.Thread(target=self._run, name="tortie-bfd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for s in [*self._listeners, *(x.sock for x in self._sessions.values())]:
            s.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # -- BFD's thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            deadlines = [s.next_tx for s in self._sessions.values()]
            deadlines += [s.detect_at for s in self._sessions.values() if s.detect_at is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 4096):
                            pass
                elif key.data == "listen":
                    self._receive(key.fileobj)
            if self._changed:
                self._reconcile()
            now = time.monotonic()
            for s in list(self._sessions.values()):
                if s.detect_at is not None and now >= s.detect_at:
                    s.detect_at = None
                    s.remote_disc = 0
                    if s.state in (INIT, UP):
                        self._set_state(s, DOWN, DIAG_DETECT_EXPIRED)
                if now >= s.next_tx:
                    self._send(s)

    def _reconcile(self) -> None:
        with self._lock:
            want, self._changed = dict(self._want), False
            for peer in [p for p in self._sessions if p not in want]:
                s = self._sessions.pop(peer)
                self._by_disc.pop(s.my_disc, None)
                self._say_goodbye(s)
                s.sock.close()
            for peer, timers in want.items():
                s = self._sessions.get(peer)
                if s is None:
                    self._sessions[peer] = self._new_session(peer, timers)
                elif s.timers != timers:
                    s.timers = timers
                    s.poll = s.state == UP  # the new timers through a Poll Sequence
                    s.next_tx = 0.0

    def _say_goodbye(self, s: Session) -> None:
        """A session we end goes AdminDown first (RFC 5880 6.8.16), so the peer's clients
        know it is no path failure (RFC 5882 3.2); a few copies, as a lost one would leave
        the peer to detect a failure after all."""
        if s.state != UP or not s.remote_disc:
            return
        s.state, s.diag, s.poll = ADMIN_DOWN, DIAG_ADMIN_DOWN, False
        for _ in range(3):
            with contextlib.suppress(OSError):
                s.sock.sendto(s.packet(), (s.peer, PORT))

    def _new_session(self, peer: str, timers: Timers) -> Session:
        family = socket.AF_INET6 if ":" in peer else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, TTL)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, TTL)
        for port in random.sample(SRC_PORTS, 64):
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                break
            except OSError:
                continue
        disc = random.randint(1, 0xFFFFFFFF)
        while disc in self._by_disc:
            disc = random.randint(1, 0xFFFFFFFF)
        s = Session(peer, timers, disc, sock)
        self._by_disc[disc] = s
        log.info("bfd session started", peer=peer, min_tx=timers.min_tx, min_rx=timers.min_rx,
                 multiplier=timers.multiplier)
        return s

    def _send(self, s: Session) -> None:
        with contextlib.suppress(OSError):  # no route to the peer yet: the detection timer decides
            s.sock.sendto(s.packet(), (s.peer, PORT))
        s.next_tx = time.monotonic() + s.tx_interval()

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data, anc, _flags, src = sock.recvmsg(256, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return
            ttl = next((int.from_bytes(d[:4], "little") if len(d) >= 4 else d[0]
                        for lvl, typ, d in anc if (lvl, typ) in ((socket.IPPROTO_IP, socket.IP_TTL),
                                                                 (socket.IPPROTO_IPV6, IPV6_HOPLIMIT))), None)
            if ttl is not None and ttl != TTL:
                continue  # not from a neighbour one hop away (RFC 5881 section 5)
            pkt = decode(data)
            if pkt is not None:
                self._on_packet(str(ipaddress.ip_address(src[0].split("%")[0])), pkt)

    def _on_packet(self, peer: str, pkt: Packet) -> None:
        s = self._by_disc.get(pkt.your_disc) if pkt.your_disc else self._sessions.get(peer)
        if s is None or s.peer != peer:
            return
        s.remote_disc, s.remote_state = pkt.my_disc, pkt.state
        s.remote_min_rx, s.remote_min_tx, s.remote_mult = max(pkt.min_rx, 1e-6), pkt.min_tx, pkt.mult
        if pkt.final:
            s.poll = False  # our Poll Sequence is done: the new timers hold
        if pkt.poll:
            s.final = True
            s.next_tx = 0.0  # answer at once (RFC 5880 6.8.7)
        if s.state == ADMIN_DOWN:
            return
        if pkt.state == ADMIN_DOWN:
            if s.state != DOWN:
                # the peer turned BFD off, which says nothing about the path: the client is
                # not told (RFC 5882 3.2), and keeps what it had until BFD comes back
                self._set_state(s, DOWN, DIAG_NEIGHBOR_DOWN, tell=False)
        elif s.state == DOWN:
            if pkt.state == DOWN:
                self._set_state(s, INIT, DIAG_NONE)
            elif pkt.state == INIT:
                self._set_state(s, UP, DIAG_NONE)
        elif s.state == INIT:
            if pkt.state in (INIT, UP):
                self._set_state(s, UP, DIAG_NONE)
        elif pkt.state == DOWN:  # we are Up
            self._set_state(s, DOWN, DIAG_NEIGHBOR_DOWN)
        s.detect_at = time.monotonic() + s.detect_time() if s.remote_mult else None

    def _set_state(self, s: Session, state: int, diag: int, tell: bool = True) -> None:
        was = s.state
        with self._lock:
            s.state, s.diag, s.since = state, diag, time.monotonic()
        # Up: the advertised transmit interval drops from 1 s to the configured one, which
        # takes a Poll Sequence; Down: back to 1 s, nothing to negotiate with a lost peer.
        s.poll = state == UP
        s.next_tx = 0.0
        (log.info if state == UP else log.warning)(
            "bfd session " + STATE_NAMES[state], peer=s.peer, was=STATE_NAMES[was], diag=diag)
        # Init is on the way up: the client hears of Up, and of Down (a failure)
        if tell and state != INIT and (state == UP) != s.reported_up and self.on_change is not None:
            s.reported_up = state == UP
            try:
                self.on_change(s.peer, state == UP)
            except Exception:
                log.exception("bfd state callback failed", peer=s.peer)
