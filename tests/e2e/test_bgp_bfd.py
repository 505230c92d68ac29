"""Issue 11 item 4: BFD on BGP sessions with BIRD's and FRR's BFD (bfdd), end to end.

A two-node lab behind one router of each kind, BFD on (`up --bfd`: 100 ms x 3 on the
router, the lab's BGPPeers ask for the same). The router powered off: BFD Down tears the
nodes' sessions down and takes what the router announced out of their kernels within 1 s,
not the 9 s hold time; the router back: BFD and the sessions come back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from lab_fixtures import agent_metric

pytestmark = pytest.mark.slow


def wait_for(cond, what: str, seconds: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


def lab_cli(lab, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tortie.lab", *args, "--name", lab.name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def metric(lab, node: str, name: str, peer: str) -> float | None:
    return agent_metric(lab, node, name, peer=peer)


def learned(lab, node: str, addr: str) -> list[dict]:
    """Routes the agent installed from BGP (proto 77) that cover addr."""
    out = lab.exec(node, ["ip", "-j", "route", "show", "match", addr, "proto", "77"], capture_output=True,
                   text=True, check=True).stdout
    return [r for r in json.loads(out or "[]") if r.get("type", "unicast") == "unicast"]


@pytest.mark.parametrize("tor,live", [("bird", False), ("frr", True)])
def test_bfd_down_tears_the_session_down_and_withdraws_within_a_second(lab_factory, tor, live):
    """`live`: BFD turned on (and at the end off) in the running lab (`router bfd on|off`),
    else from the start (`up --bfd`); one router kind each, so both paths run."""
    lab = lab_factory(nodes=2, tor=tor, bfd=not live)
    if live:
        lab_cli(lab, "router", "bfd", "on")
    lab.pod_add("node1", "default/a")
    b = lab.pod_add("node2", "default/b")
    plan = lab.plan()
    router = plan.tors[0]
    gateway = next(link.gateway for _n, link in plan.links_of(router.name))
    node_ips = {link.ip for _n, link in plan.links_of(router.name)}
    wait_for(lambda: {lab.bfd_sessions(router.name).get(ip) for ip in node_ips} == {"Up"},
             f"{tor}: BFD Up with both nodes", 15)
    wait_for(lambda: metric(lab, "node1", "tortie_bfd_up", gateway) == 1, "node1: BFD Up", 10)
    wait_for(lambda: metric(lab, "node1", "tortie_bgp_session_up", gateway) == 1, "node1: session up", 15)
    wait_for(lambda: learned(lab, "node1", b), "node1 learns b's block from the router", 15)

    lab_cli(lab, "router", "stop", router.name)
    t0 = time.monotonic()
    wait_for(lambda: not learned(lab, "node1", b), "node1: the router's routes gone", 3)
    gone = time.monotonic() - t0
    assert gone < 1.0, gone  # BFD's 300 ms, not the 9 s hold time
    wait_for(lambda: metric(lab, "node1", "tortie_bgp_session_up", gateway) == 0, "node1: session torn down", 2)
    down = time.monotonic() - t0
    assert down < 3.0, down  # torn down by BFD, well before the hold time
    assert metric(lab, "node1", "tortie_bfd_up", gateway) == 0
    print(f"{tor}: routes withdrawn {gone * 1000:.0f} ms, session down {down * 1000:.0f} ms after power-off")

    lab_cli(lab, "router", "start", router.name)
    wait_for(lambda: metric(lab, "node1", "tortie_bfd_up", gateway) == 1, "node1: BFD Up again", 20)
    wait_for(lambda: metric(lab, "node1", "tortie_bgp_session_up", gateway) == 1, "node1: session back", 20)
    wait_for(lambda: learned(lab, "node1", b), "node1 learns b's block again", 20)
    if live:
        # BFD off on both sides: no BFD session, and BFD going away is no reason for us to
        # close the session (FRR itself may reset it on that change: it comes back)
        teardowns = torn_down(lab, "node1")
        lab_cli(lab, "router", "bfd", "off")
        wait_for(lambda: metric(lab, "node1", "tortie_bfd_up", gateway) is None, "node1: BFD session gone", 10)
        wait_for(lambda: not lab.bfd_sessions(router.name), f"{tor}: no BFD sessions", 10)
        time.sleep(1)
        assert torn_down(lab, "node1") == teardowns
        wait_for(lambda: metric(lab, "node1", "tortie_bgp_session_up", gateway) == 1, "node1: session up", 15)
        wait_for(lambda: learned(lab, "node1", b), "node1 keeps b's block", 15)
    lab.down()


def torn_down(lab, node: str) -> int:
    """How often node's agent closed a session for BFD (its log)."""
    with open(os.path.join(lab.state().dir, "logs", f"agent-{node}.log")) as f:
        return sum('"bgp session torn down"' in line for line in f)
