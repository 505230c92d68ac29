"""FilterManager against the real kernel: a node namespace forwarding between two pods
(each behind its own host veth) and an outside host; real TCP connections decide. The
manager runs in this process (libnftables, its socket opened in the node namespace)."""

import subprocess
import sys
import time

import pytest
from nfthelpers import counter, handles, list_table, nft, wire

from tortie.datastore import resources as res
from tortie.errors import DataplaneError
from tortie.policy import netpol
from tortie.policy.filter_mgr import FilterManager, policy_chain
from tortie.policy.messages import EndpointFilterUpdate, PolicyUpdate, filter_messages
from tortie.policy.netpol import Allow, PodFilter, PortRange, ResolvedPolicy
from tortie.policy.nftables import NftMonitor

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
    servers = []
    for ns, host_if, net in ((a, "tora", "10.65.1"), (b, "torb", "10.65.2"), (ext, "n-ext", "192.0.2")):
        wire(node, ns, host_if, net)
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


def wep(name, ip, iface, node=NODE, ports=None, **labels):
    """ports: {name: number} (TCP)."""
    spec = {"node": node, "interfaceName": iface, "ipNetworks": [f"{ip}/32"]}
    if ports:
        spec["ports"] = [{"name": n, "port": port} for n, port in ports.items()]
    return res.WorkloadEndpoint.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": "shop", "labels": labels}, "spec": spec})


def pol(name, **spec):
    spec.setdefault("podSelector", {})
    return res.NetworkPolicy.from_resource({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"}, "spec": spec})


WEPS = [wep("a", A_IP, "tora", app="a"), wep("b", B_IP, "torb", app="b")]


class Fed:
    """A FilterManager fed the way the agent feeds it: whole Filters diffed into messages."""

    def __init__(self, netns: str) -> None:
        self.mgr = FilterManager(netns=netns)
        self.last: netpol.Filter | None = None

    def update(self, *policies, weps=WEPS) -> None:
        new = netpol.compute(NODE, weps, policies, {})
        for msg in filter_messages(self.last, new):
            self.mgr.on_update(msg)
        self.last = new

    def apply(self) -> bool:
        """apply(); whether it wrote a transaction."""
        before = self.mgr.transactions
        self.mgr.apply()
        assert not self.mgr.dirty
        return self.mgr.transactions > before


def table(node):
    return list_table(node, "inet", netpol.TABLE)


def test_ingress_isolation_allow_rule_and_removal(topo, netns):
    node, a, b, ext = topo
    mgr = Fed(node)
    mgr.update()
    mgr.apply()
    assert table(node) is None  # nothing isolated: no table
    assert can(netns, b, A_IP) and can(netns, ext, A_IP)

    mgr.update(pol("deny-a", podSelector={"matchLabels": {"app": "a"}}))
    assert mgr.apply()
    assert not can(netns, b, A_IP) and not can(netns, ext, A_IP)
    assert can(netns, node, A_IP)  # the node itself (kubelet probes) stays allowed
    assert can(netns, a, B_IP) and can(netns, ext, B_IP)  # b is not selected; a's egress is open

    mgr.update(pol("deny-a", podSelector={"matchLabels": {"app": "a"}}),
               pol("allow-b", podSelector={"matchLabels": {"app": "a"}},
                   ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 81}]}]))
    mgr.apply()
    assert can(netns, b, A_IP, 81) and not can(netns, b, A_IP, 80)
    assert not can(netns, ext, A_IP, 81)

    mgr.update()
    mgr.apply()
    assert table(node) is None
    assert can(netns, b, A_IP) and can(netns, ext, A_IP)


def test_egress_ip_block_between_local_pods_and_out(topo, netns):
    node, a, b, _ext = topo
    mgr = Fed(node)
    mgr.update(pol("a-out", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
                   egress=[{"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]}]))
    mgr.apply()
    assert can(netns, a, EXT_IP)
    assert not can(netns, a, B_IP)  # not in the block
    assert not can(netns, a, "10.65.1.1")  # the node's own address is egress too
    assert can(netns, b, A_IP)  # ingress to a is open; its replies are established traffic


def test_both_ends_must_allow_between_local_pods(topo, netns):
    node, _a, b, _ = topo
    mgr = Fed(node)
    allow_b_out = pol("b-out", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
                      egress=[{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}]}])
    deny_a_in = pol("a-in", podSelector={"matchLabels": {"app": "a"}})
    mgr.update(allow_b_out, deny_a_in)
    mgr.apply()
    assert not can(netns, b, A_IP)  # b's egress allows it, a's ingress does not
    mgr.update(allow_b_out, pol("a-in", podSelector={"matchLabels": {"app": "a"}},
                                ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    mgr.apply()
    assert can(netns, b, A_IP)


def test_a_change_rewrites_only_what_changed(topo, netns):
    node, _a, b, _ = topo
    mgr = Fed(node)
    deny = pol("deny", podSelector={"matchLabels": {"app": "a"}})
    mgr.update(deny)
    mgr.apply()
    before = handles(node, "inet", netpol.TABLE)
    mgr.update(deny)  # the same desired state: nothing to do
    assert not mgr.apply()
    mgr.update(deny, pol("allow-b", podSelector={"matchLabels": {"app": "a"}},
                         ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    mgr.apply()
    after = handles(node, "inet", netpol.TABLE)
    assert can(netns, b, A_IP)
    kept = {k for k in before if after.get(k) == before[k]}
    # a's chain was rewritten (flush + its rules); the table, the maps, the base chains,
    # deny's chain and counter are the same kernel objects.
    assert set(before) - kept <= {k for k in before if k[0] == "rule" and k[1] == "pod-in-tora"}
    assert ("table", "", netpol.TABLE) in kept and ("map", "", "ingress-pods") in kept
    assert ("counter", "", policy_chain("shop/deny", "in")) in kept


def test_a_new_peer_is_an_element_of_the_policys_peer_set(topo, netns):
    """b becoming a peer of a's policy (relabelled) writes set elements only: every chain,
    rule and counter keeps its kernel handle, and the traffic is allowed."""
    node, _a, b, _ = topo
    mgr = Fed(node)
    allow = pol("a-from-b", podSelector={"matchLabels": {"app": "a"}},
                ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}])
    extra = wep("c", "10.65.3.2", "torc", node="n2", role="client")  # a remote peer
    mgr.update(allow, weps=[*WEPS, extra])
    mgr.apply()
    assert not can(netns, b, A_IP)
    before = handles(node, "inet", netpol.TABLE)
    relabelled = wep("b", B_IP, "torb", app="b", role="client")
    mgr.update(allow, weps=[WEPS[0], relabelled, extra])
    script = mgr.mgr.table.script()
    assert script.splitlines() == [
        f"add element inet {netpol.TABLE} {policy_chain('shop/a-from-b', 'in')}-0-4p {{ {B_IP} }}"]
    mgr.apply()
    assert handles(node, "inet", netpol.TABLE) == before
    assert can(netns, b, A_IP)
    mgr.update(allow, weps=[*WEPS, extra])  # and back: the element goes
    mgr.apply()
    assert not can(netns, b, A_IP)
    mgr.mgr.resync()  # the listing matches what the manager believes
    assert not mgr.apply()


def test_ingress_named_port_follows_the_pods_own_number(topo, netns):
    """`port: http` to a: whatever number a gives "http"; a renumbering is an element change
    of the policy's named-port set only, and a resync finds the listing as believed."""
    node, _a, b, _ = topo
    mgr = Fed(node)
    named = pol("a-http", podSelector={"matchLabels": {"app": "a"}}, ingress=[{"ports": [{"port": "http"}]}])
    mgr.update(named, weps=[wep("a", A_IP, "tora", ports={"http": 81}, app="a"), WEPS[1]])
    mgr.apply()
    assert can(netns, b, A_IP, 81) and not can(netns, b, A_IP, 80)
    assert "type ipv4_addr . inet_proto . inet_service" in table(node)
    before = handles(node, "inet", netpol.TABLE)
    mgr.update(named, weps=[wep("a", A_IP, "tora", ports={"http": 80}, app="a"), WEPS[1]])
    script = mgr.mgr.table.script().splitlines()
    assert all(line.startswith(("add element", "delete element")) for line in script), script
    mgr.apply()
    assert handles(node, "inet", netpol.TABLE) == before
    assert can(netns, b, A_IP, 80) and not can(netns, b, A_IP, 81)
    mgr.mgr.resync()
    assert not mgr.apply()
    mgr.update(named)  # a declares no ports: nothing is allowed, not everything
    mgr.apply()
    assert not can(netns, b, A_IP, 80) and not can(netns, b, A_IP, 81)


def test_egress_named_port_to_the_peer_pods_own_number(topo, netns):
    node, a, b, _ = topo
    mgr = Fed(node)
    weps = [wep("a", A_IP, "tora", ports={"http": 81}, app="a"), wep("b", B_IP, "torb", ports={"http": 80}, app="b"),
            wep("x", EXT_IP, "torx", node="n2", ports={"http": 80})]
    out = pol("b-out", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
              egress=[{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": "http"}]}])
    mgr.update(out, weps=weps)
    mgr.apply()
    assert can(netns, b, A_IP, 81) and not can(netns, b, A_IP, 80)
    assert not can(netns, b, EXT_IP, 80)  # x declares http=80 but is no peer
    anywhere = pol("b-out", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
                   egress=[{"ports": [{"port": "http"}, {"port": 80}]}])
    mgr.update(anywhere, weps=weps)
    mgr.apply()
    assert can(netns, b, A_IP, 81) and can(netns, b, A_IP, 80) and can(netns, b, EXT_IP, 80)
    assert not can(netns, b, EXT_IP, 81)
    assert can(netns, a, B_IP, 81)  # a is not isolated
    mgr.mgr.resync()
    assert not mgr.apply()


def test_hand_edits_are_noticed_by_the_monitor_and_repaired(topo, netns):
    node, _a, b, _ = topo
    mon = NftMonitor(netns=node)
    try:
        mgr = Fed(node)
        mgr.update(pol("deny"))
        mgr.apply()
        assert not mon.drain() and mon.commits  # our own commit: seen, not foreign
        written = table(node)
        before = handles(node, "inet", netpol.TABLE)

        assert nft(node, "flush", "chain", "inet", netpol.TABLE, "forward-ingress").returncode == 0
        assert can(netns, b, A_IP)  # the hand edit opened the pod
        assert wait_foreign(mon)
        mgr.mgr.resync()
        assert mgr.apply()
        assert not mon.drain()
        assert table(node) == written
        assert not can(netns, b, A_IP)
        after = handles(node, "inet", netpol.TABLE)
        # Only the flushed chain was written again.
        assert {k for k in before if after.get(k) != before[k]} == \
            {k for k in before if k[0] == "rule" and k[1] == "forward-ingress"}

        assert nft(node, "delete", "element", "inet", netpol.TABLE, "ingress-pods", '{ "tora" }').returncode == 0
        assert nft(node, "add", "rule", "inet", netpol.TABLE, "pod-in-torb", "accept").returncode == 0
        assert wait_foreign(mon)
        mgr.mgr.resync()
        mgr.apply()
        assert table(node) == written

        assert nft(node, "delete", "table", "inet", netpol.TABLE).returncode == 0
        assert wait_foreign(mon)
        mgr.mgr.resync()
        mgr.apply()
        assert table(node) == written
    finally:
        mon.close()


def wait_foreign(mon: NftMonitor, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if mon.drain():
            return True
        time.sleep(0.02)
    return False


def test_policy_counter_survives_other_pods_coming_and_going(topo, netns):
    node, _a, b, _ = topo
    mgr = Fed(node)
    mgr.update(pol("a-from-b", podSelector={"matchLabels": {"app": "a"}},
                   ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    mgr.apply()
    name = policy_chain("shop/a-from-b", "in")
    assert counter(node, "inet", netpol.TABLE, name) == (0, 0)
    for _ in range(3):
        assert can(netns, b, A_IP)
    counted = counter(node, "inet", netpol.TABLE, name)
    assert counted[0] == 3  # one SYN per connection; the rest is established traffic
    handle = handles(node, "inet", netpol.TABLE)[("counter", "", name)]

    # An unrelated pod (its own policy) arrives and leaves: element and chain changes only.
    other = PodFilter("torc", "shop", "c", ("shop/c-only",), None)
    mgr.mgr.on_update(PolicyUpdate("shop/c-only", ResolvedPolicy(
        "shop/c-only", (Allow(("10.65.9.0/24",), (PortRange("TCP", 443, 443),)),), ())))
    mgr.mgr.on_update(EndpointFilterUpdate("torc", other))
    mgr.apply()
    assert policy_chain("shop/c-only", "in") in table(node)
    assert counter(node, "inet", netpol.TABLE, name) == counted
    mgr.mgr.on_update(EndpointFilterUpdate("torc", None))
    mgr.mgr.on_update(PolicyUpdate("shop/c-only", None))
    mgr.apply()
    assert policy_chain("shop/c-only", "in") not in table(node)
    assert counter(node, "inet", netpol.TABLE, name) == counted
    assert handles(node, "inet", netpol.TABLE)[("counter", "", name)] == handle

    # A resync (one listing, nothing to repair) leaves it alone too; so does a new agent
    # (a fresh manager adopts the table).
    mgr.mgr.resync()
    assert not mgr.apply()
    fresh = Fed(node)
    fresh.update(pol("a-from-b", podSelector={"matchLabels": {"app": "a"}},
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    assert not fresh.apply()
    assert counter(node, "inet", netpol.TABLE, name) == counted


def test_a_rejected_transaction_raises_and_a_later_apply_succeeds(topo, netns):
    node, a, b, _ = topo
    mgr = Fed(node)
    mgr.update(pol("deny"))
    mgr.apply()
    before = table(node)
    # A port range nft refuses (high below low), for a policy a's chain jumps to.
    bad = ResolvedPolicy("shop/deny", (Allow(None, (PortRange("TCP", 90, 80),)),), ())
    mgr.mgr.on_update(PolicyUpdate("shop/deny", bad))
    for _ in range(2):  # a retry of the same refused state fails the same way, harmlessly
        with pytest.raises(DataplaneError, match="nft rejected"):
            mgr.mgr.apply()
        assert mgr.mgr.dirty
        assert table(node) == before  # one transaction: all or nothing
    assert not can(netns, b, A_IP)
    mgr.mgr.on_update(PolicyUpdate("shop/deny", mgr.last.policy("shop/deny")))
    mgr.mgr.apply()
    assert not mgr.mgr.dirty and table(node) == before

    # Drift the manager did not hear about makes its transaction fail (an element it
    # deletes is gone); the failure makes the next apply list the table and succeed.
    assert nft(node, "delete", "element", "inet", netpol.TABLE, "ingress-pods", '{ "torb" }').returncode == 0
    mgr.update(pol("deny", podSelector={"matchLabels": {"app": "a"}}))
    with pytest.raises(DataplaneError):
        mgr.mgr.apply()
    mgr.mgr.apply()
    assert not mgr.mgr.dirty
    assert "torb" not in table(node) and not can(netns, b, A_IP) and can(netns, a, B_IP)
