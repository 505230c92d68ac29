"""FilterManager against the real kernel: a node namespace forwarding between two pods
(each behind its own host veth) and an outside host; real TCP connections decide."""

import subprocess
import sys

import pytest

from tortie.datastore import resources as res
from tortie.errors import DataplaneError
from tortie.policy import netpol, nftables
from tortie.policy.filter_mgr import FilterManager

NODE = "n1"
SERVER = """
import selectors, socket
sel = selectors.DefaultSelector()
for port in (80, 81):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept(); c.sendall(b"hi"); c.close()
"""
CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.5); print(s.recv(8).decode())
except OSError:
    print("fail")
"""

A_IP, B_IP, EXT_IP = "10.65.1.2", "10.65.2.2", "192.0.2.2"


@pytest.fixture
def topo(netns):
    """node with host veths tora/torb to pods a/b and n-ext to an outside host; servers on 80/81."""
    node, a, b, ext = netns.new("node"), netns.new("pa"), netns.new("pb"), netns.new("ext")
    sh = lambda *args: subprocess.run(["ip", *args], check=True)  # noqa: E731
    servers = []
    for ns, host_if, net in ((a, "tora", "10.65.1"), (b, "torb", "10.65.2"), (ext, "n-ext", "192.0.2")):
        sh("-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("-n", node, "addr", "add", f"{net}.1/24", "dev", host_if)
        sh("-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
        sh("-n", node, "link", "set", host_if, "up")
        sh("-n", ns, "link", "set", "eth0", "up")
        sh("-n", ns, "route", "add", "default", "via", f"{net}.1")
        servers.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER],
                                        stdout=subprocess.PIPE, text=True))
    netns.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    try:
        for s in servers:
            assert s.stdout.readline().strip() == "ready"
        yield node, a, b, ext
    finally:
        for s in servers:
            s.kill()
            s.wait()


def can(netns, src, ip, port=80) -> bool:
    return netns.run(src, sys.executable, "-c", CONNECT, ip, str(port)).stdout.strip() == "hi"


def wep(name, ip, iface, node=NODE, **labels):
    return res.WorkloadEndpoint.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"node": node, "interfaceName": iface, "ipNetworks": [f"{ip}/32"]}})


def pol(name, **spec):
    spec.setdefault("podSelector", {})
    return res.NetworkPolicy.from_resource({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"}, "spec": spec})


WEPS = [wep("a", A_IP, "tora", app="a"), wep("b", B_IP, "torb", app="b")]


def update(mgr, *policies, weps=WEPS):
    mgr.on_update(netpol.compute(NODE, weps, policies, {}))


def test_ingress_isolation_allow_rule_and_removal(topo, netns):
    node, a, b, ext = topo
    mgr = FilterManager(netns=node)
    update(mgr)
    mgr.apply()
    assert nftables.list_table("inet", netpol.TABLE, node) is None  # nothing isolated: no table
    assert can(netns, b, A_IP) and can(netns, ext, A_IP)

    update(mgr, pol("deny-a", podSelector={"matchLabels": {"app": "a"}}))
    assert mgr.apply()
    assert not can(netns, b, A_IP) and not can(netns, ext, A_IP)
    assert can(netns, node, A_IP)  # the node itself (kubelet probes) stays allowed
    assert can(netns, a, B_IP) and can(netns, ext, B_IP)  # b is not selected; a's egress is open

    update(mgr, pol("deny-a", podSelector={"matchLabels": {"app": "a"}}),
           pol("allow-b", podSelector={"matchLabels": {"app": "a"}},
               ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 81}]}]))
    mgr.apply()
    assert can(netns, b, A_IP, 81) and not can(netns, b, A_IP, 80)
    assert not can(netns, ext, A_IP, 81)

    update(mgr)
    mgr.apply()
    assert nftables.list_table("inet", netpol.TABLE, node) is None
    assert can(netns, b, A_IP) and can(netns, ext, A_IP)


def test_egress_ip_block_between_local_pods_and_out(topo, netns):
    node, a, b, _ext = topo
    mgr = FilterManager(netns=node)
    update(mgr, pol("a-out", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
                    egress=[{"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]}]))
    mgr.apply()
    assert can(netns, a, EXT_IP)
    assert not can(netns, a, B_IP)  # not in the block
    assert not can(netns, a, "10.65.1.1")  # the node's own address is egress too
    assert can(netns, b, A_IP)  # ingress to a is open; its replies are established traffic


def test_both_ends_must_allow_between_local_pods(topo, netns):
    node, _a, b, _ = topo
    mgr = FilterManager(netns=node)
    allow_b_out = pol("b-out", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
                      egress=[{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}]}])
    deny_a_in = pol("a-in", podSelector={"matchLabels": {"app": "a"}})
    update(mgr, allow_b_out, deny_a_in)
    mgr.apply()
    assert not can(netns, b, A_IP)  # b's egress allows it, a's ingress does not
    update(mgr, allow_b_out, pol("a-in", podSelector={"matchLabels": {"app": "a"}},
                                 ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    mgr.apply()
    assert can(netns, b, A_IP)


def test_apply_writes_only_on_change_and_restores_hand_edits(topo, netns):
    node, _a, b, _ = topo
    mgr = FilterManager(netns=node)
    update(mgr, pol("deny"))
    assert mgr.apply()
    written = nftables.list_table("inet", netpol.TABLE, node)
    handle = netns.run(node, "nft", "-a", "list", "table", "inet", netpol.TABLE).stdout
    update(mgr, pol("deny"))  # the same desired state
    assert not mgr.apply()
    assert not mgr.check()
    assert netns.run(node, "nft", "-a", "list", "table", "inet", netpol.TABLE).stdout == handle  # untouched

    netns.run(node, "nft", "flush", "chain", "inet", netpol.TABLE, "forward-ingress")
    assert can(netns, b, A_IP)  # the hand edit opened the pod
    assert mgr.check()
    assert mgr.apply()
    assert nftables.list_table("inet", netpol.TABLE, node) == written
    assert not can(netns, b, A_IP)

    netns.run(node, "nft", "delete", "table", "inet", netpol.TABLE)
    assert mgr.check() and mgr.apply()
    assert nftables.list_table("inet", netpol.TABLE, node) == written


def test_a_rejected_ruleset_leaves_the_old_table(topo, netns):
    node, _, b, _ = topo
    mgr = FilterManager(netns=node)
    update(mgr, pol("deny"))
    mgr.apply()
    before = nftables.list_table("inet", netpol.TABLE, node)
    mgr.body = "  chain broken { nonsense }\n"  # the delete would pass, the new body not
    mgr.dirty = True
    with pytest.raises(DataplaneError, match="nft rejected"):
        mgr.apply()
    assert nftables.list_table("inet", netpol.TABLE, node) == before  # one transaction: all or nothing
    assert not can(netns, b, A_IP)
