"""NetworkPolicy named ports end to end (issue 10), after the upstream e2e suite's cases
(kubernetes test/e2e/network/netpol/network_policy.go): "should allow ingress access on
one named port", "... from namespace on one named port", "should allow egress access on
one named port". Policies applied with tortiectl, judged by real TCP probes.

One 3-node lab for the file. As upstream, every pod serves 80 and 81 and declares them as
the container ports `serve-80-tcp` and `serve-81-tcp` (`tortie-lab pod add --port`), in
namespaces x, y and z, pods labelled pod=a|b; plus x/swap, whose `serve-80-tcp` is its
port 81 (and `serve-81-tcp` its 80): a name resolves to each pod's own number.
"""

from __future__ import annotations

import time

import pytest
from lab_fixtures import PROBE, netpol, wait_matrix

pytestmark = pytest.mark.slow

PORTS = [{"name": "serve-80-tcp", "port": 80}, {"name": "serve-81-tcp", "port": 81}]
SWAPPED = [{"name": "serve-80-tcp", "port": 81}, {"name": "serve-81-tcp", "port": 80}]
PODS = {"x/a": "node1", "x/b": "node2", "y/a": "node3", "y/b": "node1", "z/a": "node2", "x/swap": "node3"}


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=3)
    for ref, node in PODS.items():
        name = ref.split("/")[1]
        lab.pod_add(node, ref, labels={"pod": name}, ports=SWAPPED if name == "swap" else PORTS)
    assert lab.wep("x/a")["spec"]["ports"] == [{"name": "serve-80-tcp", "protocol": "TCP", "port": 80},
                                               {"name": "serve-81-tcp", "protocol": "TCP", "port": 81}]
    m = wait_matrix(lab)
    assert m.ok, m
    return lab


def tcp(lab, port: int) -> dict[tuple[str, str], bool]:
    """Every pod to every other pod on `port`, TCP: (src, dst) -> answered."""
    m = lab.matrix(port, nodes=False, timeout=PROBE)
    return {(r.src, r.dst): r.ok for r in m.results if r.proto == "tcp" and r.src != r.dst}


def expect(allowed) -> dict[tuple[str, str], bool]:
    """The same pairs, each as allowed(src, dst) says."""
    return {(s, d): bool(allowed(s, d)) for s in PODS for d in PODS if s != d}


def matches(lab, port: int, want: dict, seconds: float = 6.0) -> bool:
    """Whether the probes on `port` come to say `want` within `seconds`; the difference
    is printed when they do not."""
    deadline = time.monotonic() + seconds
    while True:
        got = tcp(lab, port)
        if got == want:
            return True
        if time.monotonic() > deadline:
            print(f"port {port}: differs at", {k: v for k, v in got.items() if want.get(k) != v})
            return False
        time.sleep(0.3)


def ns(ref: str) -> str:
    return ref.split("/")[0]


def test_ingress_on_one_named_port(lab, policies):
    """Every pod of x admits only its `serve-81-tcp`: 81 for all, 80 for x/swap."""
    policies(netpol("x", "allow-all", ingress=[{"ports": [{"port": "serve-81-tcp"}]}]))
    assert matches(lab, 81, expect(lambda s, d: d != "x/swap"))
    assert matches(lab, 80, expect(lambda s, d: ns(d) != "x" or d == "x/swap"))


def test_ingress_from_a_namespace_on_one_named_port(lab, policies):
    policies(netpol("x", "allow-client-a-via-ns-selector-80", podSelector={"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                              "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]))
    assert matches(lab, 80, expect(lambda s, d: d != "x/a" or ns(s) == "y"))
    assert matches(lab, 81, expect(lambda s, d: d != "x/a"))


def test_egress_on_one_named_port(lab, policies):
    """x's pods may open connections to any pod's `serve-80-tcp` only: 80, but 81 to x/swap."""
    policies(netpol("x", "allow-egress", policyTypes=["Egress"], egress=[{"ports": [{"port": "serve-80-tcp"}]}]))
    assert matches(lab, 80, expect(lambda s, d: ns(s) != "x" or d != "x/swap"))
    assert matches(lab, 81, expect(lambda s, d: ns(s) != "x" or d == "x/swap"))


def test_a_named_port_no_pod_declares_allows_nothing(lab, policies):
    policies(netpol("z", "nobody-serves-it", ingress=[{"ports": [{"port": "serve-90-tcp"}]}]))
    assert matches(lab, 80, expect(lambda s, d: ns(d) != "z"))
