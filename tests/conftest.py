"""Shared fixtures: one real etcd per test session, a fresh key prefix per test,
and network namespaces that are always removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.lab.etcd_server import EtcdServer

# The test doubles (`tests/doubles/`) and test-only programs import as `doubles.*` from any folder.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

RUN_ID = uuid.uuid4().hex[:6]


@pytest.fixture(autouse=True)
def _default_logging():
    """Every test starts with the default logging: an in-process tortiectl (warnings only,
    to its `err`) must not leave that behind for the next test."""
    from tortie import log as tlog

    tlog.configure()
    yield


@pytest.fixture(scope="session")
def etcd_server():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def etcd_prefix(request) -> str:
    """A key prefix of this test's own, so tests share one etcd without seeing each other."""
    return f"/t-{RUN_ID}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def etcd_config(etcd_server, etcd_prefix) -> EtcdConfig:
    return EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix)


@pytest.fixture
def etcd(etcd_config):
    client = EtcdClient(etcd_config)
    yield client
    try:
        client.delete_prefix(etcd_config.prefix)
    finally:
        client.close()


class Netns:
    """Creates uniquely named network namespaces and deletes them all at teardown."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def new(self, tag: str = "ns") -> str:
        name = f"tt-{RUN_ID}-{tag}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        self.names.append(name)
        return name

    def run(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", name, *cmd], check=check, capture_output=True, text=True)

    def cleanup(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names.clear()


@pytest.fixture
def netns():
    ns = Netns()
    try:
        yield ns
    finally:
        ns.cleanup()


@pytest.fixture(scope="module")
def netns_module():
    """Like `netns`, shared by a module's tests (a topology built once)."""
    ns = Netns()
    try:
        yield ns
    finally:
        ns.cleanup()


_PYTEST_PID = os.getpid()


def _terminated(signum, frame) -> None:
    if os.getpid() != _PYTEST_PID:  # a forked child (pyroute2 forks per namespace): just go
        os._exit(128 + signum)
    raise KeyboardInterrupt  # pytest then tears down: labs, namespaces, etcd


def pytest_configure(config):
    """A run stopped by SIGTERM (a CI or `timeout` deadline) cleans up as Ctrl-C does: by
    default TERM ends pytest at once and leaves the session's etcd and labs behind."""
    signal.signal(signal.SIGTERM, _terminated)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces")
        for item in items:
            if {"netns", "netns_module"} & set(getattr(item, "fixturenames", ())):
                item.add_marker(skip)
