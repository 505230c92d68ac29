"""natOutgoing against the real kernel: three namespaces (pod, node, outside host); the
manager runs in this process (libnftables, its socket opened in the node namespace)."""

import subprocess
import sys

import pytest
from nfthelpers import handles, list_table, nft

from tortie.policy.messages import NatUpdate
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


def nat(mgr, nat_pools, all_pools, node_addresses) -> None:
    mgr.on_update(NatUpdate(frozenset(nat_pools), frozenset(all_pools), frozenset(node_addresses)))


def test_nat_outgoing_masquerades_only_traffic_leaving_the_pools(topo, netns):
    pod, node, _ = topo
    mgr = NatManager(netns=node)
    nat(mgr, ["10.65.0.0/16"], ["10.65.0.0/16", "10.66.0.0/16"], ["192.0.2.1"])
    assert seen_source(netns, pod) == "10.65.0.5"  # nothing written yet
    mgr.apply()
    assert seen_source(netns, pod) == "192.0.2.1"
    # Nothing to do on a second apply; pool traffic to another pool is not translated.
    assert not mgr.dirty
    listing = list_table(node, "ip", TABLE)
    assert "daddr != @all-pools" in listing and "masquerade" in listing
    assert list_table(node, "ip6", TABLE) is None  # no IPv6 pool asks for NAT

    nat(mgr, [], ["10.65.0.0/16"], ["192.0.2.1"])
    mgr.apply()
    assert list_table(node, "ip", TABLE) is None
    assert seen_source(netns, pod) == "10.65.0.5"


def test_pool_and_node_changes_are_element_changes(topo, netns):
    pod, node, _ = topo
    mgr = NatManager(netns=node)
    nat(mgr, ["10.65.0.0/16", "fd00:65::/48"], ["10.65.0.0/16", "fd00:65::/48"], ["192.0.2.9", "fd00::1"])
    mgr.apply()
    before = {fam: handles(node, fam, TABLE) for fam in ("ip", "ip6")}
    # The node's address joins the nodes set: traffic to it is no longer translated.
    nat(mgr, ["10.65.0.0/16", "fd00:65::/48"], ["10.65.0.0/16", "10.66.0.0/16", "fd00:65::/48"],
        ["192.0.2.2", "fd00::1"])
    assert mgr.dirty
    mgr.apply()
    assert seen_source(netns, pod) == "10.65.0.5"
    listing = list_table(node, "ip", TABLE)
    assert "10.66.0.0/16" in listing and "192.0.2.2" in listing and "192.0.2.9" not in listing
    assert {fam: handles(node, fam, TABLE) for fam in ("ip", "ip6")} == before  # no object rewritten
    mgr.resync()  # both families listed, IPv6 and single addresses read back as written
    mgr.apply()
    assert mgr.transactions == 2
    nat(mgr, ["10.65.0.0/16", "fd00:65::/48"], ["10.65.0.0/16", "fd00:65::/48"], ["fd00::1"])
    mgr.apply()
    assert seen_source(netns, pod) == "192.0.2.1"


def test_hand_edit_is_repaired_after_a_resync(topo, netns):
    pod, node, _ = topo
    mgr = NatManager(netns=node)
    nat(mgr, ["10.65.0.0/16"], ["10.65.0.0/16"], [])
    mgr.apply()
    before = list_table(node, "ip", TABLE)
    mgr.resync()
    mgr.apply()
    assert mgr.transactions == 1  # a resync that finds the kernel as we left it writes nothing
    assert nft(node, "flush", "chain", "ip", TABLE, "postrouting").returncode == 0
    assert nft(node, "add", "element", "ip", TABLE, "all-pools", "{ 192.168.0.0/16 }").returncode == 0
    mgr.resync()
    mgr.apply()
    assert list_table(node, "ip", TABLE) == before
    assert seen_source(netns, pod) == "192.0.2.1"


def test_egress_address_translates_the_pools_traffic_and_replies_come_back(topo, netns):
    """The pool's connection leaves as the egress address (not assigned anywhere on the
    node), the outside host's reply to it is un-NATed by conntrack and reaches the pod, even
    with the blackhole the agent keeps for that address; natOutgoing gives way to it."""
    pod, node, ext = topo
    egress = "198.51.100.7"
    netns.run(ext, "ip", "route", "add", f"{egress}/32", "via", "192.0.2.1")
    netns.run(node, "ip", "route", "add", "blackhole", f"{egress}/32")
    mgr = NatManager(netns=node)
    mgr.on_update(NatUpdate(frozenset({"10.65.0.0/16"}), frozenset({"10.65.0.0/16"}), frozenset({"192.0.2.1"}),
                            frozenset({("10.65.0.0/16", egress)})))
    mgr.apply()
    assert seen_source(netns, pod) == egress  # the reply (the address the far end saw) came back
    listing = list_table(node, "ip", TABLE)
    assert f"10.65.0.0/16 : {egress}" in listing, listing
    before = handles(node, "ip", TABLE)
    mgr.resync()  # the map reads back as written: nothing to do
    mgr.apply()
    assert mgr.transactions == 1 and handles(node, "ip", TABLE) == before
    # Another address is one element; without one, natOutgoing masquerades again.
    mgr.on_update(NatUpdate(frozenset({"10.65.0.0/16"}), frozenset({"10.65.0.0/16"}), frozenset({"192.0.2.1"}),
                            frozenset({("10.65.0.0/16", "198.51.100.8")})))
    netns.run(ext, "ip", "route", "add", "198.51.100.8/32", "via", "192.0.2.1")
    mgr.apply()
    assert seen_source(netns, pod) == "198.51.100.8"
    assert handles(node, "ip", TABLE).items() >= {k: v for k, v in before.items() if k[0] == "rule"}.items()
    mgr.on_update(NatUpdate(frozenset({"10.65.0.0/16"}), frozenset({"10.65.0.0/16"}), frozenset({"192.0.2.1"})))
    mgr.apply()
    assert seen_source(netns, pod) == "192.0.2.1"
    # An egress address alone (no natOutgoing pool) keeps the table.
    mgr.on_update(NatUpdate(frozenset(), frozenset({"10.65.0.0/16"}), frozenset({"192.0.2.1"}),
                            frozenset({("10.65.0.0/16", egress)})))
    mgr.apply()
    assert seen_source(netns, pod) == egress
