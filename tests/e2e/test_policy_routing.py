"""Issue 5 end to end: per-pool egress through a chosen uplink, and natOutgoing.

One lab for the file: 2 nodes, two uplink segments with a BIRD router each (tor1 on
10.99.101.1, tor2 on 10.99.102.1), the outside host 10.99.0.3. Pool A egresses via
tor1, pool B via tor2; each node has a pod of each pool. Every test first puts the
pools into the state it needs, so the tests do not depend on each other's order.

Proof of the path a packet took: nftables counters in each router's forward hook, one
per pod address towards the outside host. Proof of the address the far end saw: a tiny
server that answers each connection with its peer's address (in the outside host, and
in a pod), started and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from lab_fixtures import agent_metric

from tortie.lab import nsutil
from tortie.lab.services import LB_CIDR

pytestmark = pytest.mark.slow

POOL_A, POOL_B = "10.70.0.0/16", "10.71.0.0/16"
TABLE_A, TABLE_B = 201, 202
TOR1, TOR2 = "10.99.101.1", "10.99.102.1"
EXT = "10.99.0.3"
PEER_PORT = 7000
PODS = {"default/a1": ("node1", "pool-a"), "default/b1": ("node1", "pool-b"),
        "default/a2": ("node2", "pool-a"), "default/b2": ("node2", "pool-b")}
COUNTERS = "tortielab"  # the nftables table the test adds in each router
CONVERGE = 2.0  # the bound for every change to take effect

# Answers each TCP connection with the peer's address; runs until killed.
PEER_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(64); print('ready', flush=True)\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(a[0].encode()); c.close()\n"
)


def _pool(name: str, cidr: str, *, nat: bool = False, egress: tuple | None = None) -> dict:
    """An IPPool; egress = (table, next hop[, interface])."""
    spec: dict = {"cidr": cidr, "blockSize": 26, "natOutgoing": nat}
    if egress:
        spec["egress"] = {"table": egress[0], "nextHop": egress[1]}
        if len(egress) > 2:
            spec["egress"]["interface"] = egress[2]
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": spec}


class EgressLab:
    def __init__(self, lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen] = []
        self.pool_state: dict[str, tuple] = {}

    # --- set up ---------------------------------------------------------------------
    def start_peer_server(self, who: str) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", self.lab.netns_of(who), sys.executable, "-c", PEER_SERVER,
                                 str(PEER_PORT)], stdout=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout.readline().startswith(b"ready"), f"peer server in {who} did not start"

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()

    def add_counters(self) -> None:
        """In each router: a named counter per pod, for its packets towards the outside host."""
        pods = {ref.split("/")[1]: self.lab.pod(ref).address for ref in PODS}
        body = "".join(f"  counter {name} {{}}\n" for name in pods)
        body += "  chain counting {\n    type filter hook forward priority 0; policy accept;\n"
        body += "".join(f"    ip saddr {ip} ip daddr {EXT} counter name \"{name}\"\n" for name, ip in pods.items())
        body += "  }\n"
        for tor in ("tor1", "tor2"):
            self.lab.exec(tor, ["nft", "-f", "-"], input=f"table inet {COUNTERS} {{\n{body}}}\n",
                          text=True, check=True)

    def packets(self, tor: str, pod: str) -> int:
        out = self.lab.exec(tor, ["nft", "-j", "list", "counter", "inet", COUNTERS, pod.split("/")[-1]],
                            capture_output=True, text=True, check=True).stdout
        return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)

    def set_pools(self, *, a_nat: bool = False, a_via: str | None = TOR1, b_egress: bool = True) -> float:
        """The pools as a test needs them (a_via: pool A's egress next hop, None for none;
        B egresses via tor2 on eth1 unless b_egress is off, and never NATs); the seconds
        from tortiectl's return (the datastore write is done) until both nodes' kernels
        show it."""
        want = (a_nat, a_via, b_egress)
        if self.pool_state.get("pools") == want:
            return 0.0
        docs = [_pool("pool-a", POOL_A, nat=a_nat, egress=(TABLE_A, a_via) if a_via else None),
                _pool("pool-b", POOL_B, egress=(TABLE_B, TOR2, "eth1") if b_egress else None)]
        self.lab.ctl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        t0 = time.monotonic()
        self.pool_state["pools"] = want
        for node in ("node1", "node2"):
            wait_for(lambda n=node: self.rules(n) == expected_rules(a_via is not None, b_egress)
                     and self.nat_on(n) == a_nat and self.table(n, TABLE_A) == egress_table(a_via)
                     and self.table(n, TABLE_B) == egress_table(TOR2 if b_egress else None),
                     f"{node} converged to pool A nat={a_nat} egress via {a_via}")
        return time.monotonic() - t0

    # --- looking ----------------------------------------------------------------------
    def rules(self, node: str) -> set[str]:
        """The node's rules at tortie's priorities 100-199, as `ip rule` prints them."""
        out = self.lab.exec(node, ["ip", "rule", "show"], capture_output=True, text=True, check=True).stdout
        return {" ".join(line.split()) for line in out.splitlines() if 100 <= int(line.split(":")[0]) < 200}

    def all_rules(self, node: str) -> str:
        return self.lab.exec(node, ["ip", "rule", "show"], capture_output=True, text=True, check=True).stdout

    def table(self, node: str, table: int) -> str:
        return self.lab.exec(node, ["ip", "route", "show", "table", str(table)], capture_output=True,
                             text=True, check=True).stdout.strip()

    def nat_on(self, node: str) -> bool:
        r = self.lab.exec(node, ["nft", "list", "table", "ip", "tortie-nat"], capture_output=True, text=True)
        return r.returncode == 0 and "masquerade" in r.stdout

    def nat_handle(self, node: str) -> int | None:
        """The kernel handle of the masquerade rule (a rule written again gets a new one)."""
        r = self.lab.exec(node, ["nft", "-a", "list", "table", "ip", "tortie-nat"], capture_output=True, text=True)
        m = re.search(r"masquerade .*# handle (\d+)$", r.stdout, re.M)
        return int(m.group(1)) if m else None

    def seen_as(self, src: str, dst_ip: str) -> str:
        """Connect from src's namespace to the peer server at dst_ip: the address it saw."""
        with nsutil.socket_in(self.lab.netns_of(src)) as s:
            s.settimeout(3)
            s.connect((dst_ip, PEER_PORT))
            return s.recv(100).decode()

    def default_path(self, pod: str) -> str:
        """The router the node's main table picks for the pod's packets to the outside host."""
        p = self.lab.pod(pod)
        out = self.lab.exec(p.node, ["ip", "route", "get", EXT, "from", p.address, "iif", p.host_ifname],
                            capture_output=True, text=True, check=True).stdout
        via = re.search(r" via (\S+)", out).group(1)
        return {TOR1: "tor1", TOR2: "tor2"}[via]


def egress_table(via: str | None) -> str:
    """An egress table as `ip route show table N` prints it."""
    return f"default via {via} dev {'eth0' if via == TOR1 else 'eth1'} proto 77" if via else ""


def expected_rules(a_egress: bool, b_egress: bool = True) -> set[str]:
    """Rule 100 for every pool while any pool has egress routing, then 110 per such pool,
    and its floor at 111 (what the pool's table does not route is refused)."""
    pools = [(cidr, table) for cidr, table, on in ((POOL_A, TABLE_A, a_egress), (POOL_B, TABLE_B, b_egress)) if on]
    egress = {f"110: from {cidr} lookup {table} proto 77" for cidr, table in pools}
    egress |= {f"111: from {cidr} unreachable proto 77" for cidr, _ in pools}
    if not egress:
        return set()
    # every pool, the lab's LoadBalancer pool too: traffic to a Service's LB address stays
    # in the cluster's routing, whatever the sender's egress
    return egress | {f"100: from all to {c} lookup main proto 77" for c in ("10.65.0.0/16", POOL_A, POOL_B, LB_CIDR)}


def lab_cli(lab, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tortie.lab", *args, "--name", lab.name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wait_for(cond, what: str, seconds: float = 10.0) -> float:
    """Poll cond until true; the seconds it took (fails after `seconds`)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def elab(lab_factory):
    # A 1 s resync, so "survives every resync" is exercised many times within a test.
    lab = lab_factory(nodes=2, tor="bird", uplinks=2, agent_env={"TORTIE_RESYNC_INTERVAL": "1"})
    e = EgressLab(lab)
    try:
        e.set_pools(a_via=TOR1)
        for ref, (node, pool) in PODS.items():
            if pool == "pool-a":
                lab.pod_add(node, ref, pool=pool)
            else:  # the CLI's `pod add --pool` path
                lab_cli(lab, "pod", "add", node, ref, "--pool", pool)
        e.add_counters()
        e.start_peer_server("ext")
        e.start_peer_server("default/b2")
        e.start_peer_server("node2")
        yield e
    finally:
        e.stop()
        lab.down()


def test_pods_get_the_pool_they_ask_for_and_ctl_shows_egress(elab):
    for ref, (_, pool) in PODS.items():
        cidr = POOL_A if pool == "pool-a" else POOL_B
        assert elab.lab.pod(ref).address.startswith(cidr.split(".0.0/")[0] + "."), (ref, cidr)
    wide = elab.lab.ctl("get", "ippools", "-o", "wide").stdout
    assert re.search(rf"pool-a\s+{POOL_A}\s.*table {TABLE_A} via {TOR1}", wide), wide
    assert re.search(rf"pool-b\s+{POOL_B}\s.*table {TABLE_B} via {TOR2} dev eth1", wide), wide
    assert "NAT" in wide.splitlines()[0]
    tors = {t["name"]: t for t in json.loads(lab_cli(elab.lab, "status", "-o", "json"))["tors"]}
    assert set(tors) == {"tor1", "tor2"} and tors["tor2"]["segment"]["subnet"] == "10.99.102.0/24"


def test_each_pool_leaves_through_its_own_router(elab):
    elab.set_pools(a_nat=False, a_via=TOR1)
    for node in ("node1", "node2"):
        assert elab.table(node, TABLE_A) == egress_table(TOR1)
        assert elab.table(node, TABLE_B) == egress_table(TOR2)
    before = {(t, p): elab.packets(t, p) for t in ("tor1", "tor2") for p in PODS}
    for _ in range(3):
        for pod in PODS:
            assert elab.seen_as(pod, EXT) == elab.lab.pod(pod).address  # no NAT on either pool
    delta = {k: elab.packets(*k) - v for k, v in before.items()}
    for pod in PODS:
        mine, other = ("tor1", "tor2") if "/a" in pod else ("tor2", "tor1")
        assert delta[(mine, pod)] >= 6, (pod, delta)  # 3 connections: SYN and ACK each, at least
        assert delta[(other, pod)] == 0, (pod, delta)
    # Between the pools and across nodes, traffic still flows (rule 100 keeps the main table):
    # every pod, node and the outside host to every pod, TCP and UDP.
    m = elab.lab.matrix(80)
    assert m.ok, m.render()


def test_changing_the_next_hop_moves_the_traffic(elab):
    elab.set_pools(a_nat=False, a_via=TOR1)
    assert elab.set_pools(a_nat=False, a_via=TOR2) < CONVERGE
    for pod in ("default/a1", "default/a2"):
        before = {t: elab.packets(t, pod) for t in ("tor1", "tor2")}
        for _ in range(3):
            assert elab.seen_as(pod, EXT) == elab.lab.pod(pod).address
        assert elab.packets("tor2", pod) - before["tor2"] >= 6 and elab.packets("tor1", pod) == before["tor1"], pod
    # Another table: the rule follows, and the old table is emptied.
    elab.pool_state.clear()
    elab.lab.ctl("apply", "-f", "-", input=json.dumps(_pool("pool-a", POOL_A, egress=(203, TOR1))))
    for node in ("node1", "node2"):
        wait_for(lambda n=node: f"110: from {POOL_A} lookup 203 proto 77" in elab.rules(n)
                 and elab.table(n, 203) == egress_table(TOR1) and elab.table(n, TABLE_A) == "",
                 f"{node}: pool A's egress moved to table 203", CONVERGE)
        assert not [r for r in elab.rules(node) if f"lookup {TABLE_A}" in r]
    elab.set_pools(a_nat=False, a_via=TOR1)
    for node in ("node1", "node2"):
        assert elab.table(node, 203) == ""


def test_nat_outgoing_on_pool_a_only(elab):
    elab.set_pools(a_nat=True, a_via=TOR1)
    node1, node2 = elab.lab.node("node1").ip, elab.lab.node("node2").ip
    assert elab.seen_as("default/a1", EXT) == node1
    assert elab.seen_as("default/a2", EXT) == node2
    assert elab.seen_as("default/b1", EXT) == elab.lab.pod("default/b1").address
    # Pod to pod (other node, other pool) and pod to node: never translated.
    assert elab.seen_as("default/a1", elab.lab.pod("default/b2").address) == elab.lab.pod("default/a1").address
    assert elab.seen_as("default/a1", node2) == elab.lab.pod("default/a1").address
    node2_up2 = elab.lab.node("node2").uplinks[1].ip  # its second uplink's address, too
    assert elab.seen_as("default/a1", node2_up2) == elab.lab.pod("default/a1").address
    # NAT does not change the path: pool A still leaves through tor1 only (as the node's address).
    before = elab.lab.exec("tor2", ["nft", "list", "table", "inet", COUNTERS], capture_output=True, text=True).stdout
    assert elab.seen_as("default/a1", EXT) == node1
    after = elab.lab.exec("tor2", ["nft", "list", "table", "inet", COUNTERS], capture_output=True, text=True).stdout
    assert before == after
    # Off again: pool A's own addresses reach the outside host.
    elab.set_pools(a_nat=False, a_via=TOR1)
    assert elab.seen_as("default/a1", EXT) == elab.lab.pod("default/a1").address


def test_hand_deleted_rule_route_and_nat_come_back(elab):
    elab.set_pools(a_nat=True, a_via=TOR1)
    lab = elab.lab
    rule_a = f"110: from {POOL_A} lookup {TABLE_A} proto 77"
    lab.exec("node1", ["ip", "rule", "del", "priority", "110", "from", POOL_A, "lookup", str(TABLE_A)], check=True)
    took = wait_for(lambda: rule_a in elab.rules("node1"), "the deleted egress rule is back", CONVERGE)
    assert took < CONVERGE
    lab.exec("node1", ["ip", "rule", "del", "priority", "100", "to", POOL_B, "lookup", "main"], check=True)
    wait_for(lambda: elab.rules("node1") == expected_rules(True), "the deleted to-pools rule is back", CONVERGE)
    lab.exec("node1", ["ip", "route", "del", "default", "table", str(TABLE_A)], check=True)
    wait_for(lambda: elab.table("node1", TABLE_A) == egress_table(TOR1),
             "the egress table's default route is back", CONVERGE)
    # The agent may restore the chain before we can look, so a restore is proven by the
    # rule's kernel handle: the rule written again (flush chain + its rule) gets a new one.
    handle = elab.nat_handle("node2")
    lab.exec("node2", ["nft", "flush", "chain", "ip", "tortie-nat", "postrouting"], check=True)
    wait_for(lambda: elab.nat_on("node2") and elab.nat_handle("node2") != handle,
             "the flushed NAT chain is back", CONVERGE)
    lab.exec("node2", ["nft", "delete", "table", "ip", "tortie-nat"], check=True)
    wait_for(lambda: elab.nat_on("node2"), "the deleted NAT table is back", CONVERGE)
    assert elab.seen_as("default/a2", EXT) == lab.node("node2").ip
    elab.set_pools(a_nat=False, a_via=TOR1)


def test_removing_egress_goes_back_to_the_default_path_and_foreign_rules_survive(elab):
    elab.set_pools(a_nat=False, a_via=TOR1)
    lab = elab.lab
    foreign = "500: from 192.0.2.0/24 lookup 777"
    stray = "150: from 192.0.2.0/24 lookup 778"  # inside tortie's range: not ours to keep
    for node in ("node1", "node2"):
        lab.exec(node, ["ip", "rule", "add", "priority", "500", "from", "192.0.2.0/24", "lookup", "777"], check=True)
        lab.exec(node, ["ip", "rule", "add", "priority", "150", "from", "192.0.2.0/24", "lookup", "778"], check=True)
    wait_for(lambda: stray not in " ".join(elab.all_rules("node1").split()), "the stray rule at 150 is removed",
             CONVERGE)
    rounds0 = _apply_rounds(lab, "node1")
    assert elab.set_pools(a_nat=False, a_via=None) < CONVERGE  # both nodes dropped pool A's egress
    for node in ("node1", "node2"):
        assert elab.table(node, TABLE_A) == ""
        assert not [r for r in elab.rules(node) if f"lookup {TABLE_A}" in r]
        assert elab.table(node, TABLE_B) == egress_table(TOR2)
    # Pool A's traffic now takes the main table's (ECMP) default: counted only there.
    for pod in ("default/a1", "default/a2"):
        path = elab.default_path(pod)
        other = "tor2" if path == "tor1" else "tor1"
        before = (elab.packets(path, pod), elab.packets(other, pod))
        for _ in range(3):
            assert elab.seen_as(pod, EXT) == lab.pod(pod).address
        assert elab.packets(path, pod) - before[0] >= 6 and elab.packets(other, pod) == before[1], (pod, path)
    # With no pool asking for egress, tortie keeps no rule and no egress route at all.
    assert elab.set_pools(a_nat=False, a_via=None, b_egress=False) < CONVERGE
    for node in ("node1", "node2"):
        assert elab.rules(node) == set() and elab.table(node, TABLE_B) == ""
        assert not elab.lab.exec(node, ["ip", "route", "show", "table", "all", "proto", "77", "type", "unicast"],
                                 capture_output=True, text=True, check=True).stdout.count("default")
    # The foreign rule survived the pool changes and a few 1 s resyncs.
    wait_for(lambda: _apply_rounds(lab, "node1") >= rounds0 + 3, "three more reconcile rounds", 10)
    for node in ("node1", "node2"):
        assert foreign in " ".join(elab.all_rules(node).split()), node
        lab.exec(node, ["ip", "rule", "del", "priority", "500", "from", "192.0.2.0/24", "lookup", "777"], check=True)
    # Back again: the egress rule and table return, and the path is tor1 again.
    elab.set_pools(a_nat=False, a_via=TOR1)
    before = (elab.packets("tor1", "default/a1"), elab.packets("tor2", "default/a1"))
    assert elab.seen_as("default/a1", EXT) == lab.pod("default/a1").address
    assert elab.packets("tor1", "default/a1") > before[0] and elab.packets("tor2", "default/a1") == before[1]


def test_an_unreachable_next_hop_fails_closed_and_says_so(elab):
    """Pool A's next hop on no segment of the nodes (a typo): its traffic is refused, not
    handed to the main table's default and out by either router; node status, readiness
    and tortie_egress_up say why; fixing the pool restores it within 2 s."""
    lab = elab.lab
    typo = "10.99.109.1"
    elab.pool_state.clear()
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool("pool-a", POOL_A, egress=(TABLE_A, typo))))
    for node in ("node1", "node2"):
        wait_for(lambda n=node: f"111: from {POOL_A} unreachable proto 77" in elab.rules(n)
                 and elab.table(n, TABLE_A) == "" and _egress_up(lab, n, "pool-a") == 0,
                 f"{node}: pool A's egress down", CONVERGE)
    before = {(t, p): elab.packets(t, p) for t in ("tor1", "tor2") for p in ("default/a1", "default/a2")}
    for pod in ("default/a1", "default/a2"):
        with pytest.raises(OSError):  # refused at the node (ICMP unreachable), or timed out
            elab.seen_as(pod, EXT)
    assert {k: elab.packets(*k) for k in before} == before  # nothing left by either router
    assert elab.seen_as("default/b1", EXT) == lab.pod("default/b1").address  # pool B unaffected
    assert elab.seen_as("default/a1", lab.pod("default/b2").address) == lab.pod("default/a1").address
    status, body = lab.http_get("node1", 9099, "/readiness")
    assert status == 503 and "pool pool-a" in json.loads(body)["components"]["egress"]["notReady"]
    down = rf"egress of pool pool-a \(table {TABLE_A} via {typo}\): DOWN: waiting for a link: .*ENETUNREACH"
    wait_for(lambda: re.search(down, lab.ctl("node", "status", "node1").stdout),
             "node status says why (a status is written at most every 2 s)", 5)
    out = lab.ctl("node", "status", "node1").stdout
    assert re.search(rf"egress of pool pool-b \(table {TABLE_B} via {TOR2}\): up", out), out
    wait_for(lambda: "DOWN on node1, node2 of 2 nodes: waiting for a link" in lab.ctl("get", "ippools", "-o", "wide").stdout,
             "get ippools -o wide shows pool A down on both nodes (statuses are published every 2 s)", 5.0)
    wide = lab.ctl("get", "ippools", "-o", "wide").stdout
    assert re.search(r"pool-b\s.*up on 2/2 nodes", wide), wide
    # Fixed: back within the bound, and ready again.
    lab.ctl("apply", "-f", "-", input=json.dumps(_pool("pool-a", POOL_A, egress=(TABLE_A, TOR1))))
    t0 = time.monotonic()
    for node in ("node1", "node2"):
        wait_for(lambda n=node: elab.table(n, TABLE_A) == egress_table(TOR1), f"{node}: pool A fixed", CONVERGE)
    assert time.monotonic() - t0 < CONVERGE
    elab.pool_state["pools"] = (False, TOR1, True)
    assert elab.seen_as("default/a1", EXT) == lab.pod("default/a1").address
    wait_for(lambda: lab.http_get("node1", 9099, "/readiness")[0] == 200, "node1 ready again", CONVERGE)
    assert _egress_up(lab, "node1", "pool-a") == 1


def _egress_up(lab, node: str, pool: str) -> float | None:
    body = lab.http_get(node, 9091, "/metrics")[1]
    m = re.search(rf'^tortie_egress_up\{{pool="{pool}"\}} (\S+)', body, re.M)
    return float(m.group(1)) if m else None


def _apply_rounds(lab, node: str) -> float:
    body = lab.http_get(node, 9091, "/metrics")[1]
    m = re.search(r'^tortie_apply_rounds_total\{result="ok"\} (\S+)', body, re.M)
    return float(m.group(1)) if m else 0.0


def test_agent_restart_keeps_and_adopts_the_egress_state(elab):
    elab.set_pools(a_nat=True, a_via=TOR1)
    lab = elab.lab
    lab.agent_stop("node1", signal.SIGKILL)
    try:
        # The kernel keeps what the agent wrote: egress and NAT work without it.
        assert elab.rules("node1") == expected_rules(True) and elab.nat_on("node1")
        assert elab.seen_as("default/a1", EXT) == lab.node("node1").ip
    finally:
        lab.agent_start("node1")
    # The new agent adopts it unchanged (no duplicates) and guards it again.
    owned = [line for line in elab.all_rules("node1").splitlines() if 100 <= int(line.split(":")[0]) < 200]
    assert len(owned) == len(expected_rules(True)) and elab.rules("node1") == expected_rules(True)
    assert elab.table("node1", TABLE_A) == egress_table(TOR1)
    lab.exec("node1", ["ip", "rule", "del", "priority", "110", "from", POOL_A, "lookup", str(TABLE_A)], check=True)
    wait_for(lambda: elab.rules("node1") == expected_rules(True), "the deleted rule is back after the restart",
             CONVERGE)
    elab.set_pools(a_nat=False, a_via=TOR1)


def test_two_next_hops_share_the_flows_and_a_cut_uplink_moves_them(elab):
    """Issue 11 item 2: nextHops through both routers (ECMP, flows spread by their ports);
    node1's link to tor1 cut (`tortie-lab link down`): every new flow of pool A leaves by
    tor2 (the kernel marks the next hop dead); the link back: both carry flows again.
    (Replies may still come back by tor1 until its BGP session to node1 times out: return
    paths are the routers', see issue 11's BFD and symmetric-return items.)"""
    lab = elab.lab
    elab.pool_state.clear()
    doc = _pool("pool-a", POOL_A)
    doc["spec"]["egress"] = {"table": TABLE_A, "nextHops": [{"address": TOR1}, {"address": TOR2}]}
    lab.ctl("apply", "-f", "-", input=json.dumps(doc))
    for node in ("node1", "node2"):
        wait_for(lambda n=node: f"nexthop via {TOR1} dev eth0" in elab.table(n, TABLE_A)
                 and f"nexthop via {TOR2} dev eth1" in elab.table(n, TABLE_A), f"{node}: ECMP egress", CONVERGE)
        wait_for(lambda n=node: _sysctl(lab, n, "net.ipv4.fib_multipath_hash_policy") == "1"
                 and _sysctl(lab, n, "net.ipv4.fib_multipath_use_neigh") == "1", f"{node}: ECMP settings", CONVERGE)
    wide = lab.ctl("get", "ippools", "-o", "wide").stdout
    assert re.search(rf"pool-a\s.*table {TABLE_A} via {TOR1},{TOR2}\s", wide), wide

    def flows(n: int, answered: bool = True) -> dict[str, int]:
        """n connections from a1 to the outside host: the packets each router forwarded."""
        before = {t: elab.packets(t, "default/a1") for t in ("tor1", "tor2")}
        for _ in range(n):
            if answered:
                assert elab.seen_as("default/a1", EXT) == lab.pod("default/a1").address
            else:
                with nsutil.socket_in(lab.netns_of("default/a1")) as s, contextlib.suppress(OSError):
                    s.settimeout(0.3)
                    s.connect((EXT, PEER_PORT))
        return {t: elab.packets(t, "default/a1") - before[t] for t in before}

    spread = flows(20)
    assert spread["tor1"] > 0 and spread["tor2"] > 0, spread
    lab_cli(lab, "link", "down", "node1", "eth0")
    try:
        cut = flows(10, answered=False)  # every SYN leaves by tor2
        assert cut["tor1"] == 0 and cut["tor2"] >= 10, cut
        assert f"nexthop via {TOR1} dev eth0 weight 1 dead linkdown" in " ".join(elab.table("node1", TABLE_A).split())
    finally:
        lab_cli(lab, "link", "up", "node1", "eth0")
    wait_for(lambda: "dead" not in elab.table("node1", TABLE_A), "node1: the next hop via eth0 is alive again")
    back = flows(20)
    assert back["tor1"] > 0 and back["tor2"] > 0, back
    elab.set_pools(a_nat=False, a_via=TOR1)


def _sysctl(lab, node: str, name: str) -> str:
    return lab.exec(node, ["sysctl", "-n", name], capture_output=True, text=True, check=True).stdout.strip()


def test_a_router_powered_off_and_on(elab):
    """`tortie-lab router stop|start` (issue 11 item 7): the router's daemon is gone and its
    links are down while the nodes' own links stay up; back on, its sessions come back."""
    lab = elab.lab
    tor1 = lab.plan().tors[0]
    assert tor1.name == "tor1"
    lab_cli(lab, "router", "stop", "tor1")
    try:
        assert lab.state().proc("tor1") is None
        links = json.loads(lab.exec("tor1", ["ip", "-j", "link", "show"], capture_output=True, text=True,
                                    check=True).stdout)
        assert {link["operstate"] for link in links if link["ifname"] != "lo"} == {"DOWN"}
        node_link = json.loads(lab.exec("node1", ["ip", "-j", "link", "show", "eth0"], capture_output=True,
                                        text=True, check=True).stdout)[0]
        assert "UP" in node_link["flags"]  # the node's side stays up: no carrier loss seen there
        assert lab.exec("node1", ["ping", "-c1", "-W1", TOR1], capture_output=True).returncode != 0
        assert set(lab.bgp_sessions()["tor2"].values()) == {"Established"}
    finally:
        lab_cli(lab, "router", "start", "tor1")
    wait_for(lambda: set(lab.bgp_sessions()["tor1"].values()) == {"Established"},
             "tor1's sessions established again", 15)


def test_bfd_takes_a_dead_routers_next_hop_out_within_a_second(elab):
    """Issue 11 item 4: pool A's next hops watched by BFD (100 ms x 3, the routers' BIRD
    on the other end); tor1 powered off: node1's egress table drops its next hop within
    1 s and node status says so; tor1 back: its next hop returns."""
    lab = elab.lab
    bfd = {"minTx": "100ms", "minRx": 100, "multiplier": 3}
    lab.router_bfd(True)
    elab.pool_state.clear()
    doc = _pool("pool-a", POOL_A)
    doc["spec"]["egress"] = {"table": TABLE_A, "nextHops": [{"address": TOR1, "bfd": bfd},
                                                            {"address": TOR2, "bfd": bfd}]}
    both = (f"nexthop via {TOR1} dev eth0", f"nexthop via {TOR2} dev eth1")
    try:
        lab.ctl("apply", "-f", "-", input=json.dumps(doc))
        for node in ("node1", "node2"):  # only once BFD is Up do the next hops count
            wait_for(lambda n=node: all(h in elab.table(n, TABLE_A) for h in both), f"{node}: both next hops", 10)
        node1_addr = lab.node("node1").uplinks[0].ip
        assert lab.bfd_sessions("tor1").get(node1_addr) == "Up"
        # The BGPPeers ask for BFD too (router bfd on): what tor1 announced goes with it.
        a2 = lab.pod("default/a2").address
        wait_for(lambda: {TOR1, TOR2} <= _learned_via(lab, "node1", a2), "node1 learns a2's block from both", 10)
        lab_cli(lab, "router", "stop", "tor1")
        t0 = time.monotonic()
        took = wait_for(lambda: elab.table("node1", TABLE_A) == egress_table(TOR2),
                        "node1: tor1's next hop out of the table", 3)
        assert took < 1.0, took
        withdrawn = wait_for(lambda: _learned_via(lab, "node1", a2) == {TOR2}, "node1: tor1's routes gone", 3)
        assert time.monotonic() - t0 < 1.0, withdrawn  # not the 9 s hold time
        before = elab.packets("tor2", "default/a1")
        with nsutil.socket_in(lab.netns_of("default/a1")) as s, contextlib.suppress(OSError):
            s.settimeout(0.3)  # the reply may come back by the dead router: not egress's part
            s.connect((EXT, PEER_PORT))
        assert elab.packets("tor2", "default/a1") > before  # pool A's flows leave by tor2
        # (node status may lag here: node1's own connection to etcd may have gone by tor1)
        assert _bfd_up(lab, "node1", TOR1) == 0 and _bfd_up(lab, "node1", TOR2) == 1
        print(f"BFD failover: egress {took * 1000:.0f} ms, learned routes {(took + withdrawn) * 1000:.0f} ms "
              "after the router went down")
        lab_cli(lab, "router", "start", "tor1")
        wait_for(lambda: all(h in elab.table("node1", TABLE_A) for h in both), "node1: tor1's next hop back", 15)
    finally:
        if lab.state().proc("tor1") is None:
            lab_cli(lab, "router", "start", "tor1")
        lab.router_bfd(False)
        elab.set_pools(a_nat=False, a_via=TOR1)


def _bfd_up(lab, node: str, peer: str) -> float | None:
    return agent_metric(lab, node, "tortie_bfd_up", peer=peer)


def _learned_via(lab, node: str, addr: str) -> set[str]:
    """The next hops of the learned route that covers addr in node's main table."""
    out = lab.exec(node, ["ip", "-j", "route", "show", "match", addr, "proto", "77"], capture_output=True,
                   text=True, check=True).stdout
    hops = set()
    for r in json.loads(out or "[]"):
        if r.get("type", "unicast") != "unicast":
            continue
        hops |= {h["gateway"] for h in r.get("nexthops", []) if "gateway" in h}
        if "gateway" in r:
            hops.add(r["gateway"])
    return hops
