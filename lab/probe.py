"""Reachability probes from inside a namespace, and the all-pairs matrix.

A probe creates its socket inside the source namespace (per-thread setns) and then
connects from any thread, so many probes run in parallel from one process.
TCP succeeds when the connection is accepted and the server's reply arrives; UDP when
a datagram comes back. Lab pods answer with their name, so a probe of a pod also checks
that the answer came from that pod and not from another one at the same address.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tortie.errors import DataplaneError
from tortie.lab import nsutil

DEFAULT_TIMEOUT = 1.0
RETRY = 0.25  # seconds between SYNs / datagrams within one probe


@dataclass(frozen=True)
class ProbeResult:
    src: str
    dst: str
    addr: str
    port: int
    proto: str        # tcp | udp
    ok: bool
    reply: str = ""
    error: str = ""
    ms: float = 0.0

    @property
    def answered_by(self) -> str:
        """The pod that answered (lab pods answer `<pod> <client address as seen>`)."""
        return self.reply.split(" ")[0] if self.reply else ""

    @property
    def seen_as(self) -> str:
        """The client's address as the answering pod saw it ("" if the reply did not say)."""
        parts = self.reply.split(" ")
        return parts[1] if len(parts) > 1 else ""


def probe(src_netns: str, addr: str, port: int, *, udp: bool = False, timeout: float = DEFAULT_TIMEOUT,
          expect: str | None = None, src: str | None = None, dst: str | None = None) -> ProbeResult:
    """Connect from namespace src_netns to addr:port; ok iff a reply (== expect, if given) arrives."""
    proto = "udp" if udp else "tcp"
    t0 = time.monotonic()
    deadline = t0 + timeout
    reply, error = "", ""
    try:
        reply = _udp(src_netns, addr, port, deadline) if udp else _tcp(src_netns, addr, port, deadline)
    except DataplaneError as exc:
        error = str(exc)
    except TimeoutError:
        error = "timeout"
    except OSError as exc:
        error = exc.strerror or type(exc).__name__
    ok = bool(reply) and not error
    if ok and expect is not None and reply.split(" ")[0] != expect:
        ok, error = False, f"answered by {reply!r}, expected {expect!r}"
    elif not ok and not error:
        error = "no reply"
    return ProbeResult(src=src or src_netns, dst=dst or addr, addr=addr, port=port, proto=proto, ok=ok,
                       reply=reply, error=error, ms=round((time.monotonic() - t0) * 1000, 1))


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _tcp(netns: str, addr: str, port: int, deadline: float) -> str:
    # A new SYN every RETRY seconds rather than the kernel's 1 s first retransmission: a
    # first packet lost while a fresh veth's carrier or ARP settles must not fail the probe.
    while True:
        with nsutil.socket_in(netns, _family(addr), socket.SOCK_STREAM) as sock:
            sock.settimeout(min(_left(deadline), RETRY))
            try:
                sock.connect((addr, port))
            except TimeoutError:
                continue
            buf = b""
            while not buf.endswith(b"\n"):
                sock.settimeout(_left(deadline))
                chunk = sock.recv(256)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace").strip()


def _udp(netns: str, addr: str, port: int, deadline: float) -> str:
    # Resend every RETRY seconds inside the timeout, for the same reason.
    with nsutil.socket_in(netns, _family(addr), socket.SOCK_DGRAM) as sock:
        sock.connect((addr, port))
        while True:
            sock.send(b"probe\n")
            sock.settimeout(min(_left(deadline), RETRY))
            try:
                return sock.recv(256).decode(errors="replace").strip()
            except TimeoutError:
                continue


@dataclass(frozen=True)
class Endpoint:
    label: str          # what the grid shows: node1, default/a
    netns: str
    addr: str | None    # where to probe it (pods only)


@dataclass(frozen=True)
class Matrix:
    sources: tuple[str, ...]
    dests: tuple[str, ...]
    port: int
    results: tuple[ProbeResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[ProbeResult]:
        return [r for r in self.results if not r.ok]

    def cell(self, src: str, dst: str) -> str:
        got = {r.proto: r.ok for r in self.results if r.src == src and r.dst == dst}
        tcp, udp = got.get("tcp"), got.get("udp")
        if tcp and udp:
            return "ok"
        if tcp:
            return "tcp only"
        if udp:
            return "udp only"
        return "FAIL"

    def render(self) -> str:
        """A grid: rows are sources, columns destinations; each cell TCP and UDP together."""
        width = max([len(s) for s in (*self.sources, "from \\ to")] or [8]) + 2
        cols = [max(len(d), 8) + 2 for d in self.dests]
        lines = [f"port {self.port}, TCP and UDP (ok = both answered)",
                 "from \\ to".ljust(width) + "".join(d.ljust(c) for d, c in zip(self.dests, cols, strict=True))]
        for s in self.sources:
            lines.append(s.ljust(width) + "".join(self.cell(s, d).ljust(c)
                                                   for d, c in zip(self.dests, cols, strict=True)))
        total, bad = len(self.results), len(self.failures)
        lines.append(f"{total - bad}/{total} probes answered" + ("" if not bad else f", {bad} failed"))
        return "\n".join(line.rstrip() for line in lines)


def run_matrix(sources: Sequence[Endpoint], dests: Sequence[Endpoint], port: int = 80,
               timeout: float = DEFAULT_TIMEOUT, workers: int = 32) -> Matrix:
    """Every source to every destination, TCP and UDP, in parallel threads."""
    jobs = [(s, d, udp) for s in sources for d in dests if d.addr for udp in (False, True)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        results = list(pool.map(
            lambda j: probe(j[0].netns, j[1].addr, port, udp=j[2], timeout=timeout,
                            expect=j[1].label, src=j[0].label, dst=j[1].label),
            jobs))
    return Matrix(sources=tuple(s.label for s in sources), dests=tuple(d.label for d in dests),
                  port=port, results=tuple(results))
