"""Waking ExaBGP's reactor: it sleeps between turns unless something it polls is ready.

ExaBGP 5.0's reactor polls the peers' sockets and its API processes' pipes, and otherwise
sleeps `exabgp.reactor.speed / 100` seconds a turn. Tortie runs it with a long sleep (see
`bgp.config.REACTOR_SPEED`), so an idle speaker costs next to nothing; what the reactor
does NOT poll is woken through the `wake` API process (`bgp.api_relay`):

- work it still has queued: the API applies 50 steps of queued commands a turn (one per
  prefix), so a batch of announcements needs many turns -> busy while commands are in flight;
- its listening socket and a connect in progress: sessions being set up -> busy for
  `SETTLE` seconds after a session went down or peers changed, while one is not up;
- signals (SIGUSR1 reload, SIGTERM stop): a signal does not cut its sleep short -> one wake.

Busy means a wake every `api_relay.TICK` (the reactor's turn as it used to be); timers
(keepalives, hold times, connect retries) run on whole seconds and need nothing.
"""

from __future__ import annotations

import asyncio
import time

from tortie.log import get_logger

log = get_logger("bgp")

SETTLE = 10.0  # seconds of wakes after a session went down or the peers changed


class Waker:
    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self._inflight = 0  # command batches waiting for their acks
        self._settle_until = 0.0  # monotonic
        self._settle_timer: asyncio.TimerHandle | None = None
        self._busy = False  # what the wake process was told

    @property
    def busy(self) -> bool:
        return self._inflight > 0 or time.monotonic() < self._settle_until

    def attach(self, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        self._busy = not self.busy  # tell the new process where we are
        self._update()

    def detach(self, writer: asyncio.StreamWriter) -> None:
        if self.writer is writer:
            self.writer = None
        writer.close()

    def wake(self) -> None:
        """One turn of the reactor now (after a signal)."""
        self._write(b"w")

    def hold(self) -> None:
        """Commands are in flight until the matching release()."""
        self._inflight += 1
        self._update()

    def release(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            # the last ack left in a turn that queued UPDATEs for the peers: one more turn sends them
            self.wake()
        self._update()

    def settle(self, seconds: float = SETTLE) -> None:
        """Sessions are being set up: keep the reactor turning for `seconds`."""
        now = time.monotonic()
        self._settle_until = max(self._settle_until, now + seconds)
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        # the timer, not a clock comparison, ends the window (a timer may fire a hair early)
        self._settle_timer = asyncio.get_running_loop().call_later(self._settle_until - now, self.settled)
        self._update()

    def settled(self) -> None:
        """Every session is up (or the window is over): no more wakes for them."""
        self._settle_until = 0.0
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        self._update()

    def close(self) -> None:
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _update(self) -> None:
        busy = self.busy
        if busy != self._busy:
            self._busy = busy
            self._write(b"b" if busy else b"i")

    def _write(self, what: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            return
        try:
            self.writer.write(what)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("exabgp wake not sent", error=str(exc))
