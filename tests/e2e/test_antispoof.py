"""Anti-spoofing end to end (issue 10 item 4): a pod that sends with another pod's source
address reaches nobody; its own address still works.

How "reaches nobody" is seen: the lab's pods answer every UDP datagram on port 80 to its
source address and port. The attacker sends to a target with the victim's address and a
port the victim listens on: had the target received it, its answer would arrive at the
victim. The victim sending the same itself shows the answer does arrive when nothing is
forged. Forged two ways: a transparent socket (what a raw socket can do, no address
needed) and the victim's address added inside the attacker pod. IPv4 here (the lab's
pods are IPv4); IPv6 is covered against the kernel in tests/policy/test_antispoof_mgr.py.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from lab_fixtures import agent_metric, wait_matrix

pytestmark = pytest.mark.slow

LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); print("ready", flush=True)
s.sendto(b"x", (sys.argv[2], 80))  # the victim's own datagram: its answer comes here
while True:
    data, addr = s.recvfrom(200)
    print(data.decode().strip(), flush=True)
"""
SEND = """
import socket, sys
src, dst, sport, transparent = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if transparent:
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: any source address
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, sport)); s.sendto(b"x", (dst, 80))
"""
PODS = {"x/attacker": "node1", "x/near": "node1", "x/far": "node2", "x/target1": "node1", "x/target2": "node2"}
PORT = 5555


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2)
    for ref, node in PODS.items():
        lab.pod_add(node, ref)
    m = wait_matrix(lab)
    assert m.ok, m
    return lab


class Listener:
    """A UDP listener inside a pod (the answers that reached it), which first sends one
    datagram of its own to `target`."""

    def __init__(self, lab, pod: str, target: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.netns_of(pod), sys.executable, "-c",
                                      LISTEN, str(PORT), lab.pod(target).address],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.lines: list[str] = []

    def got(self, needle: str, seconds: float) -> bool:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                self.lines.append(self.proc.stdout.readline().strip())
            if any(needle in line for line in self.lines):
                return True
        return False

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def send(lab, pod: str, src: str, target: str, transparent: bool = True) -> None:
    lab.exec(pod, [sys.executable, "-c", SEND, src, lab.pod(target).address, str(PORT),
                   "1" if transparent else "0"], check=True, capture_output=True)


def spoofed(lab, node: str) -> int:
    out = lab.exec(node, ["nft", "list", "counter", "inet", "tortie-antispoof", "spoofed"],
                   check=True, capture_output=True, text=True).stdout
    return int(out.split("packets")[1].split()[0])


@pytest.mark.parametrize("victim", ["x/near", "x/far"])
@pytest.mark.parametrize("target", ["x/target1", "x/target2"])
def test_forged_source_reaches_nobody(lab, victim, target):
    addr = lab.pod(victim).address
    listener = Listener(lab, victim, target)
    try:
        # The answer path works: the victim's own datagram is answered at its listener.
        assert listener.got(target, 3), listener.lines
        before = spoofed(lab, "node1")
        listener.lines.clear()
        for _ in range(3):
            send(lab, "x/attacker", addr, target)
        assert not listener.got(target, 1.5), f"a forged datagram reached {target}: {listener.lines}"
        assert spoofed(lab, "node1") >= before + 3
        assert (agent_metric(lab, "node1", "tortie_spoofed_packets_total") or 0) >= before + 3
        # The attacker's own address still works, UDP and TCP.
        assert lab.probe("x/attacker", target, 80, udp=True).ok
        assert lab.probe("x/attacker", target, 80).ok
    finally:
        listener.close()


def test_address_added_inside_the_pod_is_refused(lab):
    victim = lab.pod("x/far").address
    listener = Listener(lab, "x/far", "x/target2")
    lab.exec("x/attacker", ["ip", "addr", "add", f"{victim}/32", "dev", "eth0"], check=True)
    try:
        assert listener.got("x/target2", 3), listener.lines
        listener.lines.clear()
        for _ in range(3):
            send(lab, "x/attacker", victim, "x/target2", transparent=False)
        assert not listener.got("x/target2", 1.5), listener.lines
        assert lab.probe("x/attacker", "x/target2", 80, udp=True).ok
    finally:
        lab.exec("x/attacker", ["ip", "addr", "del", f"{victim}/32", "dev", "eth0"], check=True)
        listener.close()
