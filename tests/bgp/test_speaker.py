"""BGPSpeaker end to end: real ExaBGP, real BIRD, real kernel namespaces."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import pytest
from bgphelpers import bird_bgp, lan, veth, wait_for

from tortie.ctl.main import main as ctl_main

pytestmark = pytest.mark.slow

AS = 64512
A, R = "10.91.0.1", "10.91.0.2"  # the speaker's node, the BIRD router


def start_speaker(lab, ns: str, name: str, address: str, **extra):
    sp = lab.speaker(ns, name)
    sp.start(node_name=name, router_id=address, local_as=AS, local_address=address, **extra)
    return sp


def bird_peer(address: str, *, password=None, kind="global", accept=("10.50.0.0/16",), passive=False) -> dict:
    return {"address": address, "as_number": AS, "kind": kind, "password": password, "name": "tor",
            "accept_prefixes": list(accept), "passive": passive}


@pytest.fixture
def pair(netns):
    """Two namespaces on one veth: the node (A) and a router (R)."""
    node, router = netns.new("node"), netns.new("tor")
    veth(netns, node, f"{A}/24", router, f"{R}/24")
    return node, router


def tor(lab, router: str, *, password=None, statics=("10.50.0.0/24", "10.60.0.0/24")):
    body = "protocol static s4 { ipv4; " + "".join(f"route {s} blackhole; " for s in statics) + "}\n"
    return lab.bird(router, "bird", R, body + bird_bgp("n1", R, AS, A, AS, password=password))


def test_exchange_with_bird(lab, pair):
    node, router = pair
    bird = tor(lab, router)
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])
    sp.exports(["10.244.1.0/26", "10.244.9.7/32"], ["64512:100", "64512:7:9"])
    sp.wait_state(R)
    wait_for(lambda: {"10.244.1.0/26", "10.244.9.7/32"} <= bird.kernel_routes(), what="exports in BIRD's kernel")
    # community and next hop arrive as sent
    detail = bird.birdc("show", "route", "10.244.1.0/26", "all")
    assert "(64512,100)" in detail and "(64512, 7, 9)" in detail and A in detail, detail
    # imports: only what the peer's acceptPrefixes allows
    wait_for(lambda: sp.routes == {"10.50.0.0/24": [R]}, what="accepted import reaches on_routes")
    st = sp.peer(R)
    assert st["kind"] == "global" and st["prefixes_sent"] == 2 and st["prefixes_received"] == 2
    assert st["prefixes_filtered"] == 1  # 10.60.0.0/24: counted, not used
    # the diff: one withdrawn, one added, the unchanged one untouched
    sp.exports(["10.244.1.0/26", "10.244.2.0/26"], ["64512:100"])
    wait_for(lambda: bird.kernel_routes() >= {"10.244.1.0/26", "10.244.2.0/26"}
             and "10.244.9.7/32" not in bird.kernel_routes(), what="diff applied")
    assert sp.status()["peers"][0]["prefixes_sent"] == 2


def test_external_peer_routes_inside_the_pools_are_imported_without_accept_prefixes(lab, pair):
    node, router = pair
    tor(lab, router, statics=("10.65.3.0/26", "10.65.1.9/32", "10.60.0.0/24"))
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R, accept=())])
    sp.exports([])
    sp.wait_state(R)
    wait_for(lambda: sp.routes is not None, what="the first learned table")
    time.sleep(0.5)
    assert sp.routes == {}  # no acceptPrefixes and no pools: nothing
    sp.import_pools(["10.65.0.0/16"])
    wait_for(lambda: sp.routes == {"10.65.3.0/26": [R], "10.65.1.9/32": [R]},
             what="pod routes from the router imported once the pool is known")


def test_a_default_route_set_apart_for_egress_never_reaches_the_learned_table(lab, pair):
    """IPPool egress.fromPeers: the router's default route goes to the egress view only,
    even when the peer's acceptPrefixes would take it; a withdraw or a session that drops
    (graceful restart or not) takes it out of the view at once."""
    node, router = pair
    bird = tor(lab, router, statics=("0.0.0.0/0", "10.50.0.0/24"))
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R, accept=("0.0.0.0/0",))])  # would accept anything, the default too
    sp.exports([])
    sp.wait_state(R)
    wait_for(lambda: sp.routes == {"0.0.0.0/0": [R], "10.50.0.0/24": [R]}, what="both in the learned table")
    sp.egress_imports({R: ["0.0.0.0/0"]})
    wait_for(lambda: sp.routes == {"10.50.0.0/24": [R]} and sp.egress == {R: {"0.0.0.0/0": R}},
             what="the default moves from the learned table to the egress view")
    # withdrawn by the router: out of the view
    with open(bird.conf) as f:
        conf = f.read()
    with open(bird.conf, "w") as f:
        f.write(conf.replace("route 0.0.0.0/0 blackhole; ", ""))
    assert "Reconfigured" in bird.birdc("configure")
    wait_for(lambda: sp.egress == {}, what="the withdraw empties the egress view")
    assert sp.routes == {"10.50.0.0/24": [R]}
    with open(bird.conf, "w") as f:
        f.write(conf)
    assert "Reconfigured" in bird.birdc("configure")
    wait_for(lambda: sp.egress == {R: {"0.0.0.0/0": R}}, what="announced again")
    # the session drops (the router keeps graceful restart: the learned table keeps its
    # routes as stale, the egress view does not)
    bird.birdc("disable", "n1")
    wait_for(lambda: sp.egress == {}, what="a session that is down counts for nothing")
    assert sp.routes == {"10.50.0.0/24": [R]}
    bird.birdc("enable", "n1")
    wait_for(lambda: sp.egress == {R: {"0.0.0.0/0": R}}, what="back with the session")
    sp.egress_imports({})  # no pool takes it: the acceptPrefixes decide again
    wait_for(lambda: sp.routes == {"0.0.0.0/0": [R], "10.50.0.0/24": [R]} and sp.egress == {},
             what="the default back in the learned table")


def test_bfd_timers_alone_do_not_redefine_the_session(lab, pair):
    """A BGPPeer that only gains or loses `bfd` (the agent's business, not ExaBGP's) keeps its
    session, and the speaker still says it is established (it once said 'reconfigured' and
    idle for good, while ExaBGP kept the session up)."""
    node, router = pair
    bird = tor(lab, router)
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])
    sp.exports([])
    since = sp.wait_state(R)["since"]
    sp.peers([{**bird_peer(R), "bfd": [300, 300, 3]}])
    time.sleep(1.0)
    st = sp.peer(R)
    assert st["state"] == "established" and st["since"] == since, st
    assert bird.established("n1")


def node_status(etcd, etcd_config, doc: dict, *args: str) -> tuple[int, str]:
    """Publish a speaker's status as the agent does, and read it back with tortiectl."""
    doc = {k: v for k, v in doc.items() if k not in ("event", "synced", "rib_ready")}
    etcd.put(f"{etcd_config.prefix}status/bgp/{doc['node']}", json.dumps(doc))
    out = io.StringIO()
    rc = ctl_main(["--etcd-endpoints", ",".join(etcd_config.endpoints), "--etcd-prefix", etcd_config.prefix,
                   "node", "status", *args], out=out, err=out)
    return rc, out.getvalue()


def test_md5_wrong_then_right(lab, pair, etcd, etcd_config):
    node, router = pair
    bird = tor(lab, router, password="s3cret")
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R, password="wrong")])
    sp.exports(["10.244.1.0/26"])
    st = wait_for(lambda: "MD5" in (p := sp.peer(R))["last_error"] and p,
                  timeout=25, what="status explains the MD5 failure")
    assert st["state"] != "established" and not bird.established("n1")
    rc, text = node_status(etcd, etcd_config, sp.status(), "n1")
    assert rc == 0 and "MD5" in text and "global" in text, text
    sp.peers([bird_peer(R, password="s3cret")])
    sp.wait_state(R)
    assert sp.peer(R)["last_error"] == ""
    wait_for(lambda: "10.244.1.0/26" in bird.kernel_routes(), what="route over the MD5 session")
    rc, text = node_status(etcd, etcd_config, sp.status(), "n1", "-o", "json")
    peer = json.loads(text)[0]["peers"][0]
    assert rc == 0 and peer["state"] == "established" and peer["prefixes_sent"] == 1


def test_connect_refused_is_reported(lab, pair):
    node, _router = pair
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])  # nothing listens on R:179
    wait_for(lambda: "connect refused" in sp.peer(R)["last_error"], timeout=20, what="connect refused")


def _watch(bird, prefix: str, stop: threading.Event, missing: list[float]) -> None:
    while not stop.is_set():
        if prefix not in bird.kernel_routes():
            missing.append(time.monotonic())
        time.sleep(0.05)


def test_exabgp_killed_restarts_and_peer_keeps_routes(lab, pair):
    node, router = pair
    bird = tor(lab, router)
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])
    prefixes = [f"10.244.{i}.0/26" for i in range(20)]
    sp.exports(prefixes)
    sp.wait_state(R)
    wait_for(lambda: set(prefixes) <= bird.kernel_routes(), what="exports in BIRD")
    pid = sp.status()["exabgp_pid"]
    stop, missing = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(bird, prefixes[0], stop, missing))
    watcher.start()
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (s := sp.status())["restarts"] == 1 and s["exabgp_pid"] not in (None, pid), 20,
                 what="exabgp restarted")
        sp.wait_state(R, timeout=30)
        time.sleep(1.5)  # BIRD has our end-of-RIB by now: nothing may have been flushed
    finally:
        stop.set()
        watcher.join()
    assert not missing, "BIRD dropped a route during graceful restart"
    assert set(prefixes) <= bird.kernel_routes()
    assert sp.peer(R)["prefixes_sent"] == 20


def test_peer_change_keeps_other_sessions(lab, netns):
    node, r1, r2 = netns.new("node"), netns.new("tor1"), netns.new("tor2")
    R2 = "10.91.0.3"
    lan(node, f"{A}/24", [(r1, f"{R}/24"), (r2, f"{R2}/24")])
    static = "protocol static s4 { ipv4; route 10.50.0.0/24 blackhole; }\n"
    b1 = lab.bird(r1, "bird1", R, static + bird_bgp("n1", R, AS, A, AS))
    b2 = lab.bird(r2, "bird2", R2, static + bird_bgp("n1", R2, AS, A, AS))
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])
    sp.exports(["10.244.1.0/26"])
    sp.wait_state(R)
    # BIRD's own "since" moves once more as its side settles (seen 1 ms later under load):
    # read it once the session has carried the export
    wait_for(lambda: "10.244.1.0/26" in b1.kernel_routes(), what="the export in BIRD's kernel")
    since = sp.peer(R)["since"]
    bird_since = b1.protocol("n1")[4:6]
    # add a second peer: the first session stays
    sp.peers([bird_peer(R), bird_peer(R2)])
    sp.wait_state(R2)
    wait_for(lambda: "10.244.1.0/26" in b2.kernel_routes(), what="new peer gets the existing exports")
    # remove it again, and change nothing about the first
    sp.peers([bird_peer(R)])
    wait_for(lambda: not b2.established("n1"), what="removed peer's session closed")
    time.sleep(1)
    assert sp.peer(R)["since"] == since and sp.peer(R)["state"] == "established"
    assert b1.protocol("n1")[4:6] == bird_since, "BIRD saw the unchanged session restart"
    # announcements still flow to the unchanged peer after the reloads
    sp.exports(["10.244.1.0/26", "10.244.3.0/26"])
    wait_for(lambda: "10.244.3.0/26" in b1.kernel_routes(), what="export after reload")


def test_hold_timer_expiry_is_reported(lab, pair, netns):
    node, router = pair
    tor(lab, router)  # hold time 9 s, which the session negotiates
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R)])
    sp.exports(["10.244.1.0/26"])
    sp.wait_state(R)
    # the router goes silent: BGP packets dropped both ways in its namespace
    rules = ("add table inet tt; add chain inet tt in { type filter hook input priority 0; }; "
             "add chain inet tt out { type filter hook output priority 0; }; "
             "add rule inet tt in tcp sport 179 drop; add rule inet tt in tcp dport 179 drop; "
             "add rule inet tt out tcp sport 179 drop; add rule inet tt out tcp dport 179 drop")
    netns.run(router, "nft", rules)
    st = wait_for(lambda: (p := sp.peer(R))["state"] != "established" and p, timeout=20,
                  what="session dropped by the hold timer")
    assert "hold timer expired" in st["last_error"], st


def test_second_uplink_speaks_from_its_own_address(lab, netns):
    """A router on another segment expects the node's address on that segment."""
    node, r1, r2 = netns.new("node"), netns.new("tor1"), netns.new("tor2")
    veth(netns, node, f"{A}/24", r1, f"{R}/24")
    veth(netns, node, "10.95.0.1/24", r2, "10.95.0.2/24")
    b1 = lab.bird(r1, "bird1", R, bird_bgp("n1", R, AS, A, AS))
    b2 = lab.bird(r2, "bird2", "10.95.0.2", bird_bgp("n1", "10.95.0.2", AS, "10.95.0.1", AS))
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([bird_peer(R), bird_peer("10.95.0.2")])
    sp.exports(["10.244.1.0/26"])
    sp.wait_state(R)
    sp.wait_state("10.95.0.2")
    wait_for(lambda: "10.244.1.0/26" in b1.kernel_routes() and "10.244.1.0/26" in b2.kernel_routes(),
             what="both routers have the export")
    # next hop self is the node's address on each segment
    assert "via 10.95.0.1" in b2.birdc("show", "route", "10.244.1.0/26")
    assert f"via {A}" in b1.birdc("show", "route", "10.244.1.0/26")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_peer_over_its_max_prefixes_is_shut_for_a_while(lab, pair):
    """Issue 12 item 3: a router floods 20,000 prefixes into a session with maxPrefixes
    1000: the session is closed (a Cease 1 is sent, though with the flood still in flight
    the router mostly sees the connection reset), nothing it sent is kept, the status says why, and the speaker's memory does not grow with the flood. It
    stays shut for the hold; a settings change that ExaBGP does not see (the limit) keeps a
    session as it is; with the limit raised the peer comes back after the hold."""
    node, router = pair
    flood = [f"10.50.{i // 250}.{i % 250}/32" for i in range(20_000)]
    bird = tor(lab, router, statics=flood)
    sp = start_speaker(lab, node, "n1", A, prefix_limit_hold=5)
    sp.exports([])
    rss0 = _rss_mb(sp.proc.pid)
    sp.peers([bird_peer(R) | {"max_prefixes": 1000}])
    st = wait_for(lambda: "maxPrefixes 1000 exceeded" in (p := sp.peer(R))["last_error"] and p, 30,
                  what="the session closed for its prefix limit")
    assert st["state"] != "established" and st["prefixes_received"] == 0, st
    assert not sp.routes
    grew = _rss_mb(sp.proc.pid) - rss0
    assert grew < 15, f"speaker RSS grew {grew:.1f} MB under a 20,000-prefix flood"
    time.sleep(2)  # held: ExaBGP does not dial it again
    assert not bird.established("n1") and "exceeded" in sp.peer(R)["last_error"]
    # the limit raised: after the hold the session comes back with every route
    sp.peers([bird_peer(R) | {"max_prefixes": 30_000}])
    sp.wait_state(R, timeout=20)
    wait_for(lambda: sp.routes is not None and len(sp.routes) == 20_000, 30, what="the 20,000 routes")
    since = bird.protocol("n1")[4:6]
    sp.peers([bird_peer(R) | {"max_prefixes": 40_000}])  # no change to ExaBGP's neighbor
    time.sleep(1)
    assert bird.protocol("n1")[4:6] == since and sp.peer(R)["state"] == "established"
    print(f"speaker RSS: +{grew:.1f} MB through the cut flood, "
          f"+{_rss_mb(sp.proc.pid) - rss0:.1f} MB holding the 20,000 routes")


def bird_table(bird) -> dict[str, str]:
    """BIRD's BGP routes with their attributes: prefix -> the `show route all` block."""
    out, prefix, blocks = bird.birdc("show", "route", "all"), None, {}
    for line in out.splitlines():
        if line[:1].isdigit():
            prefix = line.split()[0]
            blocks[prefix] = line
        elif prefix and line.startswith(("\t", " ")):
            blocks[prefix] += "\n" + line.strip()
    return {p: b for p, b in blocks.items() if "BGP.as_path" in b}


def as_path(block: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in block.splitlines() if line.startswith("BGP.as_path"))


def test_policies_pick_the_peers_and_carry_communities_and_prepending(lab, netns):
    """Per-prefix export policies: a prefix goes only to its policy's peers (withdrawn
    exactly from a peer it leaves), with its communities, and the AS-path prepended towards
    a peer of another AS only; a session that comes back gets its own set, nothing more."""
    node, r1, r2 = netns.new("node"), netns.new("tor1"), netns.new("tor2")
    R2 = "10.91.0.3"
    lan(node, f"{A}/24", [(r1, f"{R}/24"), (r2, f"{R2}/24")])
    b1 = lab.bird(r1, "bird1", R, bird_bgp("n1", R, 65001, A, AS))  # eBGP
    b2 = lab.bird(r2, "bird2", R2, bird_bgp("n1", R2, AS, A, AS))  # iBGP
    sp = start_speaker(lab, node, "n1", A)
    sp.peers([{**bird_peer(R), "as_number": 65001, "name": "tor1"}, {**bird_peer(R2), "name": "tor2"}])
    pool_a = {"cidr": "10.244.0.0/16", "peers": [R], "communities": ["65010:7", "65010:1:2"], "prepend": 2}
    egress = {"cidr": "192.0.2.9/32", "peers": [R2]}
    prefixes = ["10.244.1.0/26", "10.244.9.7/32", "10.245.1.0/26", "192.0.2.9/32"]
    sp.exports(prefixes, ["64512:100"], [pool_a, egress])
    sp.wait_state(R)
    sp.wait_state(R2)
    wait_for(lambda: len(bird_table(b1)) == 3 and len(bird_table(b2)) == 2, what="both routers' tables")
    t1, t2 = bird_table(b1), bird_table(b2)
    assert set(t1) == {"10.244.1.0/26", "10.244.9.7/32", "10.245.1.0/26"}, t1
    assert set(t2) == {"10.245.1.0/26", "192.0.2.9/32"}, t2  # the pool's blocks never reach tor2
    for p in ("10.244.1.0/26", "10.244.9.7/32"):
        assert as_path(t1[p]) == "64512 64512 64512", t1[p]  # ours once + twice prepended
        assert "(65010,7)" in t1[p] and "(65010, 1, 2)" in t1[p] and "(64512,100)" in t1[p], t1[p]
    assert as_path(t1["10.245.1.0/26"]) == "64512" and "65010" not in t1["10.245.1.0/26"]
    assert {sp.peer(R)["prefixes_sent"], sp.peer(R2)["prefixes_sent"]} == {3, 2}

    # The pool moves to tor2 (iBGP: no prepending there): withdrawn from tor1, nothing else moves.
    sp.exports(prefixes, ["64512:100"], [{**pool_a, "peers": [R2], "prepend": 1}, egress])
    wait_for(lambda: set(bird_table(b1)) == {"10.245.1.0/26"}
             and set(bird_table(b2)) == {"10.244.1.0/26", "10.244.9.7/32", "10.245.1.0/26", "192.0.2.9/32"},
             what="the pool's prefixes moved from tor1 to tor2")
    t2 = bird_table(b2)
    assert as_path(t2["10.244.1.0/26"]) == "" and "(65010,7)" in t2["10.244.1.0/26"], t2

    # tor1's session restarts: it gets its own set again, and only that.
    since = sp.peer(R)["since"]
    b1.birdc("restart", "n1")
    wait_for(lambda: (p := sp.peer(R))["since"] != since and p["state"] == "established", 30,
             what="tor1's session back")
    wait_for(lambda: b1.established("n1") and set(bird_table(b1)) == {"10.245.1.0/26"}, what="tor1 re-learned")
    time.sleep(1)
    assert set(bird_table(b1)) == {"10.245.1.0/26"}
    assert sp.peer(R)["prefixes_sent"] == 1 and sp.peer(R2)["prefixes_sent"] == 4
