"""Fixtures for the controller tests: the fake Kubernetes API server, an official
client pointed at it, and a controller running in a thread (stopped at teardown)."""

from __future__ import annotations

import pytest
from doubles.apiserver_fake import FakeAPIServer
from kubehelpers import RunningController
from kubernetes import client as k8s

from tortie.kube.controller import KINDS, Controller, ControllerConfig


@pytest.fixture
def fake_api():
    with FakeAPIServer() as api:
        yield api


@pytest.fixture
def kube_client(fake_api) -> k8s.ApiClient:
    api = k8s.ApiClient(k8s.Configuration(host=fake_api.url))
    yield api
    api.close()


@pytest.fixture
def run_controller(etcd, etcd_config, fake_api):
    """Start a controller against this test's etcd prefix and the fake API server."""
    running: list[RunningController] = []

    def start(wait_synced: bool = True, **overrides) -> Controller:
        kw = dict(k8s_api=fake_api.url, gc_interval=0.3, gc_grace=1.0, resync_interval=3600, retry_interval=0.2,
                  watch_timeout=30)
        kw.update(overrides)
        config = ControllerConfig(etcd=etcd_config, **kw)
        watches = fake_api.watch_requests
        rc = RunningController(Controller(config, etcd=etcd))
        running.append(rc)
        if wait_synced:
            assert rc.controller.synced.wait(15), "controller never got in sync"
            # Every reflector's first watch is open, so a test that cuts them cuts them all.
            assert fake_api.wait_for_watches(watches + len(KINDS))
        return rc.controller

    yield start
    for rc in running:
        rc.stop()
