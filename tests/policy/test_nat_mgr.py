"""natOutgoing against the real kernel: three namespaces (pod, node, outside host)."""

import subprocess
import sys
import time

import pytest

from tortie.policy import nftables
from tortie.policy.nat_mgr import TABLE, NatManager

PEER_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(8); print("ready", flush=True)
while True:
    c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
"""


@pytest.fixture
def topo(netns):
    pod, node, ext = netns.new("pod"), netns.new("node"), netns.new("ext")
    sh = lambda *a: subprocess.run(["ip", *a], check=True)  # noqa: E731
    sh("-n", node, "link", "add", "n0", "type", "veth", "peer", "name", "eth0", "netns", pod)
    sh("-n", node, "link", "add", "n1", "type", "veth", "peer", "name", "eth0", "netns", ext)
    for ns, dev, addr in ((pod, "eth0", "10.65.0.5/24"), (node, "n0", "10.65.0.1/24"),
                          (node, "n1", "192.0.2.1/24"), (ext, "eth0", "192.0.2.2/24")):
        sh("-n", ns, "addr", "add", addr, "dev", dev)
        sh("-n", ns, "link", "set", dev, "up")
    sh("-n", pod, "route", "add", "default", "via", "10.65.0.1")
    sh("-n", ext, "route", "add", "10.65.0.0/16", "via", "192.0.2.1")
    netns.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    server = subprocess.Popen(["ip", "netns", "exec", ext, sys.executable, "-c", PEER_SERVER],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    yield pod, node, ext
    server.kill()
    server.wait()


def seen_source(netns, pod) -> str:
    """The source address the outside host sees for a connection from the pod."""
    r = netns.run(pod, sys.executable, "-c",
                  "import socket; s=socket.create_connection(('192.0.2.2', 8080), 2); print(s.recv(64).decode())")
    return r.stdout.strip()


def test_nat_outgoing_masquerades_only_traffic_leaving_the_pools(topo, netns):
    pod, node, _ = topo
    mgr = NatManager(netns=node)
    mgr.on_update(nat_pools=["10.65.0.0/16"], all_pools=["10.65.0.0/16", "10.66.0.0/16"],
                  node_addresses=["192.0.2.1"])
    assert seen_source(netns, pod) == "10.65.0.5"  # nothing written yet
    assert mgr.apply()
    assert seen_source(netns, pod) == "192.0.2.1"
    # Nothing to do on a second apply; pool traffic to another pool is not translated.
    assert not mgr.apply()
    listing = nftables.list_table("ip", TABLE, node)
    assert "daddr != @all-pools" in listing and "masquerade" in listing

    mgr.on_update(nat_pools=[], all_pools=["10.65.0.0/16"], node_addresses=["192.0.2.1"])
    mgr.apply()
    assert nftables.list_table("ip", TABLE, node) is None
    assert seen_source(netns, pod) == "10.65.0.5"


def test_hand_edit_is_noticed_and_restored(topo, netns):
    pod, node, _ = topo
    mgr = NatManager(netns=node)
    mgr.on_update(nat_pools=["10.65.0.0/16"], all_pools=["10.65.0.0/16"], node_addresses=[])
    mgr.apply()
    before = nftables.list_table("ip", TABLE, node)
    assert not mgr.check()
    netns.run(node, "nft", "flush", "chain", "ip", TABLE, "postrouting")
    assert mgr.check()
    mgr.apply()
    assert nftables.list_table("ip", TABLE, node) == before
    assert seen_source(netns, pod) == "192.0.2.1"


def test_monitor_socket_sees_ruleset_changes(netns):
    ns = netns.new("mon")
    # The socket must be made inside the namespace it watches.
    code = (
        "import select; from tortie.policy.nftables import open_monitor_socket; s = open_monitor_socket();"
        "print('ready', flush=True); r, _, _ = select.select([s], [], [], 5); print('event' if r else 'none')"
    )
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    netns.run(ns, "nft", "add", "table", "ip", "someone-else")
    assert p.stdout.readline().strip() == "event"
    p.wait(5)
