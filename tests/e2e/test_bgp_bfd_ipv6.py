"""BFD on the IPv6 sessions of a dual-stack lab (`up --bfd --ip-family dual`): the routers
run a BFD session with each node's IPv4 and IPv6 address, the nodes' BGPPeers of both
families ask for it. The router powered off: BFD Down tears the IPv6 session down and
takes the IPv6 routes it gave out of the node's kernel within a second, not the 9 s hold
time. Once behind BIRD, once behind FRR, where BFD is switched on in the running lab.
"""

from __future__ import annotations

import json
import time

import pytest
from lab_fixtures import agent_metric, eventually

from tortie.lab import family

pytestmark = pytest.mark.slow


def wait_for(cond, what: str, seconds: float) -> None:
    assert eventually(lambda: bool(cond()), True, seconds), f"not within {seconds}s: {what}"


def learned6(lab, node: str, addr: str) -> list[dict]:
    out = lab.exec(node, ["ip", "-6", "-j", "route", "show", "match", addr, "proto", "77"], capture_output=True,
                   text=True, check=True).stdout
    return [r for r in json.loads(out or "[]") if r.get("type", "unicast") == "unicast" and r.get("gateway")]


@pytest.mark.parametrize("tor,live", [("bird", False), ("frr", True)])
def test_bfd_down_tears_the_ipv6_session_down_within_a_second(lab_factory, tor, live):
    lab = lab_factory(nodes=2, tor=tor, bfd=not live, ip_family="dual")
    if live:
        lab.router_bfd(True)
    lab.pod_add("node1", "default/a")
    lab.pod_add("node2", "default/b")
    b6 = lab.pod("default/b").address_of(6)
    plan = lab.plan()
    router = plan.tors[0]
    links = plan.links_of(router.name)
    node_ips = {a for _n, link in links for a in (link.ip, family.v6(link.ip))}
    wait_for(lambda: {lab.bfd_sessions(router.name).get(ip) for ip in node_ips} == {"Up"},
             f"{tor}: BFD Up with both nodes over both families", 15)
    gw6 = family.v6(links[0][1].gateway)
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bfd_up", peer=gw6) == 1, "node1: BFD Up over IPv6", 10)
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bgp_session_up", peer=gw6) == 1, "node1: IPv6 session", 15)
    wait_for(lambda: learned6(lab, "node1", b6), "node1 learns b's IPv6 block from the router", 15)

    lab.router_stop(router.name)
    t0 = time.monotonic()
    while learned6(lab, "node1", b6) and time.monotonic() - t0 < 3:  # fine-grained: this is the figure
        time.sleep(0.02)
    gone = time.monotonic() - t0
    assert gone < 1.0, gone  # BFD's 300 ms, not the 9 s hold time
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bgp_session_up", peer=gw6) == 0, "node1: torn down", 3)
    assert agent_metric(lab, "node1", "tortie_bfd_up", peer=gw6) == 0
    lab.router_start(router.name)
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bfd_up", peer=gw6) == 1, "node1: BFD Up again", 20)
    wait_for(lambda: learned6(lab, "node1", b6), "node1: the IPv6 route back", 20)
    lab.down()
