"""Issue 11 items 6 and 5 end to end: a pool's blocks announced to chosen routers only
(IPPool.spec.bgp), and egress addresses (IPPool.spec.egress.address).

One lab for the file: 2 nodes on two uplink segments, BIRD routers tor1 (AS 65000, on
10.99.101.1) and tor2 (AS 65001, on 10.99.102.1), the outside host 10.99.0.3 behind both
(its default route is ECMP over the two). The mesh is off: nodes peer with the routers
only, so node2 learns node1's blocks from a router. The lab labels each BGPPeer with
`router: torK`.

Proof of what a router learned: its BGP table (`birdc show route all`), read while the
test runs by a watcher thread as well. Proof of the source the far end saw and of the
reply coming back: a server in the outside host (a socket made in its namespace, served by
a thread of this process) answers each connection with the client address it saw; the
pod reads that answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import signal
import socket
import threading
import time

import pytest

from tortie.lab import nsutil

pytestmark = pytest.mark.slow

POOL_P, POOL_E = "10.72.0.0/16", "10.73.0.0/16"
TOR1 = "10.99.101.1"
EXT = "10.99.0.3"
EGRESS_ADDR = "192.0.2.10"  # outside every pool and outside what nodes import from the routers
EXT_PORT = 7100
NODE_AS = {"node1": 64513, "node2": 64514}


def _pool(name: str, cidr: str, **spec) -> dict:
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, "blockSize": 26, **spec}}


class EchoServer:
    """In the outside host: answers each TCP connection with the client's address."""

    def __init__(self, netns: str, port: int) -> None:
        self.sock = nsutil.socket_in(netns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(64)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.sendall(addr[0].encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def bgp_routes(lab, tor: str) -> dict[str, str]:
    """A router's BGP routes: prefix -> its `show route all` block (every path of it)."""
    out, prefix, blocks = lab.birdc(tor, "show", "route", "all"), None, {}
    for line in out.splitlines():
        if line[:1].isdigit():
            prefix = line.split()[0]
            blocks[prefix] = blocks.get(prefix, "") + line + "\n"
        elif prefix and line[:1] in ("\t", " "):
            blocks[prefix] += line.strip() + "\n"
    return {p: b for p, b in blocks.items() if "BGP.as_path" in b}


def inside(prefix: str, cidr: str) -> bool:
    return ipaddress.ip_network(prefix).subnet_of(ipaddress.ip_network(cidr))


def wait_for(cond, what: str, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while not (value := cond()):
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.1)
    return value


class Watcher:
    """Reads tor2's table every 0.1 s while the tests run: any sighting of pool P there."""

    def __init__(self, lab) -> None:
        self.lab, self.seen, self.reads = lab, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # tor2 is restarted on purpose below
                out = self.lab.birdc("tor2", "show", "route", "where", f"net ~ {POOL_P}")
                self.reads += "BIRD" in out or "Table" in out or out.strip() == ""
                self.seen += re.findall(r"^10\.72\.\S+", out, re.M)
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture(scope="module")
def plab(lab_factory):
    lab = lab_factory(nodes=2, tor="bird", uplinks=2)
    echo, watcher = None, None
    try:
        lab.ctl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in (
            _pool("pool-p", POOL_P, bgp={"peers": "router == 'tor1'", "communities": ["65010:7", "65010:1:2"],
                                         "asPathPrepend": 2}),
            _pool("pool-e", POOL_E, egress={"table": 211, "nextHop": TOR1, "address": EGRESS_ADDR}))))
        watcher = Watcher(lab)
        echo = EchoServer(lab.netns_of("ext"), EXT_PORT)
        yield lab, watcher
    finally:
        if watcher:
            watcher.close()
        if echo:
            echo.close()
        lab.down()


def seen_as(lab, pod: str, dst: str = EXT) -> str:
    """Connect from the pod to an echo server (the outside host's by default): the address
    it saw (the answer arriving proves the replies came back to the pod)."""
    with nsutil.socket_in(lab.netns_of(pod)) as s:
        s.settimeout(3)
        s.connect((dst, EXT_PORT))
        return s.recv(100).decode()


def test_pool_blocks_reach_only_the_selected_router_with_communities_and_prepending(plab):
    lab, watcher = plab
    lab.pod_add("node1", "default/p1", pool="pool-p")
    lab.pod_add("node2", "default/p2", pool="pool-p")
    lab.pod_add("node1", "default/d1", pool="default-ipv4")  # no spec.bgp: every router
    blocks = {n: next(b["cidr"] for b in json.loads(lab.ctl("ipam", "show", "--show-blocks", "-o", "json").stdout)
                      ["blocks"] if b["node"] == n and inside(b["cidr"], POOL_P)) for n in ("node1", "node2")}
    t1 = wait_for(lambda: (t := bgp_routes(lab, "tor1")).keys() >= set(blocks.values()) and t,
                  "tor1 learned both nodes' blocks of pool P")
    for node, block in blocks.items():
        asn = str(NODE_AS[node])
        assert f"BGP.as_path: {asn} {asn} {asn}" in t1[block], t1[block]  # the node's AS + 2 prepended
        assert "(65010,7)" in t1[block] and "(65010, 1, 2)" in t1[block], t1[block]
    # The default pool's block reaches both routers, plain: tor2 does learn from the nodes.
    d1 = lab.pod("default/d1").address
    for tor in ("tor1", "tor2"):
        d_block = wait_for(lambda t=tor: next((b for p, b in bgp_routes(lab, t).items() if inside(f"{d1}/32", p)), None),
                           f"{tor} learned the default pool's block")
        assert "65010" not in d_block and "BGP.as_path: 64513\n" in d_block, d_block
    assert not [p for p in bgp_routes(lab, "tor2") if inside(p, POOL_P)]
    # Pods still reach pods: node2 learns node1's pool-P block through tor1.
    assert lab.probe("default/p2", "default/p1", 80).ok
    assert lab.probe("default/p1", "default/p2", 80).ok

    # tor2 powered off and on, and node1's agent killed and restarted: the sessions that come
    # back carry each router's own set, never pool P to tor2.
    lab.router_stop("tor2")
    lab.router_start("tor2")
    # (and the router's route to the other uplink segment is back: replies the core's ECMP
    # hands to tor2 for a node's tor1 address must find it)
    routes = lab.exec("tor2", ["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert "10.99.101.0/24 via 10.99.0.1 " in routes, routes
    wait_for(lambda: any(inside(f"{d1}/32", p) for p in bgp_routes(lab, "tor2")), "tor2 re-learned the default pool")
    lab.agent_stop("node1", signal.SIGKILL)
    lab.agent_start("node1")
    wait_for(lambda: lab.bgp_sessions()["tor2"].get("node1") == "Established", "node1's session to tor2 back")
    time.sleep(2)
    assert blocks["node1"] in bgp_routes(lab, "tor1")
    assert not watcher.seen, f"tor2 learned pool P's blocks: {sorted(set(watcher.seen))}"
    assert watcher.reads > 20  # the watcher really read tor2's table all along


def _egress_paths(lab, tor: str) -> set[str]:
    """The nodes a router has the egress address from (by their address on its segment)."""
    block = bgp_routes(lab, tor).get(f"{EGRESS_ADDR}/32", "")
    return {n for n in ("node1", "node2") if any(f"via {u.ip} " in block for u in lab.node(n).uplinks)}


def test_egress_address_is_the_source_replies_return_and_the_host_route_follows_the_pods(plab):
    lab, _ = plab
    lab.pod_add("node1", "default/e1", pool="pool-e")
    for tor in ("tor1", "tor2"):  # no bgp.peers: every router gets it, from the node with the pod
        wait_for(lambda t=tor: _egress_paths(lab, t) == {"node1"}, f"{tor} routes the egress address to node1")
    for _ in range(6):  # the outside host's replies go by either router: both lead to node1
        assert seen_as(lab, "default/e1") == EGRESS_ADDR
    for node in ("node1", "node2"):  # what no local flow knows stops at each node, never loops
        assert lab.exec(node, ["ip", "route", "show", f"{EGRESS_ADDR}/32"], capture_output=True, text=True,
                        check=True).stdout.split()[:2] == ["blackhole", EGRESS_ADDR]
    # Pod to pod keeps the pod's address.
    lab.pod_add("node2", "default/t2", pool="default-ipv4")
    echo = EchoServer(lab.netns_of("default/t2"), EXT_PORT)
    try:
        assert seen_as(lab, "default/e1", lab.pod("default/t2").address) == lab.pod("default/e1").address
    finally:
        echo.close()
    # What the CLI shows.
    def announced_by() -> dict[str, bool] | None:
        out = lab.ctl("node", "status").stdout
        found = dict(re.findall(rf"^Node (\S+):.*?egress of pool pool-e .*?address {EGRESS_ADDR} (announced|not)",
                                out, re.M | re.S))
        return {n: v == "announced" for n, v in found.items()}

    # (statuses are rate-limited: wait for both nodes' current word)
    wait_for(lambda: announced_by() == {"node1": True, "node2": False}, "node status: node1 announces, node2 not")
    wide = wait_for(lambda: (o := lab.ctl("get", "ippools", "-o", "wide").stdout) and "announced by node1" in o and o,
                    "get ippools -o wide names the announcing node")
    assert re.search(rf"pool-e\s+{POOL_E}\s.*table 211 via {TOR1} as {EGRESS_ADDR}", wide), wide

    # A second node with a pod of the pool announces it too (the routers' ECMP decides).
    lab.pod_add("node2", "default/e2", pool="pool-e")
    for tor in ("tor1", "tor2"):
        wait_for(lambda t=tor: _egress_paths(lab, t) == {"node1", "node2"}, f"{tor} has the address from both nodes")
    # The last pod of the pool leaves node1: node1 withdraws it; then node2's too.
    lab.pod_del("default/e1")
    for tor in ("tor1", "tor2"):
        wait_for(lambda t=tor: _egress_paths(lab, t) == {"node2"}, f"{tor}: node1 withdrew the egress address")
    lab.pod_del("default/e2")
    for tor in ("tor1", "tor2"):
        wait_for(lambda t=tor: f"{EGRESS_ADDR}/32" not in bgp_routes(lab, t), f"{tor}: the egress address is gone")
