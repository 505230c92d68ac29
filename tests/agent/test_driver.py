"""The dataplane driver's contract, with small in-test managers (no kernel needed): every
message reaches every manager, dirty managers apply in order, a failing manager is
reported and retried without holding up the others, `done` runs after the apply."""

from __future__ import annotations

import threading
import time

from tortie.agent.driver import DataplaneDriver
from tortie.dataplane import Manager


class Recorder:
    """A manager that records what it was given and applied (a test double)."""

    def __init__(self, name: str, log: list, fail: int = 0) -> None:
        self.name, self.log, self.fail = name, log, fail
        self.seen: list = []
        self.pending: list = []
        self.resyncs = 0

    def on_update(self, msg) -> None:
        self.seen.append(msg)
        if isinstance(msg, tuple) and msg[0] == self.name:
            self.pending.append(msg[1])

    @property
    def dirty(self) -> bool:
        return bool(self.pending) or self.fail > 0

    def resync(self) -> None:
        self.resyncs += 1

    def apply(self) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError(f"{self.name} refused")
        self.log.append((self.name, tuple(self.pending)))
        self.pending.clear()


def wait_for(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


def test_managers_conform_to_the_protocol():
    assert isinstance(Recorder("x", []), Manager)


def test_messages_reach_every_manager_and_apply_in_order_then_done():
    log: list = []
    a, b = Recorder("routes", log), Recorder("bgp", log)
    d = DataplaneDriver([a, b])
    done = threading.Event()
    seen_errors = []
    # queued before the thread starts (the agent queues its first snapshot so)
    d.send([("bgp", 2), ("routes", 1)], done=lambda errs: (seen_errors.append(errs), done.set()))
    d.start()
    try:
        assert done.wait(3)
        assert log == [("routes", (1,)), ("bgp", (2,))]  # manager order, not message order
        assert a.seen == b.seen == [("bgp", 2), ("routes", 1)]
        assert seen_errors == [{}]
        assert a.resyncs == b.resyncs == 1  # the first round resyncs (adoption)
    finally:
        d.stop()


def test_a_failing_manager_is_reported_retried_and_does_not_hold_up_the_others():
    log: list = []
    statuses: list = []
    bad, good = Recorder("nat", log, fail=2), Recorder("bgp", log)
    d = DataplaneDriver([bad, good], retry_delay=0.05, on_status=lambda n, e: statuses.append((n, e)))
    errs: list = []
    d.send([("bgp", 1), ("nat", 9)], done=errs.append)
    d.start()
    try:
        assert wait_for(lambda: errs)
        assert ("bgp", (1,)) in log
        assert errs[0] == {"nat": "nat refused"}
        assert not d.healthy
        assert wait_for(lambda: ("nat", (9,)) in log)  # two failures, then the retry works
        assert d.healthy
        assert statuses == [("nat", "nat refused"), ("nat", None)]
        assert d.states["nat"].failures == 2
    finally:
        d.stop()


def test_resync_timer_and_request():
    log: list = []
    a = Recorder("routes", log)
    d = DataplaneDriver([a], resync_interval=0.05)
    d.start()
    try:
        assert wait_for(lambda: a.resyncs >= 3)
        d.resync_interval = None
        n = a.resyncs
        d.request_resync()
        assert wait_for(lambda: a.resyncs > n)
    finally:
        d.stop()


def test_watched_sources_run_on_the_driver_thread():
    import os

    r, w = os.pipe()
    threads = []

    class Src:
        def fileno(self):
            return r

    def readable():
        os.read(r, 100)
        threads.append(threading.current_thread().name)

    d = DataplaneDriver([])
    d.watch(Src(), readable)
    d.start()
    try:
        os.write(w, b"x")
        assert wait_for(lambda: threads)
        assert threads == ["tortie-dataplane"]
    finally:
        d.stop()
        os.close(r)
        os.close(w)
