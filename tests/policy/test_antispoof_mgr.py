"""AntiSpoofManager against the real kernel, IPv4 and IPv6: a node namespace forwarding
from two pods (host veths tora/torb) to an outside host that reports the source address of
every datagram it receives. Forged sources are sent the way a pod would, with
IP_TRANSPARENT (any source, no address needed on the interface)."""

import subprocess
import sys
import time

import pytest
from nfthelpers import counter, handles, list_table

from tortie.policy.antispoof_mgr import FAMILY, TABLE, AntiSpoofManager
from tortie.routing.messages import RouteDelta
from tortie.routing.model import Route, route_key

RECV = """
import select, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 9)); print("ready", flush=True)
while True:
    data, addr = s.recvfrom(100)
    print(addr[0].removeprefix("::ffff:"), data.decode(), flush=True)
"""
SEND = """
import socket, sys
src, dst, tag = sys.argv[1:4]
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
# IP(V6)_TRANSPARENT: bind and send from any source address (a raw socket's power)
s.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.SOL_IP, 75 if v6 else 19, 1)
s.bind((src, 0)); s.sendto(tag.encode(), (dst, 9))
"""
A4, B4, EXT4 = "10.65.1.2", "10.65.2.2", "192.0.2.2"
A6, B6, EXT6 = "fd00:1::2", "fd00:2::2", "fd00:99::2"


@pytest.fixture
def topo(netns):
    node, a, b, ext = netns.new("node"), netns.new("pa"), netns.new("pb"), netns.new("ext")
    sh = lambda *args: subprocess.run(["ip", *args], check=True)  # noqa: E731
    for ns, host_if, n4, n6 in ((a, "tora", "10.65.1", "fd00:1:"), (b, "torb", "10.65.2", "fd00:2:"),
                                (ext, "n-ext", "192.0.2", "fd00:99:")):
        sh("-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("-n", node, "addr", "add", f"{n4}.1/24", "dev", host_if)
        sh("-n", node, "addr", "add", f"{n6}:1/64", "dev", host_if, "nodad")
        sh("-n", ns, "addr", "add", f"{n4}.2/24", "dev", "eth0")
        sh("-n", ns, "addr", "add", f"{n6}:2/64", "dev", "eth0", "nodad")
        sh("-n", node, "link", "set", host_if, "up")
        sh("-n", ns, "link", "set", "eth0", "up")
        sh("-n", ns, "route", "add", "default", "via", f"{n4}.1")
        sh("-n", ns, "-6", "route", "add", "default", "via", f"{n6}:1")
    netns.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    recv = subprocess.Popen(["ip", "netns", "exec", ext, sys.executable, "-c", RECV],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        yield node, a, b, recv
    finally:
        recv.kill()
        recv.wait()


class Probe:
    def __init__(self, netns, a, recv):
        self.netns, self._a, self.recv, self.n = netns, a, recv, 0

    def warm_up(self, b) -> None:
        """Each pod's own traffic first, until it arrives: neighbour discovery (pods, node,
        outside host) is done before a lost datagram means anything."""
        for pod, srcs in ((self._a, (A4, A6)), (b, (B4, B6))):
            for src in srcs:
                assert any(self.arrives(pod, src) for _ in range(5)), src

    def arrives(self, pod: str, src: str) -> bool:
        """Whether a datagram from `pod` with source `src` reaches the outside host with
        that source (a marker datagram after it shows everything before has arrived)."""
        self.n += 1
        tag = f"t{self.n}"
        dst = EXT6 if ":" in src else EXT4
        r = self.netns.run(pod, sys.executable, "-c", SEND, src, dst, tag, check=False)
        assert r.returncode == 0, r.stderr
        own = A6 if ":" in src else A4
        self.netns.run(self._a, sys.executable, "-c", SEND, own, dst, f"{tag}-end")
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            line = self.recv.stdout.readline().split()
            seen.append(tuple(line))
            if line and line[1] == f"{tag}-end":
                return (src, tag) in seen
        raise AssertionError(f"the marker from pod a never arrived: {seen}")


def routes(ifname, *ips):
    return tuple(Route(f"{ip}/{128 if ':' in ip else 32}", dev=ifname) for ip in ips)


def test_only_a_pods_own_sources_pass_before_anything_else(netns, topo):
    node, a, b, recv = topo
    probe = Probe(netns, a, recv)
    probe.warm_up(b)
    # Without the manager, forging works (the test can tell).
    assert probe.arrives(b, A4) and probe.arrives(b, A6)

    mgr = AntiSpoofManager(netns=node)
    mgr.on_update(RouteDelta("workloads", routes("tora", A4, A6)))
    mgr.on_update(RouteDelta("bgp", routes("torb", B4, B6)))  # not a pod route: ignored
    mgr.apply()
    assert list_table(node, FAMILY, TABLE) is not None
    for src in (A4, A6):
        assert probe.arrives(a, src), src
    # b is not known (yet): nothing it sends passes, not even its own address (fail closed).
    assert not probe.arrives(b, B4) and not probe.arrives(b, B6)

    mgr.on_update(RouteDelta("workloads", routes("torb", B4, B6)))
    mgr.apply()
    before = handles(node, FAMILY, TABLE)
    dropped = counter(node, FAMILY, TABLE, "spoofed")[0]
    assert dropped >= 2
    for pod, own, other, nobody in ((a, A4, B4, "10.65.9.9"), (b, B4, A4, "10.65.9.9"),
                                    (a, A6, B6, "fd00:9::9"), (b, B6, A6, "fd00:9::9")):
        assert probe.arrives(pod, own), own
        assert not probe.arrives(pod, other), (pod, other)  # another pod's address
        assert not probe.arrives(pod, nobody), (pod, nobody)  # an address added by hand
    assert counter(node, FAMILY, TABLE, "spoofed")[0] == dropped + 8
    assert mgr.read_dropped() == counter(node, FAMILY, TABLE, "spoofed")  # what the agent exports

    # A pod gone: its addresses no longer pass on its old interface; nothing else rewritten.
    mgr.on_update(RouteDelta("workloads", removed=(route_key(f"{B4}/32"), route_key(f"{B6}/128"))))
    mgr.apply()
    assert not probe.arrives(b, B4) and not probe.arrives(b, B6)
    assert probe.arrives(a, A4)
    assert handles(node, FAMILY, TABLE) == before  # element changes only: the counter lives on
    assert counter(node, FAMILY, TABLE, "spoofed")[0] >= dropped + 10


def test_hand_edit_is_repaired_and_restart_adopts(netns, topo):
    node, a, b, recv = topo
    probe = Probe(netns, a, recv)
    probe.warm_up(b)
    mgr = AntiSpoofManager(netns=node)
    mgr.on_update(RouteDelta("workloads", routes("tora", A4)))
    mgr.apply()
    subprocess.run(["ip", "netns", "exec", node, "nft", "flush", "chain", FAMILY, TABLE, "prerouting"], check=True)
    mgr.resync()
    mgr.apply()
    assert not probe.arrives(b, A4)
    # A new agent with the same desired state writes nothing: the table is adopted.
    again = AntiSpoofManager(netns=node)
    again.on_update(RouteDelta("workloads", routes("tora", A4)))
    again.apply()
    assert again.transactions == 0
