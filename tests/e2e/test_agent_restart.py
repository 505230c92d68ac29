"""Issue 3: `kill -9` of the agent while two pods exchange traffic. The traffic continues,
and the restarted agent adopts the pods' routes: no route of theirs is deleted or
re-added (no route notification for them at all), and a route deleted by hand comes back."""

import signal
import subprocess
import threading
import time

import pytest

from tortie.routing import netlink as nl

pytestmark = pytest.mark.slow


def kernel_routes(netns: str) -> str:
    return subprocess.run(["ip", "-n", netns, "-d", "route", "show", "proto", "77"],
                          capture_output=True, text=True, check=True).stdout


class Prober(threading.Thread):
    """Probes dst from src every 50 ms (TCP and UDP alternately) until stopped."""

    def __init__(self, lab, src: str, dst: str) -> None:
        super().__init__(daemon=True)
        self.lab, self.src, self.dst = lab, src, dst
        self.sent = 0
        self.failed: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            udp = self.sent % 2 == 1
            result = self.lab.probe(self.src, self.dst, 80, udp=udp)
            self.sent += 1
            if not result.ok:
                self.failed.append((time.monotonic(), "udp" if udp else "tcp"))
            self.halt.wait(0.05)


def test_kill_9_keeps_traffic_and_route_objects(lab_factory):
    lab = lab_factory(nodes=1, tor="none")
    ip_a = lab.pod_add("node1", "default/ka")
    ip_b = lab.pod_add("node1", "default/kb")
    node_ns = lab.node("node1").netns
    assert lab.probe("default/ka", "default/kb", 80).ok
    before = kernel_routes(node_ns)
    assert f"{ip_a} dev" in before and f"{ip_b} dev" in before

    events = nl.NetlinkSocket(node_ns, groups=(nl.RTNLGRP_IPV4_ROUTE,))
    probers = [Prober(lab, "default/ka", "default/kb"), Prober(lab, "default/kb", "default/ka")]
    for p in probers:
        p.start()
    try:
        time.sleep(0.5)
        lab.agent_stop("node1", signal.SIGKILL)
        time.sleep(1.0)  # traffic with no agent at all
        lab.agent_start("node1")  # returns once the restarted agent is ready
        time.sleep(1.5)  # a few reconcile rounds of the new agent
    finally:
        for p in probers:
            p.halt.set()
        for p in probers:
            p.join(10)

    def pod_route_events() -> list[tuple[int, str]]:
        seen: list = []
        for buf in events.recv_nowait():
            nl.parse_routes(buf, {}, None, seen)
        return [(t, r.dst) for t, _proto, r in seen if r.dst in (f"{ip_a}/32", f"{ip_b}/32")]

    pod_routes = pod_route_events()
    assert all(p.sent >= 20 for p in probers), [p.sent for p in probers]
    assert [p.failed for p in probers] == [[], []]
    assert pod_routes == [], "the restarted agent rewrote live pods' routes"
    assert kernel_routes(node_ns) == before

    # Drift: a pod route deleted by hand is back within 2 s.
    subprocess.run(["ip", "-n", node_ns, "route", "del", f"{ip_a}/32"], check=True)
    deadline = time.monotonic() + 2.0
    while f"{ip_a} dev" not in kernel_routes(node_ns):
        assert time.monotonic() < deadline, "pod route not restored within 2 s"
        time.sleep(0.05)
    assert lab.probe("default/kb", "default/ka", 80).ok
    # The same socket sees a deletion and a re-add: its silence above was evidence.
    assert {t for t, dst in pod_route_events() if dst == f"{ip_a}/32"} == {nl.RTM_DELROUTE, nl.RTM_NEWROUTE}
    events.close()
