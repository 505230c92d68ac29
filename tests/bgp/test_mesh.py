"""Speakers peering with each other (the node-to-node mesh), peers from compute_peers."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from bgphelpers import lan, wait_for

from tortie.bgp.peers import compute_peers
from tortie.datastore.resources import BGPConfiguration, Node

pytestmark = pytest.mark.slow

ADDR = {"a": "10.93.0.1", "b": "10.93.0.2", "c": "10.93.0.3"}


def nodes(names) -> list[Node]:
    return [Node.from_resource({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": n},
                                "spec": {"bgp": {"ipv4Address": f"{ADDR[n]}/24"}}}) for n in names]


CONFIG = BGPConfiguration.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration",
                                         "metadata": {"name": "default"}, "spec": {}})


@pytest.fixture
def mesh(lab, netns):
    """Speakers for nodes a, b, c on one segment, peered by compute_peers."""
    hub = netns.new("sw")
    ns = {n: netns.new(n) for n in ADDR}
    lan(hub, "10.93.0.254/24", [(ns[n], f"{a}/24") for n, a in ADDR.items()])
    all_nodes = nodes(ADDR)
    speakers = {}

    def start(name: str):
        sp = lab.speaker(ns[name], name)
        sp.start(node_name=name, router_id=ADDR[name], local_as=64512, local_address=ADDR[name])
        me = next(n for n in all_nodes if n.name == name)
        sp.peers([dataclasses.asdict(p) for p in compute_peers(me, all_nodes, [], CONFIG)])
        speakers[name] = sp
        return sp

    for name in ADDR:
        start(name)
    return speakers, start


def test_mesh_exchange_and_ecmp(mesh):
    sp, _ = mesh
    sp["a"].exports(["10.244.1.0/26"])
    sp["b"].exports(["10.244.2.0/26", "10.245.0.0/24"])
    sp["c"].exports(["10.245.0.0/24"])
    for name in ADDR:
        for other, addr in ADDR.items():
            if other != name:
                st = sp[name].wait_state(addr)
                assert st["kind"] == "mesh"
    want_a = {"10.244.2.0/26": [ADDR["b"]], "10.245.0.0/24": [ADDR["b"], ADDR["c"]]}
    wait_for(lambda: sp["a"].routes == want_a, what="a learns b's block and the ECMP anycast")
    wait_for(lambda: (sp["b"].routes or {}).get("10.244.1.0/26") == [ADDR["a"]], what="b learns a's block")
    # withdraw on one side removes one ECMP leg
    sp["c"].exports([])
    wait_for(lambda: sp["a"].routes.get("10.245.0.0/24") == [ADDR["b"]], what="ECMP leg withdrawn")
    st = {p["peer"]: p for p in sp["a"].status()["peers"]}
    assert st[ADDR["b"]]["prefixes_received"] == 2 and st[ADDR["b"]]["prefixes_sent"] == 1
    # exactly one side of each pair is passive
    assert st[ADDR["b"]]["passive"] and st[ADDR["c"]]["passive"]
    assert not {p["peer"]: p for p in sp["c"].status()["peers"]}[ADDR["a"]]["passive"]


def test_agent_killed_peer_keeps_routes_until_reannounced(mesh):
    sp, start = mesh
    sp["a"].exports(["10.244.1.0/26", "10.244.7.8/32"])
    sp["b"].exports(["10.244.2.0/26"])
    want = {"10.244.1.0/26": [ADDR["a"]], "10.244.7.8/32": [ADDR["a"]]}
    wait_for(lambda: all((sp["b"].routes or {}).get(p) == nh for p, nh in want.items()), what="b has a's routes")
    exabgp_pid = sp["a"].status()["exabgp_pid"]
    killed_at = time.time()
    sp["a"].kill()  # kill -9 of the agent: its ExaBGP must go with it
    wait_for(lambda: sp["b"].peer(ADDR["a"])["state"] != "established", what="b sees a go down")
    assert sp["b"].peer(ADDR["a"])["stale"], "b keeps a's routes as stale"
    new_a = start("a")  # the restarted agent, at once, same state dir
    new_a.exports(["10.244.1.0/26", "10.244.7.8/32"])
    wait_for(lambda: not os.path.exists(f"/proc/{exabgp_pid}"), 5, what="old ExaBGP died with its agent")
    assert new_a.status()["restarts"] == 0, "the new ExaBGP had to be restarted"
    sp["b"].wait_state(ADDR["a"], timeout=30)
    wait_for(lambda: not sp["b"].peer(ADDR["a"])["stale"], what="a's end-of-RIB clears the stale mark")
    # b never lost a route from the kill to the end: every table it gave its agent had them
    for t, routes in sp["b"].route_history:
        if t >= killed_at - 1:
            assert all(routes.get(p) == nh for p, nh in want.items()), f"route lost at {t}: {routes}"
    assert all(sp["b"].routes.get(p) == nh for p, nh in want.items())
    # the restarted a learned b's block and released it once b's end-of-RIB came
    wait_for(lambda: (new_a.routes or {}).get("10.244.2.0/26") == [ADDR["b"]], what="new a learns b's block")
    assert new_a.status()["rib_ready"]


def test_withdrawn_while_down_is_not_replayed(mesh):
    """A prefix withdrawn while a session was down must not come back when it returns."""
    sp, _ = mesh
    sp["a"].exports(["10.244.1.0/26", "10.244.3.0/26"])
    wait_for(lambda: "10.244.3.0/26" in (sp["b"].routes or {}), what="b has both")
    # take b's side down by removing a from its peers, change a's exports, then restore
    b_node = next(n for n in nodes(ADDR) if n.name == "b")
    peers_b = [dataclasses.asdict(p) for p in compute_peers(b_node, nodes(ADDR), [], CONFIG)]
    sp["b"].peers([p for p in peers_b if p["address"] != ADDR["a"]])
    wait_for(lambda: sp["a"].peer(ADDR["b"])["state"] != "established", what="a sees b go")
    sp["a"].exports(["10.244.1.0/26"])
    sp["b"].peers(peers_b)
    sp["b"].wait_state(ADDR["a"], timeout=30)
    wait_for(lambda: (sp["b"].routes or {}).get("10.244.1.0/26") == [ADDR["a"]], what="b relearns")
    time.sleep(1)
    assert "10.244.3.0/26" not in sp["b"].routes


def test_route_reflector_passes_routes_between_clients(lab, netns):
    """Mesh off; r reflects: a and b only peer with r, yet learn each other's blocks with
    the originating node as next hop."""
    addrs = {"a": "10.94.0.1", "b": "10.94.0.2", "r": "10.94.0.9"}
    hub = netns.new("sw")
    ns = {n: netns.new(n) for n in addrs}
    lan(hub, "10.94.0.254/24", [(ns[n], f"{a}/24") for n, a in addrs.items()])
    all_nodes = [Node.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": n},
        "spec": {"bgp": {"ipv4Address": f"{a}/24", **({"routeReflectorClusterID": "1.0.0.1"} if n == "r" else {})}}})
        for n, a in addrs.items()]
    no_mesh = BGPConfiguration.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration",
                                              "metadata": {"name": "default"},
                                              "spec": {"nodeToNodeMeshEnabled": False}})
    sp = {}
    for me in all_nodes:
        s = lab.speaker(ns[me.name], me.name)
        s.start(node_name=me.name, router_id=addrs[me.name], local_as=64512, local_address=addrs[me.name],
                cluster_id=me.route_reflector_cluster_id)
        s.peers([dataclasses.asdict(p) for p in compute_peers(me, all_nodes, [], no_mesh)])
        sp[me.name] = s
    assert {p["peer"] for p in sp["a"].status()["peers"]} == {addrs["r"]}
    sp["a"].exports(["10.244.1.0/26"])
    sp["b"].exports(["10.244.2.0/26"])
    sp["r"].exports([])
    wait_for(lambda: sp["a"].routes == {"10.244.2.0/26": [addrs["b"]]}, what="a learns b's block via r")
    wait_for(lambda: sp["b"].routes == {"10.244.1.0/26": [addrs["a"]]}, what="b learns a's block via r")
    assert sp["r"].routes == {"10.244.1.0/26": [addrs["a"]], "10.244.2.0/26": [addrs["b"]]}
    kinds = {p["peer"]: p["kind"] for p in sp["r"].status()["peers"]}
    assert kinds == {addrs["a"]: "rr-client", addrs["b"]: "rr-client"}
    sp["b"].exports(["10.244.3.0/26"])  # a change travels through the reflector too
    wait_for(lambda: sp["a"].routes == {"10.244.3.0/26": [addrs["b"]]}, what="reflected withdraw + announce")


def test_dual_stack_mesh(lab, netns):
    """An IPv6 session per node pair next to the IPv4 one; each family's routes over its own."""
    v4 = {"a": "10.96.0.1", "b": "10.96.0.2"}
    v6 = {"a": "fd00:96::1", "b": "fd00:96::2"}
    hub = netns.new("sw")
    ns = {n: netns.new(n) for n in v4}
    lan(hub, "10.96.0.254/24", [(ns[n], f"{v4[n]}/24") for n in v4], {ns[n]: f"{v6[n]}/64" for n in v4})
    all_nodes = [Node.from_resource({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": n},
                                     "spec": {"bgp": {"ipv4Address": f"{v4[n]}/24", "ipv6Address": f"{v6[n]}/64"}}})
                 for n in v4]
    sp = {}
    for me in all_nodes:
        s = lab.speaker(ns[me.name], me.name)
        s.start(node_name=me.name, router_id=v4[me.name], local_as=64512, local_address=v4[me.name],
                local_address6=v6[me.name])
        s.peers([dataclasses.asdict(p) for p in compute_peers(me, all_nodes, [], CONFIG)])
        sp[me.name] = s
    sp["a"].exports(["10.244.1.0/26", "fd00:244:1::/122"])
    sp["b"].exports(["10.244.2.0/26", "fd00:244:2::/122"])
    sp["a"].wait_state(v6["b"])
    wait_for(lambda: sp["a"].routes == {"10.244.2.0/26": [v4["b"]], "fd00:244:2::/122": [v6["b"]]},
             what="a learns b's IPv4 and IPv6 blocks")
    wait_for(lambda: sp["b"].routes == {"10.244.1.0/26": [v4["a"]], "fd00:244:1::/122": [v6["a"]]},
             what="b learns a's blocks")
    st = {p["peer"]: p for p in sp["a"].status()["peers"]}
    assert st[v6["b"]]["prefixes_sent"] == 1 and st[v4["b"]]["prefixes_sent"] == 1


def _exabgp_wakeups(pid: int) -> tuple[int, float]:
    """ExaBGP's voluntary context switches (each sleep of its reactor is one) and CPU seconds."""
    switches, cpu = 0, 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            switches += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            cpu += int(f.read().split()[0]) / 1e9
    return switches, cpu


def test_idle_speaker_sleeps(mesh):
    """With every session up and nothing to do, ExaBGP's reactor sleeps until something it
    polls is ready (a peer's socket, the API) or a wake comes: at most a few turns a second.
    At the old `exabgp.reactor.speed` of 0.25 it turned ~400 times a second (5-7% of a core)."""
    sp, _ = mesh
    sp["a"].exports(["10.244.1.0/26"])
    for name in ADDR:
        for other, addr in ADDR.items():
            if other != name:
                sp[name].wait_state(addr)
    assert wait_for(lambda: "10.244.1.0/26" in (sp["c"].routes or {}), 10)
    time.sleep(1.0)  # the last acks and status lines
    pids = {name: sp[name].status()["exabgp_pid"] for name in ADDR}
    before = {name: _exabgp_wakeups(pid) for name, pid in pids.items()}
    window = 3.0
    time.sleep(window)
    for name, pid in pids.items():
        switches, cpu = (b - a for a, b in zip(before[name], _exabgp_wakeups(pid), strict=True))
        assert switches / window < 30, f"{name}: ExaBGP woke {switches / window:.0f} times a second idle"
        assert cpu / window < 0.01, f"{name}: ExaBGP used {100 * cpu / window:.2f}% of a core idle"
    # and it still acts at once on what it is told: a new export reaches the others
    t0 = time.monotonic()
    sp["b"].exports(["10.244.2.0/26"])
    assert wait_for(lambda: all("10.244.2.0/26" in (sp[n].routes or {}) for n in "ac"), 5)
    assert time.monotonic() - t0 < 1.0
