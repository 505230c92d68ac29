"""VXLAN end to end (issue 13): `tortie-lab up --nodes 3 --subnets 2` puts node1 and node2
on one segment and node3 behind a router that does not peer with tortie. The pool's
vxlanMode decides who reaches whom and what is encapsulated; the VXLAN device, its FDB
and neighbour entries are repaired after a hand edit; large packets cross the tunnel.

One lab for the module; the tests run in file order and each sets the mode it needs."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from lab_fixtures import agent_metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

POOL = "default-ipv4"
CONVERGE = 2.0  # the acceptance bound: a mode switch, a repair
DEV = "vxlan.tortie"


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=3, subnets=2)
    for i in (1, 2, 3):
        lab.pod_add(f"node{i}", f"default/p{i}")
    yield lab
    lab.down()


def set_mode(lab, mode: str, **extra) -> float:
    """Apply the pool with this vxlanMode; the time it was written."""
    pool = {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": POOL},
            "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, "vxlanMode": mode, **extra}}
    lab.ctl("apply", "-f", "-", input=json.dumps(pool))
    return time.monotonic()


def reach(lab, src: str, dst: str, *, udp: bool = False) -> bool:
    return lab.probe(src, dst, 80, udp=udp, timeout=0.5).ok


def wait(pred, seconds: float, step: float = 0.05) -> float | None:
    """Seconds until pred() held, or None if it did not within `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 <= seconds:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def vxlan_packets(lab, node: str) -> int:
    """Packets the node's VXLAN device sent and received (0 without the device)."""
    out = lab.exec(node, ["ip", "-s", "-j", "link", "show", "dev", DEV], capture_output=True, text=True)
    if out.returncode != 0:
        return 0
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["packets"] + stats["tx"]["packets"]


def node_ip(lab, node: str, *args: str) -> subprocess.CompletedProcess:
    return lab.exec(node, ["ip", *args], capture_output=True, text=True)


def converged(lab, mode: str) -> bool:
    """Every pod answers every pod (TCP) as the mode says."""
    cross = mode != "Never"
    pairs = [("default/p1", "default/p2", True), ("default/p2", "default/p1", True),
             ("default/p1", "default/p3", cross), ("default/p3", "default/p1", cross),
             ("default/p2", "default/p3", cross), ("default/p3", "default/p2", cross)]
    return all(reach(lab, s, d) == want for s, d, want in pairs)


def test_the_lab_map_shows_the_two_subnets(lab):
    sub = lab.status()["subnets"]
    assert sub["segment"]["subnet"] == "10.99.200.0/24" and sub["router"]["bgp"] is False
    assert [a.rsplit(".", 1)[0] for a in sub["nodes"].values()] == ["10.99.0", "10.99.0", "10.99.200"]


def test_never_leaves_the_other_subnet_unreachable(lab):
    set_mode(lab, "Never")
    assert wait(lambda: converged(lab, "Never"), 10) is not None
    assert node_ip(lab, "node1", "link", "show", "dev", DEV).returncode != 0  # no device at all


def test_cross_subnet_encapsulates_only_across_the_router(lab):
    set_mode(lab, "CrossSubnet")
    took = wait(lambda: converged(lab, "CrossSubnet"), 10)  # every pair, on every node
    assert took is not None and took <= CONVERGE, took
    # Nodes and the outside host (behind node1) reach the pods across the router as well.
    for src, dst in (("node1", "default/p3"), ("node3", "default/p1"), ("node2", "default/p3"), ("ext", "default/p3")):
        assert reach(lab, src, dst), (src, dst)
    # Same subnet: not one VXLAN packet on either node while p1 and p2 talk.
    before = (vxlan_packets(lab, "node1"), vxlan_packets(lab, "node2"))
    for _ in range(5):
        assert reach(lab, "default/p1", "default/p2") and reach(lab, "default/p2", "default/p1", udp=True)
    assert (vxlan_packets(lab, "node1"), vxlan_packets(lab, "node2")) == before
    # Across: through the tunnel, both ends count it.
    b1, b3 = vxlan_packets(lab, "node1"), vxlan_packets(lab, "node3")
    assert reach(lab, "default/p1", "default/p3")
    assert vxlan_packets(lab, "node1") > b1 and vxlan_packets(lab, "node3") > b3
    route = node_ip(lab, "node1", "-j", "route", "show", lab.wep("default/p2")["spec"]["ipNetworks"][0]
                    .split("/")[0]).stdout
    assert DEV not in route
    # Said so: the metric, and node status (published with the BGP status, every 10 s at worst).
    assert agent_metric(lab, "node1", "tortie_vxlan_up", device=DEV) == 1

    def status() -> dict:
        docs = json.loads(lab.ctl("node", "status", "node3", "-o", "json").stdout)
        return (docs[0].get("vxlan") or [{}])[0]
    assert wait(lambda: status().get("vteps") == 2, 15, step=0.5) is not None
    assert status()["up"] is True and status()["mtu"] == 1450
    assert "remote VTEP(s): up" in lab.ctl("node", "status", "node3").stdout
    assert "CrossSubnet (VNI 4096)" in lab.ctl("get", "ippools", "-o", "wide").stdout


def test_switching_modes_converges_within_2s_without_restarting_agents(lab):
    pids = {p.role: (p.pid, p.start) for p in lab.state().procs if p.role.startswith("agent:")}
    set_mode(lab, "Always")
    # Same subnet now goes through the tunnel too.
    before = vxlan_packets(lab, "node2")

    def p1_p2_tunnelled() -> bool:
        return reach(lab, "default/p1", "default/p2") and vxlan_packets(lab, "node2") > before
    took = wait(p1_p2_tunnelled, 10)
    assert took is not None and took <= CONVERGE, took
    set_mode(lab, "Never")
    took = wait(lambda: not reach(lab, "default/p1", "default/p3") and reach(lab, "default/p1", "default/p2"), 10)
    assert took is not None and took <= CONVERGE, took
    set_mode(lab, "CrossSubnet")
    took = wait(lambda: converged(lab, "CrossSubnet"), 10)
    assert took is not None and took <= CONVERGE, took
    assert {p.role: (p.pid, p.start) for p in lab.state().procs if p.role.startswith("agent:")} == pids


def _fdb(lab, node):
    out = lab.exec(node, ["bridge", "-j", "fdb", "show", "dev", DEV], capture_output=True, text=True)
    return sorted((e["mac"], e.get("dst")) for e in json.loads(out.stdout or "[]") if e.get("dst"))


def _neigh(lab, node):
    out = node_ip(lab, node, "-j", "neigh", "show", "dev", DEV)
    return sorted((e["dst"], e.get("lladdr")) for e in json.loads(out.stdout or "[]") if "PERMANENT" in e.get("state", []))


@pytest.mark.parametrize("what", ["fdb", "neighbour", "device"])
def test_hand_deleted_entries_and_device_are_restored_within_2s(lab, what):
    set_mode(lab, "CrossSubnet")
    assert wait(lambda: converged(lab, "CrossSubnet"), 10) is not None
    fdb, neigh = _fdb(lab, "node1"), _neigh(lab, "node1")
    assert len(fdb) == 2 and len(neigh) == 2
    if what == "fdb":
        mac, dst = fdb[0]
        lab.exec("node1", ["bridge", "fdb", "del", mac, "dev", DEV, "dst", dst], check=True)
    elif what == "neighbour":
        node_ip(lab, "node1", "neigh", "del", neigh[0][0], "dev", DEV)
    else:
        node_ip(lab, "node1", "link", "del", DEV)
    took = wait(lambda: _fdb(lab, "node1") == fdb and _neigh(lab, "node1") == neigh
                and reach(lab, "default/p1", "default/p3"), 5)
    assert took is not None and took <= CONVERGE, (what, took)


def test_large_packets_cross_the_tunnel_without_fragmentation(lab):
    set_mode(lab, "CrossSubnet")
    # Pods made while the pool encapsulates get the device's MTU (uplink 1500 - 50).
    lab.pod_add("node1", "default/big1")
    lab.pod_add("node3", "default/big3")
    link = lab.exec("default/big1", ["ip", "-j", "link", "show", "dev", "eth0"], capture_output=True, text=True)
    assert json.loads(link.stdout)[0]["mtu"] == 1450
    dst = lab.wep("default/big3")["spec"]["ipNetworks"][0].split("/")[0]
    server = subprocess.Popen(["ip", "netns", "exec", lab.netns_of("default/big3"), "python3", "-c", _SERVER])
    try:
        # big1 has the tunnel's MTU; p1 was made before the pool encapsulated (MTU 1500): its
        # large TCP segments learn the path MTU from the node (ICMP), none is lost for good.
        for client in ("default/big1", "default/p1"):
            out = lab.exec(client, ["python3", "-c", _CLIENT, dst], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, (client, out.stderr)
            assert out.stdout.split() == ["udp", "1400", "tcp", str(64 * 1024)], (client, out.stdout)
    finally:
        server.kill()
        server.wait()
    # No fragment was made on the way (node1's IP counters: nothing fragmented).
    snmp = lab.exec("node1", ["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout.splitlines()
    ip_names, ip_values = (line.split()[1:] for line in snmp if line.startswith("Ip:"))
    counters = dict(zip(ip_names, map(int, ip_values), strict=True))
    assert counters["FragCreates"] == 0 and counters["FragFails"] == 0


_SERVER = """
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 7001))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 7002)); t.listen()
def udp():
    while True:
        d, a = u.recvfrom(65535); u.sendto(str(len(d)).encode(), a)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept(); n = 0
    while n < 65536:
        b = c.recv(65536)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""

_CLIENT = """
import socket, sys, time
dst = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.3)
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
u.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # DF: never fragmented
for _ in range(30):
    u.sendto(b"u" * 1400, (dst, 7001))
    try:
        print("udp", u.recv(100).decode()); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("no UDP answer")
for _ in range(30):
    try:
        t = socket.create_connection((dst, 7002), timeout=2); break
    except OSError:
        time.sleep(0.1)
t.settimeout(5); t.sendall(b"t" * 65536); t.shutdown(socket.SHUT_WR)
print("tcp", t.recv(100).decode())
"""


def test_a_killed_agent_leaves_the_overlay_up_and_its_successor_adopts_it(lab):
    set_mode(lab, "CrossSubnet")
    assert wait(lambda: converged(lab, "CrossSubnet"), 10) is not None
    index = json.loads(node_ip(lab, "node1", "-j", "link", "show", "dev", DEV).stdout)[0]["ifindex"]
    fdb, neigh = _fdb(lab, "node1"), _neigh(lab, "node1")
    lab.agent_stop("node1", signal.SIGKILL)
    assert reach(lab, "default/p1", "default/p3") and reach(lab, "default/p3", "default/p1")
    lab.agent_start("node1")
    assert reach(lab, "default/p1", "default/p3")
    assert json.loads(node_ip(lab, "node1", "-j", "link", "show", "dev", DEV).stdout)[0]["ifindex"] == index
    assert (_fdb(lab, "node1"), _neigh(lab, "node1")) == (fdb, neigh)


def test_bad_input_is_refused_in_one_line_and_nothing_is_stored(lab):
    before = lab.ctl("get", "ippool", POOL, "-o", "json").stdout
    for spec, field in (({"vxlanMode": "Sometimes"}, "spec.vxlanMode"), ({"vxlanVNI": 0}, "spec.vxlanVNI"),
                        ({"vxlanMode": "Always", "vxlanVNI": 1 << 24}, "spec.vxlanVNI")):
        pool = {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": POOL},
                "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, **spec}}
        r = lab.ctl("apply", "-f", "-", input=json.dumps(pool), check=False)
        assert r.returncode != 0 and field in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert lab.ctl("get", "ippool", POOL, "-o", "json").stdout == before


def test_never_again_removes_the_device_and_frees_the_tunnel_addresses(lab):
    set_mode(lab, "Never")
    assert wait(lambda: node_ip(lab, "node1", "link", "show", "dev", DEV).returncode != 0, 5) is not None
    nodes = json.loads(lab.ctl("get", "nodes", "-o", "json").stdout)
    items = nodes.get("items", [nodes])
    assert all("ipv4VXLANTunnelAddr" not in n["spec"] for n in items)


def test_the_overlay_needs_no_bgp(lab_factory):
    """Agents without BGP: every route across the router comes from the datastore alone."""
    lab = lab_factory(nodes=2, subnets=2, agent_env={"TORTIE_BGP_ENABLED": "false"})
    try:
        lab.pod_add("node1", "default/q1")
        lab.pod_add("node2", "default/q2")
        assert not reach(lab, "default/q1", "default/q2")
        set_mode(lab, "CrossSubnet")
        took = wait(lambda: reach(lab, "default/q1", "default/q2") and reach(lab, "default/q2", "default/q1"), 10)
        assert took is not None and took <= CONVERGE, took
    finally:
        lab.down()
