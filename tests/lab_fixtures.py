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
import json
import os
import re
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


# --- NetworkPolicy end to end (a module's `lab` fixture is the lab the policies go to) -----

CONVERGE = 2.5  # seconds for a datastore change to reach every node's ruleset
PROBE = 0.5  # seconds a probe waits for its answer


def netpol(ns: str, name: str, **spec) -> dict:
    spec.setdefault("podSelector", {})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def eventually(fn, want, seconds: float = CONVERGE) -> bool:
    """Whether fn() returns want within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while True:
        if fn() == want:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture
def policies(lab):
    """apply(policy...) with tortiectl; every policy applied is deleted after the test."""
    made: list[tuple[str, str]] = []

    def apply(*docs: dict) -> None:
        for d in docs:
            lab.ctl("apply", "-f", "-", input=json.dumps(d))
            made.append((d["metadata"]["namespace"], d["metadata"]["name"]))

    yield apply
    for ns, name in made:
        lab.ctl("delete", "networkpolicy", name, "-n", ns, "--ignore-not-found")
    # Back to "allow everything" before the next test starts.
    assert eventually(lambda: lab.matrix(timeout=PROBE).ok, True, 5), "policies deleted but traffic still blocked"


def agent_metric(lab: Lab, node: str, name: str, **labels: str) -> float | None:
    """One sample of a node's agent's /metrics (None when it has no such sample)."""
    body = lab.http_get(node, 9091, "/metrics")[1]
    want = ",".join(f'{k}="{re.escape(v)}"' for k, v in labels.items())
    m = re.search(rf"^{name}" + (rf"\{{{want}\}}" if want else "") + r" (\S+)", body, re.M)
    return float(m.group(1)) if m else None
