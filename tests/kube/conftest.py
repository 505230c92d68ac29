"""Fixtures for the controller tests: the fake Kubernetes API server, an official
client pointed at it, and a controller running in a thread (stopped at teardown)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from kubernetes import client as k8s

from tortie.kube.apiserver_fake import FakeAPIServer
from tortie.kube.controller import Controller, ControllerConfig


@pytest.fixture
def fake_api():
    with FakeAPIServer() as api:
        yield api


@pytest.fixture
def kube_client(fake_api) -> k8s.ApiClient:
    api = k8s.ApiClient(k8s.Configuration(host=fake_api.url))
    yield api
    api.close()


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
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.thread = threading.Thread(target=controller.run, name="controller", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.controller.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "controller did not stop"


@pytest.fixture
def run_controller(etcd, etcd_config, fake_api):
    """Start a controller against this test's etcd prefix and the fake API server."""
    running: list[RunningController] = []

    def start(wait_synced: bool = True, **overrides) -> Controller:
        kw = dict(gc_interval=0.3, gc_grace=1.0, resync_interval=3600, retry_interval=0.2, watch_timeout=30)
        kw.update(overrides)
        config = ControllerConfig(etcd=etcd_config, k8s_api=fake_api.url, **kw)
        rc = RunningController(Controller(config, etcd=etcd))
        running.append(rc)
        if wait_synced:
            assert rc.controller.synced.wait(15), "controller never got in sync"
        return rc.controller

    yield start
    for rc in running:
        rc.stop()
