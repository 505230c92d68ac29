"""Issue 11 item 3 end to end: egress next hops learned from BGP (IPPool egress.fromPeers).

One lab for the file: 1 node, two uplink segments with a BIRD router each (tor1 on
10.99.101.1, tor2 on 10.99.102.1; the lab labels each BGPPeer `router: torK`), the
outside host 10.99.0.3 with a UDP echo on port 7001. Pool A takes its next hops from
the routers its selector picks; pool B has a static next hop (tor2). The routers
announce a default route only when told (`tortie-lab router announce|withdraw`).

Proof of the path: nftables counters in each router's forward hook for pod a1's
datagrams to the outside host; proof that nobody else saw the default: the node's
pool B table and main table.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from tortie.lab import nsutil
from tortie.lab.benchutil import UDPEcho

pytestmark = pytest.mark.slow

POOL_A, POOL_B = "10.70.0.0/16", "10.71.0.0/16"
TABLE_A, TABLE_B = 201, 202
TOR1, TOR2 = "10.99.101.1", "10.99.102.1"
EXT, ECHO_PORT = "10.99.0.3", 7001
COUNTERS = "tortiefp"
CONVERGE = 2.0  # the issue's bound for a change to take effect on the node
HOLD = 9  # the lab's BGP hold time (lab.routers.HOLD_TIME)


def _pool_a(from_peers: str, fallback: str = "none") -> dict:
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool-a"},
            "spec": {"cidr": POOL_A, "blockSize": 26,
                     "egress": {"table": TABLE_A, "fromPeers": from_peers, "fallback": fallback}}}


POOL_B_DOC = {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool-b"},
              "spec": {"cidr": POOL_B, "blockSize": 26, "egress": {"table": TABLE_B, "nextHop": TOR2}}}


def lab_cli(lab, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tortie.lab", *args, "--name", lab.name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wait_for(cond, what: str, seconds: float = CONVERGE) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


class FromPeersLab:
    def __init__(self, lab) -> None:
        self.lab = lab

    def table(self, table: int | str) -> str:
        r = self.lab.exec("node1", ["ip", "route", "show", "table", str(table)], capture_output=True, text=True)
        if r.returncode != 0:  # a table that never held a route does not exist yet
            assert "does not exist" in r.stderr, r.stderr
            return ""
        return " ".join(r.stdout.split())

    def main_defaults(self) -> str:
        """Default routes tortie put in the node's main table (the lab's own is static)."""
        return self.lab.exec("node1", ["ip", "route", "show", "default", "proto", "77"], capture_output=True,
                             text=True, check=True).stdout.strip()

    def rules(self) -> str:
        return " ".join(self.lab.exec("node1", ["ip", "rule", "show"], capture_output=True, text=True,
                                      check=True).stdout.split())

    def udp_ok(self, pod: str = "default/a1") -> bool:
        """One datagram from the pod to the outside host's echo: answered within 0.5 s."""
        with nsutil.socket_in(self.lab.netns_of(pod), socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            try:
                s.sendto(b"x", (EXT, ECHO_PORT))
                return s.recv(16) == b"x"
            except OSError:
                return False

    def add_counters(self) -> None:
        a1 = self.lab.pod("default/a1").address
        for tor in ("tor1", "tor2"):
            self.lab.exec(tor, ["nft", "-f", "-"], check=True, text=True, input=(
                f"table inet {COUNTERS} {{\n  counter a1 {{}}\n  chain counting {{\n"
                "    type filter hook forward priority 0; policy accept;\n"
                f"    ip saddr {a1} ip daddr {EXT} counter name \"a1\"\n  }}\n}}\n"))

    def packets(self, tor: str) -> int:
        out = self.lab.exec(tor, ["nft", "-j", "list", "counter", "inet", COUNTERS, "a1"],
                            capture_output=True, text=True, check=True).stdout
        return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)

    def leaves_by(self) -> set[str]:
        """The routers that forward a1's next five datagrams (all answered)."""
        before = {t: self.packets(t) for t in ("tor1", "tor2")}
        for _ in range(5):
            assert self.udp_ok(), "a1 reaches the outside host"
        return {t for t in before if self.packets(t) > before[t]}

    def status(self) -> str:
        return self.lab.ctl("node", "status", "node1").stdout

    def egress_up(self) -> float | None:
        body = self.lab.http_get("node1", 9091, "/metrics")[1]
        m = re.search(r'^tortie_egress_up\{pool="pool-a"\} (\S+)', body, re.M)
        return float(m.group(1)) if m else None


def egress_route(*hops: str) -> str:
    dev = {TOR1: "eth0", TOR2: "eth1"}
    if len(hops) == 1:
        return f"default via {hops[0]} dev {dev[hops[0]]} proto 77"
    return "default proto 77 " + " ".join(f"nexthop via {h} dev {dev[h]} weight 1" for h in hops)


@pytest.fixture(scope="module")
def fp(lab_factory):
    lab = lab_factory(nodes=1, tor="bird", uplinks=2)
    echo = None
    try:
        lab.ctl("apply", "-f", "-", input=json.dumps(_pool_a("router == 'tor1'")) + "\n---\n" + json.dumps(POOL_B_DOC))
        lab.pod_add("node1", "default/a1", pool="pool-a")
        lab.pod_add("node1", "default/b1", pool="pool-b")
        echo = UDPEcho(lab.netns_of("ext"), EXT, ECHO_PORT)
        f = FromPeersLab(lab)
        f.add_counters()
        yield f
    finally:
        if echo is not None:
            echo.stop()
        lab.down()


def test_a_default_from_tor1_reaches_pool_a_only_and_its_withdraw_fails_a_closed(fp):
    lab = fp.lab
    # Nothing announced yet: pool A is refused (its floor), and says why.
    wait_for(lambda: fp.table(TABLE_A) == "" and f"111: from {POOL_A} unreachable" in fp.rules(),
             "pool A fails closed while no peer announces a default")
    assert not fp.udp_ok()
    wait_for(lambda: "announces 0.0.0.0/0" in fp.status(), "node status says why (written every 2 s)", 5)
    assert fp.egress_up() == 0
    assert fp.table(TABLE_B) == egress_route(TOR2)

    lab_cli(lab, "router", "announce", "tor1", "0.0.0.0/0")
    took = wait_for(lambda: fp.table(TABLE_A) == egress_route(TOR1), "tor1's default in pool A's table", 5)
    print(f"tor1's default route in pool A's table {took * 1000:.0f} ms after `router announce` returned")
    # Nobody else sees it: pool B keeps its static next hop, the main table gets no default.
    assert fp.table(TABLE_B) == egress_route(TOR2)
    assert fp.main_defaults() == ""
    assert fp.leaves_by() == {"tor1"}
    assert fp.udp_ok("default/b1")
    wait_for(lambda: re.search(rf"egress of pool pool-a \(table {TABLE_A} from peers router == 'tor1': "
                               rf"via {TOR1}\): up", fp.status()), "node status shows the learned next hop", 5)
    wide = lab.ctl("get", "ippools", "-o", "wide").stdout
    assert re.search(rf"pool-a\s.*table {TABLE_A} from peers router == 'tor1'\s.*up on 1/1 nodes "
                     rf"\(node1 via {TOR1}\)", wide), wide
    assert fp.egress_up() == 1

    # tor1 withdraws it: pool A fails closed (refused, not rerouted by tor2), and says why.
    lab_cli(lab, "router", "withdraw", "tor1", "0.0.0.0/0")
    wait_for(lambda: fp.table(TABLE_A) == "", "the withdraw empties pool A's table")
    before = {t: fp.packets(t) for t in ("tor1", "tor2")}
    assert not fp.udp_ok()
    assert {t: fp.packets(t) for t in before} == before  # nothing left by either router
    status, body = lab.http_get("node1", 9099, "/readiness")
    assert status == 503 and "pool pool-a: no next hop" in json.loads(body)["components"]["egress"]["notReady"]
    assert fp.egress_up() == 0


def test_with_fallback_main_a_withdraw_sends_pool_a_to_the_main_table(fp):
    lab = fp.lab
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool_a("router == 'tor1'", fallback="main")))
    wait_for(lambda: f"from {POOL_A} unreachable" not in fp.rules(), "no floor with fallback: main")
    assert fp.table(TABLE_A) == ""
    assert fp.leaves_by()  # through the main table's (ECMP) default, by either router
    lab_cli(lab, "router", "announce", "tor1", "0.0.0.0/0")
    wait_for(lambda: fp.table(TABLE_A) == egress_route(TOR1), "tor1's default in pool A's table", 5)
    assert fp.leaves_by() == {"tor1"}
    lab_cli(lab, "router", "withdraw", "tor1", "0.0.0.0/0")
    wait_for(lambda: fp.table(TABLE_A) == "", "the withdraw empties pool A's table")
    assert fp.udp_ok()  # the main table takes it
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool_a("router == 'tor1'")))
    wait_for(lambda: f"111: from {POOL_A} unreachable" in fp.rules(), "the floor is back")


def test_ecmp_over_the_peers_that_announce_and_a_dead_router_leaves_at_the_hold_time(fp):
    lab = fp.lab
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool_a("has(router)")))
    lab_cli(lab, "router", "announce", "tor1", "0.0.0.0/0")
    lab_cli(lab, "router", "announce", "tor2", "0.0.0.0/0")
    wait_for(lambda: fp.table(TABLE_A) == egress_route(TOR1, TOR2), "ECMP over both routers' defaults", 5)
    assert fp.main_defaults() == ""
    wait_for(lambda: f"from peers has(router): via {TOR1},{TOR2}): up" in fp.status(),
             "node status shows both learned next hops", 5)
    lab_cli(lab, "router", "withdraw", "tor1", "0.0.0.0/0")
    wait_for(lambda: fp.table(TABLE_A) == egress_route(TOR2), "tor1's next hop out when it withdraws")
    assert fp.leaves_by() == {"tor2"}
    # tor2 powered off (no BFD): its next hop stays until the BGP hold time ends its session
    lab_cli(lab, "router", "stop", "tor2")
    try:
        t0 = time.monotonic()
        took = wait_for(lambda: fp.table(TABLE_A) == "", "tor2's next hop out after the hold time", HOLD + 3)
        assert took > HOLD - 3  # BGP noticed (no BFD here), not something else
        print(f"a dead router's learned next hop left after {took:.1f} s (hold time {HOLD} s)")
        assert f"111: from {POOL_A} unreachable" in fp.rules() and not fp.udp_ok()
        assert time.monotonic() - t0 < HOLD + 3
    finally:
        lab_cli(lab, "router", "start", "tor2")
    # back: it announces again (the lab keeps what a router announces across restarts)
    wait_for(lambda: fp.table(TABLE_A) == egress_route(TOR2), "tor2's default back after its restart", 20)
    lab_cli(lab, "router", "withdraw", "tor2", "0.0.0.0/0")
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool_a("router == 'tor1'")))
