"""Helpers shared by the kube tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound, TortieError
from tortie.kube.controller import Controller


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll cond until it returns something truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class RunningController:
    """A controller running in a thread; stop() waits for it to end."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.thread = threading.Thread(target=controller.run, name="controller", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.controller.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "controller did not stop"


def namespace_present(store: ResourceStore, name: str) -> bool:
    """Is the Namespace in the datastore? False too while etcd does not answer."""
    try:
        store.get("Namespace", name)
        return True
    except NotFound:
        return False
    except (TortieError, ValueError):  # ValueError: the etcd client's "failed node" window
        return False
