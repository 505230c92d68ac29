"""ProxyManager against the real kernel: a node namespace forwarding for three pods (two
servers and a client, each behind its own veth) and an outside host. Real TCP and UDP
decide: servers answer `<pod> <client address as seen>`. The manager runs in this
process (libnftables, its socket opened in the node namespace)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
from nfthelpers import list_table, nft, wire

from tortie.policy.proxy_mgr import TABLE, ProxyManager
from tortie.policy.svc_model import Backend, ProxyConfigUpdate, ServicePortState, ServicePortUpdate

SERVER = """
import selectors, socket, sys
name = sys.argv[1]
sel = selectors.DefaultSelector()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(64); sel.register(t, selectors.EVENT_READ)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 8080)); sel.register(u, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is t:
            c, peer = t.accept(); c.sendall(f"{name} {peer[0]}".encode()); c.close()
        else:
            data, peer = u.recvfrom(100); u.sendto(f"{name} {peer[0]}".encode(), peer)
"""
# N connections (or datagrams on ONE socket, udp-same) to addr:port; prints one answer a
# line ("refused" / "timeout" for a failure) and how long the whole took.
CLIENT = """
import socket, sys, time
mode, addr, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.monotonic()
same = None
for i in range(n):
    try:
        if mode == "tcp":
            s = socket.create_connection((addr, port), 2); print(s.recv(100).decode()); s.close()
        else:
            if same is None or mode == "udp":
                same = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); same.settimeout(2)
                same.connect((addr, port))
            same.send(b"x"); print(same.recv(100).decode())
            if mode == "udp-same":
                time.sleep(float(sys.argv[5]) if len(sys.argv) > 5 else 0)
    except (ConnectionRefusedError, ConnectionResetError):
        print("refused")
    except TimeoutError:
        print("timeout")
    except OSError as exc:
        print(f"error {exc.errno}")
print(f"took {time.monotonic() - t0:.3f}")
"""

CIP, NODE_IP, EXT_IP = "10.96.0.10", "192.0.2.1", "192.0.2.2"
A, B, C = "10.65.1.2", "10.65.2.2", "10.65.3.2"
NODE_ADDRS = {"10.65.1.1", "10.65.2.1", "10.65.3.1", NODE_IP}


@pytest.fixture(scope="module")
def topo(netns_module):
    netns = netns_module
    procs = []
    try:
        node, a, b, c, ext = (netns.new(n) for n in ("node", "pa", "pb", "pc", "ext"))
        for ns, host_if, net in ((a, "tora", "10.65.1"), (b, "torb", "10.65.2"), (c, "torc", "10.65.3"),
                                 (ext, "n-ext", "192.0.2")):
            wire(node, ns, host_if, net)
        netns.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # As with kube-proxy, cluster IPs are on no interface: the node routes them somewhere
        # (its default route) and the proxy catches them on the way.
        netns.run(node, "ip", "route", "add", "default", "via", EXT_IP)
        for ns, name in ((a, "pod-a"), (b, "pod-b")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        mgr = ProxyManager(netns=node)
        mgr.on_update(ProxyConfigUpdate(frozenset({"10.65.0.0/16"})))
        yield netns, mgr, dict(node=node, a=a, b=b, c=c, ext=ext)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run(netns, ns, mode, addr, port, n=1, *extra) -> tuple[list[str], float]:
    out = netns.run(ns, sys.executable, "-c", CLIENT, mode, addr, str(port), str(n), *map(str, extra)).stdout
    lines = out.strip().splitlines()
    return lines[:-1], float(lines[-1].split()[1])


def state(key="shop/web/tcp/80/v4", proto="tcp", backends=(A, B), local=True, **kw) -> ServicePortState:
    bs = tuple(Backend(ip, 8080, local) for ip in backends)
    kw.setdefault("cluster_backends", bs)
    kw.setdefault("external_backends", bs)
    kw.setdefault("cluster_ips", (CIP,))
    return ServicePortState(key=key, family=4, protocol=proto, port=80, **kw)


def put(mgr, st: ServicePortState | None, key: str = "shop/web/tcp/80/v4") -> None:
    mgr.on_update(ServicePortUpdate(key, st))
    mgr.apply()


def test_cluster_ip_spreads_tcp_and_udp_over_every_endpoint(topo):
    netns, mgr, ns = topo
    put(mgr, state())
    answers, _ = run(netns, ns["c"], "tcp", CIP, 80, 100)
    pods = Counter(a.split()[0] for a in answers)
    assert set(pods) == {"pod-a", "pod-b"} and max(pods.values()) <= 75, pods
    assert all(a.split()[1] == C for a in answers)  # a pod's own address survives
    put(mgr, state(key="shop/dns/udp/80/v4", proto="udp"), "shop/dns/udp/80/v4")  # same address, UDP
    answers, _ = run(netns, ns["c"], "udp", CIP, 80, 40)
    assert {a.split()[0] for a in answers} == {"pod-a", "pod-b"}
    put(mgr, None, "shop/dns/udp/80/v4")


def test_client_ip_affinity_keeps_a_client_on_one_endpoint(topo):
    netns, mgr, ns = topo
    put(mgr, state(affinity=60))
    answers, _ = run(netns, ns["c"], "tcp", CIP, 80, 30)
    assert len({a.split()[0] for a in answers}) == 1, answers
    # the affinity entry survives an unrelated change and a hand edit elsewhere (no table rewrite)
    put(mgr, state(key="shop/other/tcp/80/v4", backends=(B,), cluster_ips=("10.96.0.11",)),
        "shop/other/tcp/80/v4")
    answers2, _ = run(netns, ns["c"], "tcp", CIP, 80, 10)
    assert {a.split()[0] for a in answers2} == {answers[0].split()[0]}
    put(mgr, None, "shop/other/tcp/80/v4")
    put(mgr, state())


def test_no_endpoints_refuses_at_once(topo):
    netns, mgr, ns = topo
    put(mgr, state(backends=()))
    answers, took = run(netns, ns["c"], "tcp", CIP, 80, 3)
    assert answers == ["refused"] * 3 and took < 1.0, (answers, took)
    put(mgr, state(key="shop/dns/udp/80/v4", proto="udp", backends=()), "shop/dns/udp/80/v4")
    answers, took = run(netns, ns["c"], "udp", CIP, 80, 3)
    assert answers == ["refused"] * 3 and took < 1.0, (answers, took)
    answers, took = run(netns, ns["node"], "tcp", CIP, 80, 1)  # the node itself too
    assert answers == ["refused"] and took < 1.0
    put(mgr, None, "shop/dns/udp/80/v4")
    put(mgr, state())


def test_hairpin_a_pod_reaches_itself_through_its_service(topo):
    netns, mgr, ns = topo
    put(mgr, state(backends=(A,)))
    answers, _ = run(netns, ns["a"], "tcp", CIP, 80, 3)
    assert [a.split()[0] for a in answers] == ["pod-a"] * 3
    assert answers[0].split()[1] != A  # masqueraded, or the reply would never return to the socket
    put(mgr, state())


def test_node_port_and_external_ip_cluster_masquerades_local_keeps_source(topo):
    netns, mgr, ns = topo
    put(mgr, state(node_port=30080, external_ips=("198.51.100.7",)))
    answers, _ = run(netns, ns["ext"], "tcp", NODE_IP, 30080, 6)
    # masqueraded: the pod sees the node's address on the way out to it
    assert len(answers) == 6 and {a.split()[1] for a in answers} <= NODE_ADDRS, answers
    # an external IP: the outside host routes it to the node (a router would, from BGP)
    netns.run(ns["ext"], "ip", "route", "replace", "198.51.100.7/32", "via", NODE_IP)
    answers, _ = run(netns, ns["ext"], "tcp", "198.51.100.7", 80, 4)
    assert len(answers) == 4 and {a.split()[1] for a in answers} <= NODE_ADDRS, answers
    put(mgr, state(node_port=30080, external_ips=("198.51.100.7",), external_local=True))
    answers, _ = run(netns, ns["ext"], "tcp", NODE_IP, 30080, 6)
    assert all(a.split()[1] == EXT_IP for a in answers), answers
    answers, _ = run(netns, ns["ext"], "udp", NODE_IP, 30080, 1)
    assert answers == ["refused"] or answers == ["timeout"]  # no UDP port 30080: not ours
    # Local with no endpoint on this node: outside traffic is dropped, not sent elsewhere
    put(mgr, state(node_port=30080, external_local=True, external_backends=()))
    answers, _ = run(netns, ns["ext"], "tcp", NODE_IP, 30080, 1)
    assert answers == ["timeout"]
    put(mgr, state())


def test_removing_a_service_leaves_nothing_and_hand_edits_are_repaired(topo):
    netns, mgr, ns = topo
    put(mgr, state(node_port=30080, affinity=30))
    before = list_table(ns["node"], "ip", TABLE)
    assert "30080" in before and "aff-" in before
    r = nft(ns["node"], "delete", "element", "ip", TABLE, "service-ips", f"{{ {CIP} . tcp . 80 }}")
    assert r.returncode == 0, r.stderr
    broken, _ = run(netns, ns["c"], "tcp", CIP, 80, 1)
    assert broken[0].split()[0] not in ("pod-a", "pod-b"), broken  # the edit did break it
    mgr.resync()
    mgr.apply()
    answers, _ = run(netns, ns["c"], "tcp", CIP, 80, 4)
    assert all(a.split()[0] in ("pod-a", "pod-b") for a in answers), answers
    put(mgr, None)
    assert list_table(ns["node"], "ip", TABLE) is None  # no Service of the family: no table


def test_udp_conntrack_of_a_removed_endpoint_is_flushed(topo):
    _, mgr, ns = topo
    key = "shop/dns/udp/80/v4"
    put(mgr, state(key=key, proto="udp", backends=(A,)), key)
    client = subprocess.Popen(["ip", "netns", "exec", ns["c"], sys.executable, "-c", CLIENT, "udp-same",
                               CIP, "80", "12", "0.25"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    put(mgr, state(key=key, proto="udp", backends=(B,)), key)
    out, _ = client.communicate(timeout=30)
    answers = [a.split()[0] for a in out.strip().splitlines()[:-1]]
    assert answers[0] == "pod-a" and answers[-1] == "pod-b", answers  # the same socket moved over
    put(mgr, None, key)
    put(mgr, state())


def test_sctp_is_programmed_like_tcp_and_udp(topo):
    """This kernel has no SCTP sockets (EPROTONOSUPPORT), so no traffic: the ruleset only."""
    _, mgr, ns = topo
    key = "shop/sig/sctp/80/v4"
    put(mgr, state(key=key, proto="sctp", node_port=30300, cluster_ips=("10.96.0.12",)), key)
    listing = list_table(ns["node"], "ip", TABLE)
    assert "10.96.0.12 . sctp . 80" in listing and "sctp . 30300" in listing
    assert "meta l4proto sctp dnat ip to numgen random mod 2 map { 0 : 10.65.1.2 . 8080" in listing
    put(mgr, None, key)
    assert "sctp" not in (list_table(ns["node"], "ip", TABLE) or "")


def test_ipv6_service_is_programmed_in_its_own_table(topo):
    """The ip6 table takes the same shapes (bracketed dnat, ::1 left out of node ports,
    affinity sets of ipv6_addr); no IPv6 traffic in this topology."""
    _, mgr, ns = topo
    key = "shop/web6/tcp/80/v6"
    bs = (Backend("fd00:65::2", 8080, True), Backend("fd00:65::3", 8080, False))
    st6 = ServicePortState(key=key, family=6, protocol="tcp", port=80, cluster_ips=("fd00:96::a",),
                           node_port=30600, cluster_backends=bs, external_backends=bs, affinity=30)
    put(mgr, st6, key)
    listing = list_table(ns["node"], "ip6", TABLE)
    assert "fd00:96::a . tcp . 80" in listing and "dnat to [fd00:65::2]:8080" in listing
    assert "ip6 daddr != ::1" in listing and "type ipv6_addr" in listing
    assert list_table(ns["node"], "ip", TABLE) is not None  # the IPv4 Services are untouched
    put(mgr, None, key)
    assert list_table(ns["node"], "ip6", TABLE) is None


def test_internal_local_without_a_local_endpoint_drops_rather_than_refuses(topo):
    """internalTrafficPolicy Local, endpoints only on other nodes: kube-proxy drops ("has no
    local endpoints"); a Service with no endpoints at all is refused instead."""
    netns, mgr, ns = topo
    put(mgr, state(backends=(), elsewhere=True))
    answers, _ = run(netns, ns["c"], "tcp", CIP, 80, 1)
    assert answers == ["timeout"], answers
    put(mgr, state())
