"""Pytest fixtures for end-to-end tests on a lab, importable from any conftest.py (the
root conftest puts `tests/` on the import path):

    from lab_fixtures import lab_factory, new_lab_name  # noqa: F401

    def test_x(lab_factory):
        lab = lab_factory(nodes=2)              # tor="none"; cni="tortie"
        lab.pod_add("node1", "default/a")
        assert lab.probe("default/a", "default/b", 80).ok

Labs are named uniquely per run. Each is torn down when the session ends (or earlier
by `lab.down()`), also when the test failed half way through building it.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid

import pytest

from tortie.lab.cluster import Lab
from tortie.lab.teardown import teardown

RUN = uuid.uuid4().hex[:6]
_counter = itertools.count(1)


def unique_lab_name(tag: str = "t") -> str:
    """A lab name unique to this run (letters and digits, at most 16)."""
    return f"{tag}{RUN}{next(_counter)}"[:16]


@pytest.fixture(scope="session")
def lab_factory():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    made: list[str] = []

    def make(nodes: int = 1, tor: str = "none", **kw) -> Lab:
        name = kw.pop("name", None) or unique_lab_name()
        made.append(name)
        return Lab.up(name, nodes, tor, **kw)

    try:
        yield make
    finally:
        left = {name: teardown(name) for name in made}
        assert not any(left.values()), f"lab teardown left things behind: {left}"


@pytest.fixture(scope="session")
def new_lab_name():
    """A factory of lab names unique to this run, for tests that drive the CLI themselves."""
    return unique_lab_name


def wait_matrix(lab: Lab, seconds: float = 15.0, port: int = 80):
    """The lab's matrix once every probe answers, or the last one after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        m = lab.matrix(port)
        if m.ok or time.monotonic() > deadline:
            return m
        time.sleep(0.5)
