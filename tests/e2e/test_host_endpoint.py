"""Host endpoints end to end (issue 10 item 3): a node's uplink as a HostEndpoint, guarded
by GlobalNetworkPolicies, behind a BIRD router. A policy that denies everything to the
uplink leaves its BGP session (failsafe port 179) and the pods' traffic through it
(forwarded, not the host's) up, and blocks the outside host's probe to the node's own
address (a TCP server on the node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from lab_fixtures import PROBE, eventually, wait_matrix

pytestmark = pytest.mark.slow

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7070)); s.listen(16); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"node1\\n"); c.close()
"""
HOLD = 9.0  # the lab routers' hold time: a session that survives longer was never cut


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, tor="bird")
    lab.pod_add("node1", "x/p1")
    lab.pod_add("node2", "x/p2")
    m = wait_matrix(lab, 30)
    assert m.ok, m
    return lab


@pytest.fixture(scope="module")
def node_server(lab):
    proc = subprocess.Popen(["ip", "netns", "exec", lab.netns_of("node1"), sys.executable, "-c", SERVER],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield lab.status()["nodes"][0]["ip"]
    finally:
        proc.kill()
        proc.wait()


def apply(lab, *docs):
    for d in docs:
        lab.ctl("apply", "-f", "-", input=json.dumps(d))


def doc(kind, name, **spec):
    meta = {"name": name}
    if "labels" in spec:
        meta["labels"] = spec.pop("labels")
    return {"apiVersion": "tortie.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def established(lab) -> bool:
    return lab.bgp_sessions()["tor"].get("node1") == "Established"


def session_since(lab) -> str:
    """When BIRD's session with node1 last changed state (a new session: a new time)."""
    line = next(x for x in lab.birdc("tor", "show", "protocols", "node1").splitlines() if x.startswith("node1 "))
    return line.split()[4]


def pods_ok(lab) -> bool:
    return all(lab.probe(s, d, 80, timeout=PROBE).ok for s, d in (("ext", "x/p1"), ("x/p2", "x/p1"), ("x/p1", "x/p2")))


def test_uplink_denied_everything_keeps_bgp_and_pods_and_blocks_the_node(lab, node_server):
    node_ip = node_server
    assert lab.probe("ext", node_ip, 7070, timeout=PROBE).ok  # the node answers before anything
    assert established(lab)
    try:
        apply(lab, doc("HostEndpoint", "node1-uplink", node="node1", interfaceName="eth0",
                       expectedIPs=[node_ip], labels={"role": "uplink"}),
              doc("GlobalNetworkPolicy", "uplink-allow-7070", order=20, selector="role == 'uplink'",
                  types=["Ingress"], ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [7070]}}]))
        # the host endpoint's policy allows 7070: still answered
        assert eventually(lambda: lab.probe("ext", node_ip, 7070, timeout=PROBE).ok, True, 6)
        apply(lab, doc("GlobalNetworkPolicy", "uplink-deny-all", order=10, selector="role == 'uplink'",
                       types=["Ingress", "Egress"], ingress=[{"action": "Deny"}], egress=[{"action": "Deny"}]))
        assert eventually(lambda: lab.probe("ext", node_ip, 7070, timeout=PROBE).ok, False, 6), \
            "the outside host still reaches the node"
        t0 = time.monotonic()
        while time.monotonic() - t0 < HOLD + 3:  # past the hold time: keepalives pass (failsafe)
            assert established(lab), "BGP session with the router went down"
            assert pods_ok(lab), "pods' traffic through the uplink stopped"
            time.sleep(1)
        assert not lab.probe("ext", node_ip, 7070, timeout=PROBE).ok
        # A new session (conntrack knows nothing of it) comes up through failsafe port 179.
        before = session_since(lab)
        lab.birdc("tor", "restart", "node1")
        assert eventually(lambda: established(lab) and session_since(lab) != before, True, 30), \
            "no new BGP session through the denied uplink"
        # the agent's health port is failsafe too: readiness is read from outside the node
        assert lab.http_get("node1", 9099, "/readiness")[0] == 200
    finally:
        for kind, name in (("globalnetworkpolicy", "uplink-deny-all"), ("globalnetworkpolicy", "uplink-allow-7070"),
                           ("hostendpoint", "node1-uplink")):
            lab.ctl("delete", kind, name, "--ignore-not-found")
    assert eventually(lambda: lab.probe("ext", node_ip, 7070, timeout=PROBE).ok, True, 6)


def test_a_host_endpoint_no_policy_selects_is_denied_but_failsafe(lab, node_server):
    node_ip = node_server
    try:
        apply(lab, doc("HostEndpoint", "node1-all", node="node1", interfaceName="*"))
        assert eventually(lambda: lab.probe("ext", node_ip, 7070, timeout=PROBE).ok, False, 6)
        assert established(lab) and pods_ok(lab)
    finally:
        lab.ctl("delete", "hostendpoint", "node1-all", "--ignore-not-found")
    assert eventually(lambda: lab.probe("ext", node_ip, 7070, timeout=PROBE).ok, True, 6)


def test_apply_on_forward_guards_what_the_uplink_forwards(lab, node_server):
    """One policy on the uplink denies the outside host and allows the rest. With
    applyOnForward it also stops the outside host's traffic to node1's pod; without, only
    its traffic to the node itself."""
    node_ip, ext_ip = node_server, lab.status()["outside"]["ip"]

    def gnp(forward: bool) -> dict:
        return doc("GlobalNetworkPolicy", "no-ext", order=10, selector="role == 'uplink'", applyOnForward=forward,
                   types=["Ingress"], ingress=[{"action": "Deny", "source": {"nets": [f"{ext_ip}/32"]}},
                                               {"action": "Allow"}])

    def reach(src: str, dst: str, port: int = 80) -> bool:
        return lab.probe(src, dst, port, timeout=PROBE).ok

    try:
        apply(lab, doc("HostEndpoint", "node1-uplink", node="node1", interfaceName="eth0",
                       labels={"role": "uplink"}), gnp(True))
        assert eventually(lambda: reach("ext", "x/p1"), False, 6), "forwarded traffic from ext not denied"
        assert reach("x/p2", "x/p1") and reach("ext", "x/p2")  # not from ext / not through node1's uplink
        assert reach("x/p1", "x/p2")  # out through it: no egress policy with applyOnForward
        assert not reach("ext", node_ip, 7070)
        assert established(lab)
        apply(lab, gnp(False))
        assert eventually(lambda: reach("ext", "x/p1"), True, 6), "forwarded traffic still filtered"
        assert not reach("ext", node_ip, 7070)  # the node's own traffic still is
        assert established(lab)
    finally:
        for kind, name in (("globalnetworkpolicy", "no-ext"), ("hostendpoint", "node1-uplink")):
            lab.ctl("delete", kind, name, "--ignore-not-found")


DNAT = """add table ip hepdnat
add chain ip hepdnat pre { type nat hook prerouting priority -100; }
add rule ip hepdnat pre tcp dport 7171 dnat to :7070
"""


def test_pre_dnat_policy_sees_the_original_destination(lab, node_server):
    """A DNAT of port 7171 to the node's server on 7070 (by hand, as a NodePort would be):
    a preDNAT policy denying 7171 stops it, while 7070 itself, matched by no preDNAT rule,
    goes on to the normal policy, which allows everything."""
    node_ip = node_server

    def reach(port: int) -> bool:
        return lab.probe("ext", node_ip, port, timeout=PROBE).ok

    lab.exec("node1", ["nft", "-f", "-"], input=DNAT, text=True, check=True)
    try:
        apply(lab, doc("HostEndpoint", "node1-uplink", node="node1", interfaceName="eth0", labels={"role": "uplink"}),
              doc("GlobalNetworkPolicy", "allow-in", order=10, selector="role == 'uplink'", types=["Ingress"],
                  ingress=[{"action": "Allow"}]))
        assert eventually(lambda: reach(7171) and reach(7070), True, 6)
        apply(lab, doc("GlobalNetworkPolicy", "no-7171", order=1, selector="role == 'uplink'", preDNAT=True,
                       applyOnForward=True, types=["Ingress"],
                       ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [7171]}}]))
        assert eventually(lambda: reach(7171), False, 6), "the preDNAT policy did not see port 7171"
        assert reach(7070), "no preDNAT rule matched 7070: the normal policy should have allowed it"
        assert established(lab)
    finally:
        for kind, name in (("globalnetworkpolicy", "no-7171"), ("globalnetworkpolicy", "allow-in"),
                           ("hostendpoint", "node1-uplink")):
            lab.ctl("delete", kind, name, "--ignore-not-found")
        lab.exec("node1", ["nft", "delete", "table", "ip", "hepdnat"], check=True)


CONNECT_FROM = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(1.0)
s.bind(("0.0.0.0", int(sys.argv[2])))
try:
    s.connect((sys.argv[1], 7070)); print(s.recv(16).decode().strip())
except OSError:
    print("fail")
"""


def test_do_not_track_policy_allows_without_conntrack(lab, node_server):
    """The normal policy on the uplink denies everything; an untracked policy allows port
    7070 in and the outside host out. The connection works, and conntrack never saw it."""
    node_ip, ext_ip = node_server, lab.status()["outside"]["ip"]

    def connect(sport: int) -> bool:
        return lab.exec("ext", [sys.executable, "-c", CONNECT_FROM, node_ip, str(sport)],
                        capture_output=True, text=True).stdout.strip() == "node1"

    def tracked(sport: int) -> bool:
        table = lab.exec("node1", ["cat", "/proc/net/nf_conntrack"], capture_output=True, text=True,
                         check=True).stdout
        return any(f"src={ext_ip}" in line and f"sport={sport} dport=7070" in line for line in table.splitlines())

    sport = 41000 + os.getpid() % 1000
    try:
        # conntrack runs in the node once the filter table has stateful rules: a tracked
        # connection is seen first (the check can tell)
        apply(lab, doc("HostEndpoint", "node1-uplink", node="node1", interfaceName="eth0", labels={"role": "uplink"}),
              doc("GlobalNetworkPolicy", "allow-7070", order=10, selector="role == 'uplink'", types=["Ingress"],
                  ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [7070]}}]))
        assert eventually(lambda: connect(sport), True, 6) and tracked(sport)
        apply(lab, doc("GlobalNetworkPolicy", "deny-all", order=5, selector="role == 'uplink'",
                       types=["Ingress", "Egress"], ingress=[{"action": "Deny"}], egress=[{"action": "Deny"}]))
        assert eventually(lambda: connect(sport + 1), False, 6)
        apply(lab, doc("GlobalNetworkPolicy", "raw-7070", order=1, selector="role == 'uplink'", doNotTrack=True,
                       applyOnForward=True, types=["Ingress", "Egress"],
                       ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [7070]}},
                                {"action": "Deny"}],
                       egress=[{"action": "Allow", "destination": {"nets": [f"{ext_ip}/32"]}}, {"action": "Deny"}]))
        assert eventually(lambda: connect(sport + 2), True, 6), "the untracked policy did not let it through"
        assert connect(sport + 3) and not tracked(sport + 3), "conntrack holds the untracked connection"
        # the untracked stage denies the rest, every packet: BGP lives on its failsafe port
        # (both ways: the session's packets and their replies) past the hold time
        t0 = time.monotonic()
        while time.monotonic() - t0 < HOLD + 3:
            assert established(lab), "BGP session went down under an untracked deny"
            time.sleep(1)
        lab.ctl("delete", "globalnetworkpolicy", "raw-7070")
        assert eventually(lambda: connect(sport + 4), False, 6)
    finally:
        for kind, name in (("globalnetworkpolicy", "raw-7070"), ("globalnetworkpolicy", "deny-all"),
                           ("globalnetworkpolicy", "allow-7070"), ("hostendpoint", "node1-uplink")):
            lab.ctl("delete", kind, name, "--ignore-not-found")
