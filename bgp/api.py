"""ExaBGP's API stream, as `api_relay.py` hands it over a unix socket: command lines out,
pipelined, one acknowledgement (`done` / `error`) back per line, and JSON messages in
(state changes, OPENs, UPDATEs, NOTIFICATIONs).

The command text: `<target> announce attributes <attrs> nlri P1 P2 ...` and
`<target> withdraw attributes next-hop self nlri ...`, `batch` prefixes a line, where the
target names the sessions (`neighbor A , neighbor B`).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterable
from typing import BinaryIO

from tortie.bgp.wake import Waker
from tortie.errors import DataplaneError
from tortie.log import get_logger

log = get_logger("bgp")


class APIStream:
    """The connection to one ExaBGP's API: `send()` lines and wait for their acks; `parse()`
    every line read (acks are consumed there, messages returned)."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self._acks: deque[asyncio.Future[bool]] = deque()
        self.errors = 0  # commands ExaBGP answered with `error`
        self.trace: BinaryIO | None = None  # TORTIE_BGP_TRACE=1: API events but updates go here
        self.waker: Waker | None = None  # keeps the reactor turning while commands are queued

    @property
    def connected(self) -> bool:
        return self.writer is not None

    def attach(self, writer: asyncio.StreamWriter) -> None:
        """A new connection replaces the old one; commands in flight on it fail."""
        if self.writer is not None:
            self.writer.close()
        self.fail_acks()
        self.writer = writer

    def detach(self, writer: asyncio.StreamWriter) -> None:
        """The connection `writer` ended (if it is still the current one, it is no more)."""
        if self.writer is writer:
            self.writer = None
            self.fail_acks()
        writer.close()

    def close(self) -> None:
        """Drop the connection (ExaBGP exited); commands in flight fail."""
        if self.writer:
            self.writer.close()
            self.writer = None
        self.fail_acks()

    async def send(self, lines: list[str]) -> int:
        """Write command lines (pipelined), wait for every acknowledgement; returns errors."""
        writer = self.writer
        if writer is None:
            raise DataplaneError("ExaBGP's API is not connected")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in lines]
        self._acks.extend(futures)
        if self.waker:
            self.waker.hold()
        try:
            writer.write(("\n".join(lines) + "\n").encode())
            await writer.drain()
            results = await asyncio.gather(*futures)
        finally:
            if self.waker:
                self.waker.release()
        errors = results.count(False)
        if errors:
            self.errors += errors
            log.warning("exabgp refused commands", errors=errors, sample=lines[results.index(False)][:200])
        return errors

    def fail_acks(self) -> None:
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_exception(DataplaneError("ExaBGP's API connection closed"))

    def parse(self, raw: bytes) -> dict | None:
        """One line from ExaBGP: an ack completes the oldest command in flight; a JSON
        message is returned; anything else is None."""
        line = raw.strip()
        if not line:
            return None
        if line in (b"done", b"error"):
            if self._acks:
                fut = self._acks.popleft()
                if not fut.done():
                    fut.set_result(line == b"done")
            return None
        if line == b"shutdown" or not line.startswith(b"{"):
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("unparsable api line", line=line[:200])
            return None
        if self.trace and msg.get("type") != "update":
            self.trace.write(line + b"\n")
            self.trace.flush()
        return msg


def announce_lines(target: str, attrs: str, prefixes: list[str], batch: int) -> list[str]:
    return [f"{target} announce attributes {attrs} nlri {' '.join(c)}" for c in chunks(prefixes, batch)]


def withdraw_lines(target: str, prefixes: list[str], batch: int) -> list[str]:
    return [f"{target} withdraw attributes next-hop self nlri {' '.join(c)}" for c in chunks(prefixes, batch)]


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
