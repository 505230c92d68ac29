"""The Lab API through the `lab_factory` fixture, as other packages' end-to-end tests use it."""

from __future__ import annotations

import pytest

from tortie.errors import AlreadyExists, NotFound, ValidationError
from tortie.lab import nsutil

pytestmark = pytest.mark.slow


def test_lab_api_on_reference_plugins(lab_factory):
    lab = lab_factory(nodes=2, cni="ptp")
    ip_a = lab.pod_add("node1", "default/a")
    ip_b = lab.pod_add("node2", "default/b")
    assert lab.probe("default/a", "default/b", 80).ok
    assert lab.probe("default/b", "default/a", 81, udp=True).answered_by == "default/a"
    assert lab.probe("node2", ip_a, 80).ok
    assert not lab.probe("default/a", "10.66.9.9", 80, timeout=0.3).ok

    with pytest.raises(AlreadyExists):
        lab.pod_add("node2", "default/a")
    with pytest.raises(NotFound):
        lab.pod_add("node7", "default/x")
    with pytest.raises(ValidationError):
        lab.pod_add("node1", "Bad/Name")
    assert {p["name"] for p in lab.status()["pods"]} == {"default/a", "default/b"}

    lab.pod_del("default/b")
    assert not lab.probe("default/a", ip_b, 80, timeout=0.3).ok
    with pytest.raises(NotFound):
        lab.pod("default/b")
    # The same name can come back, wired afresh.
    lab.pod_add("node1", "default/b")
    m = lab.matrix(80)
    assert m.ok, m.render()
    # sources: 2 nodes, the outside host (through node1) and 2 pods; 2 pods; TCP and UDP
    assert "ext" in m.sources and len(m.results) == (2 + 1 + 2) * 2 * 2

    netns = [p["netns"] for p in lab.status()["pods"]]
    lab.down()
    assert not any(nsutil.netns_exists(n) for n in netns)
    with pytest.raises(NotFound):
        lab.status()
