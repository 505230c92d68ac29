"""Issue 13 item 1 for IPv6: per-pool egress (IPv6 rules and egress tables) and natOutgoing
(NAT66) in a dual-stack lab: 2 nodes, two uplink segments with a BIRD router each (tor1,
tor2), the outside host. IPv6 pool A (natOutgoing) leaves through tor1, pool B (no NAT)
through tor2, both from node1; IPv4 keeps the main table's path, untouched.

Proof of the address the far end saw: a server in the outside host that answers each
connection with its peer's address. Masquerade takes the outgoing interface's address,
so seeing node1's address on tor1's segment also proves the uplink pool A left by.
Proof of pool B's path: an nftables counter in each router.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tortie.lab import family, nsutil
from tortie.lab.services import LB_CIDR

pytestmark = pytest.mark.slow

POOL_A6, POOL_B6 = "fd70::/64", "fd71::/64"
TABLE_A, TABLE_B = 211, 212
TOR1, TOR2 = family.v6("10.99.101.1"), family.v6("10.99.102.1")
EXT6 = family.v6("10.99.0.3")
PORT = 7000
COUNTERS = "tortielab6"

# Answers each TCP connection (IPv4 or IPv6) with the peer's address; runs until killed.
PEER_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('::', int(sys.argv[1]))); s.listen(64); print('ready', flush=True)\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(a[0].removeprefix('::ffff:').encode()); c.close()\n"
)


def pool(name: str, cidr: str, table: int, via: str, *, nat: bool, interface: str | None = None) -> dict:
    egress = {"table": table, "nextHop": via, **({"interface": interface} if interface else {})}
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, "blockSize": 122, "natOutgoing": nat, "egress": egress}}


def wait_for(cond, what: str, seconds: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, tor="bird", uplinks=2, ip_family="dual")
    procs: list[subprocess.Popen] = []
    try:
        docs = [pool("pool-a6", POOL_A6, TABLE_A, TOR1, nat=True),
                pool("pool-b6", POOL_B6, TABLE_B, TOR2, nat=False, interface="eth1")]
        lab.ctl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        lab.pod_add("node1", "default/a1", pool="default-ipv4,pool-a6")
        lab.pod_add("node1", "default/b1", pool="default-ipv4,pool-b6")
        b1 = lab.pod("default/b1").address_of(6)
        for tor in ("tor1", "tor2"):
            rules = (f"  counter b1 {{}}\n  chain counting {{\n    type filter hook forward priority 0; policy accept;\n"
                     f"    ip6 saddr {b1} ip6 daddr {EXT6} counter name \"b1\"\n  }}\n")
            lab.exec(tor, ["nft", "-f", "-"], input=f"table inet {COUNTERS} {{\n{rules}}}\n", text=True, check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns_of("ext"), sys.executable, "-c", PEER_SERVER,
                                 str(PORT)], stdout=subprocess.PIPE, start_new_session=True)
        procs.append(proc)
        assert proc.stdout.readline().startswith(b"ready")
        yield lab
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        lab.down()


def seen_as(lab, src: str, dst: str) -> str:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with nsutil.socket_in(lab.netns_of(src), fam) as s:
        s.settimeout(3)
        s.connect((dst, PORT))
        return s.recv(100).decode()


def packets(lab, tor: str) -> int:
    out = lab.exec(tor, ["nft", "-j", "list", "counter", "inet", COUNTERS, "b1"], capture_output=True,
                   text=True, check=True).stdout
    return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)


def lines(lab, node: str, *args: str) -> set[str]:
    out = lab.exec(node, ["ip", *args], capture_output=True, text=True, check=True).stdout
    return {" ".join(line.split()) for line in out.splitlines()}


def test_ipv6_rules_and_egress_tables_on_every_node(lab):
    for node in ("node1", "node2"):
        want = {f"100: from all to {c} lookup main proto 77" for c in ("fd65::/48", POOL_A6, POOL_B6)}
        want |= {f"110: from {POOL_A6} lookup {TABLE_A} proto 77", f"110: from {POOL_B6} lookup {TABLE_B} proto 77",
                 f"111: from {POOL_A6} unreachable proto 77", f"111: from {POOL_B6} unreachable proto 77"}
        wait_for(lambda n=node, w=want: {r for r in lines(lab, n, "-6", "rule") if r.startswith("1")} == w,
                 f"{node}'s IPv6 rules")
        assert lines(lab, node, "-6", "route", "show", "table", str(TABLE_A)) == {
            f"default via {TOR1} dev eth0 proto 77 metric 1024 pref medium"}
        assert lines(lab, node, "-6", "route", "show", "table", str(TABLE_B)) == {
            f"default via {TOR2} dev eth1 proto 77 metric 1024 pref medium"}
        # IPv4 has no egress pool: its pools (the pods' and the lab's LoadBalancer pool) keep
        # the main table (rule 100), nothing more
        assert sorted(r for r in lines(lab, node, "-4", "rule") if r[:3].isdigit()
                      and 100 <= int(r.split(":")[0]) < 200) == [
            "100: from all to 10.65.0.0/16 lookup main proto 77", f"100: from all to {LB_CIDR} lookup main proto 77"]


def test_nat66_pool_leaves_masqueraded_through_its_uplink(lab):
    node1_on_tor1 = family.v6("10.99.101.11")
    wait_for(lambda: seen_as(lab, "default/a1", EXT6) == node1_on_tor1, "pool A seen as node1 on tor1's segment")
    nat = lab.exec("node1", ["nft", "list", "table", "ip6", "tortie-nat"], capture_output=True, text=True).stdout
    assert "masquerade" in nat and POOL_A6 in nat


def test_pool_without_nat_keeps_its_address_and_leaves_through_the_other_router(lab):
    b1 = lab.pod("default/b1").address_of(6)
    before = packets(lab, "tor1"), packets(lab, "tor2")
    for _ in range(3):
        assert seen_as(lab, "default/b1", EXT6) == b1
    after = packets(lab, "tor1"), packets(lab, "tor2")
    assert after[0] == before[0] and after[1] > before[1], (before, after)


def test_ipv4_is_untouched_by_the_ipv6_pools(lab):
    a1 = lab.pod("default/a1")
    assert seen_as(lab, "default/a1", "10.99.0.3") == a1.address_of(4)  # no IPv4 NAT, main table
    assert lab.matrix(family=6).ok and lab.matrix(family=4).ok
