"""The dataplane driver: one thread that owns every write to the kernel, nftables and the
BGP exports.

The agent's event loop never writes the dataplane; it hands the calculation's messages to
`send()` and goes back to serving CNI requests and watching etcd. The driver's thread
wakes on those messages, on its monitors (netlink route/link/rule notifications, nftables
generation changes) and on timers, and then:

  1. hands every queued message to every manager (`on_update`; each keeps the types it owns),
  2. lets each dirty manager `apply()` in a fixed order: routes before rules (a rule never
     points at an egress table not yet filled), NAT and filters, BGP last (a block is
     announced only once its blackhole exists),
  3. calls the `done` callbacks of the messages it just applied (a CNI ADD waits for its
     pod's route this way).

A manager that fails is reported (`on_status(name, error)`) and retried after a delay;
the others go on. A full resync (every manager re-reads its part of the dataplane) runs on
start, on `request_resync()`, and on a slow timer.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tortie.dataplane import Manager
from tortie.log import get_logger

log = get_logger("dataplane")

Done = Callable[[dict[str, str]], None]


@dataclass
class ManagerState:
    """What the driver knows of one manager, for health and metrics."""

    name: str
    error: str | None = None
    retry_at: float | None = None
    applies: int = 0
    failures: int = 0
    last_ok: float | None = None
    last_seconds: float = 0.0


@dataclass
class _Batch:
    msgs: list = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    resync: bool = False


class DataplaneDriver:
    def __init__(self, managers: Sequence[Manager], *, retry_delay: float = 1.0,
                 resync_interval: float | None = None,
                 on_status: Callable[[str, str | None], None] | None = None,
                 on_applied: Callable[[str, float], None] | None = None,
                 on_round: Callable[[bool], None] | None = None) -> None:
        self.managers = list(managers)
        self.retry_delay = retry_delay
        self.resync_interval = resync_interval
        self.on_status = on_status  # (manager, error or None), called from the driver thread
        self.on_applied = on_applied  # (manager, seconds), for the apply-duration histogram
        self.on_round = on_round  # (every manager healthy?), after each round
        self.states = {m.name: ManagerState(m.name) for m in self.managers}
        self._queue: deque[tuple[list, Done | None]] = deque()
        self._resync = True  # the first round adopts what the kernel holds
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sources: list[Callable[[], None]] = []
        self._next_resync = None
        self.rounds = 0

    # -- from any thread ---------------------------------------------------------------------
    def send(self, msgs: Iterable, done: Done | None = None) -> None:
        """Queue messages (and a callback for when they are applied); wakes the thread."""
        self._queue.append((list(msgs), done))
        self._wake()

    def request_resync(self) -> None:
        self._resync = True
        self._wake()

    def watch(self, source, on_readable: Callable[[], None]) -> None:
        """Call `on_readable()` on the driver thread whenever `source` (a fileno()) is readable.
        Call before `start()`."""
        self._sel.register(source.fileno(), selectors.EVENT_READ, on_readable)
        self._sources.append(on_readable)  # called at the start of every round

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tortie-dataplane", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def healthy(self) -> bool:
        return all(s.error is None for s in self.states.values())

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the thread will wake anyway) or closed (stopping)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        if self.resync_interval:
            self._next_resync = time.monotonic() + self.resync_interval
        while not self._stopping:
            for key, _ in self._sel.select(self._timeout()):
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                # a readable monitor is drained by the round, with all the others
            if self._stopping:
                break
            try:
                self.round()
            except Exception as exc:  # a bug in one round must not end the dataplane
                log.exception("dataplane round failed", error=str(exc))
                self._resync = True
                time.sleep(self.retry_delay)

    def _timeout(self) -> float | None:
        if self._queue or self._resync:
            return 0
        now = time.monotonic()
        due = [s.retry_at for s in self.states.values() if s.retry_at is not None]
        if self._next_resync is not None:
            due.append(self._next_resync)
        return max(0.0, min(due) - now) if due else None

    def _take(self) -> _Batch:
        batch = _Batch()
        while self._queue:
            msgs, done = self._queue.popleft()
            batch.msgs += msgs
            if done is not None:
                batch.done.append(done)
        now = time.monotonic()
        if self._next_resync is not None and now >= self._next_resync:
            self._resync = True
            self._next_resync = now + self.resync_interval
        batch.resync, self._resync = self._resync, False
        return batch

    def round(self) -> None:
        """One pass: fold queued messages, apply what is dirty (or due for a retry)."""
        # What the monitors have queued first (their reads do not block): a pod's route is
        # applied knowing its veth, which the kernel announced before the route arrived.
        for drain in self._sources:
            try:
                drain()
            except Exception as exc:
                log.exception("monitor failed; resyncing", error=str(exc))
                self._resync = True
        batch = self._take()
        for msg in batch.msgs:
            for m in self.managers:
                m.on_update(msg)
        if batch.resync:
            for m in self.managers:
                m.resync()
        now = time.monotonic()
        for m in self.managers:
            st = self.states[m.name]
            retry_due = st.retry_at is not None and now >= st.retry_at
            if not (m.dirty or retry_due or batch.resync):
                continue
            if st.retry_at is not None and not retry_due and not batch.resync:
                continue  # failing: wait for the retry instead of hammering the kernel
            self._apply(m, st)
        self.rounds += 1
        if self.on_round:
            self.on_round(self.healthy)
        if batch.done:
            errors = {name: s.error for name, s in self.states.items() if s.error}
            for done in batch.done:
                try:
                    done(errors)
                except Exception as exc:
                    log.exception("done callback failed", error=str(exc))

    def _apply(self, m: Manager, st: ManagerState) -> None:
        t0 = time.perf_counter()
        try:
            m.apply()
        except Exception as exc:
            st.failures += 1
            st.retry_at = time.monotonic() + self.retry_delay
            changed = st.error != str(exc)
            st.error = str(exc) or type(exc).__name__
            if changed:
                log.error("dataplane manager failed; retrying", manager=m.name, error=st.error)
                if self.on_status:
                    self.on_status(m.name, st.error)
            return
        finally:
            st.last_seconds = time.perf_counter() - t0
            st.applies += 1
            if self.on_applied:
                self.on_applied(m.name, st.last_seconds)
        st.last_ok = time.monotonic()
        st.retry_at = None
        if st.error is not None:
            log.info("dataplane manager recovered", manager=m.name)
            st.error = None
            if self.on_status:
                self.on_status(m.name, None)
