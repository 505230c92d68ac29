"""tortie itself in the lab: agents, the CNI plugin and BGP between two nodes.

These need the agent (with its CNI server and BGP speaker) and the CNI plugin; until
those packages exist the tests are skipped with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tortie.lab import nsutil, state, topology

pytestmark = pytest.mark.slow


def _wait_matrix(lab, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while True:
        m = lab.matrix(80)
        if m.ok or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def test_two_nodes_full_mesh(lab_factory):
    lab = lab_factory(nodes=2, tor="none")
    for node, pod in (("node1", "default/a"), ("node1", "default/b"), ("node2", "default/c")):
        lab.pod_add(node, pod)
    m = _wait_matrix(lab)
    assert m.ok, m.render()
    lab.down()


@pytest.mark.parametrize("tor,uplinks", [("bird", 1), ("frr", 1), ("bird", 2), ("frr", 2)])
def test_two_nodes_behind_routers_and_the_outside_host(lab_factory, tor, uplinks):
    lab = lab_factory(nodes=2, tor=tor, uplinks=uplinks)
    lab.pod_add("node1", "default/a")
    lab.pod_add("node2", "default/b")
    deadline = time.monotonic() + 15
    while {st for sessions in lab.bgp_sessions().values() for st in sessions.values()} != {"Established"}:
        assert time.monotonic() < deadline, lab.bgp_sessions()
        time.sleep(0.2)
    m = _wait_matrix(lab)
    assert m.ok, m.render()
    assert "ext" in m.sources
    assert {st for t in lab.status()["tors"] for st in t["sessions"].values()} == {"Established"}
    if uplinks == 2:
        _dead_router_is_routed_around(lab)
    lab.down()


def _dead_router_is_routed_around(lab):
    """The router that carries node1's etcd connection dies: node1's own traffic (a pod ADD
    writes etcd) goes by the other uplink within seconds, as on a real dual-homed host."""
    plan = lab.plan()
    conns = lab.exec("node1", ["ss", "-Htn", "state", "established", "dst", plan.ctl_address.split("/")[0]],
                     capture_output=True, text=True, check=True).stdout
    segment = {t.name: t.segment.subnet for t in plan.tors}
    sources = {ipaddress.ip_address(re.findall(r"(\d+\.\d+\.\d+\.\d+)\]?:\d+", c)[0]) for c in conns.splitlines()}
    victim = next(name for name, subnet in segment.items()
                  if any(a in ipaddress.ip_network(subnet) for a in sources))
    lab.router_stop(victim)
    deadline = time.monotonic() + 20
    while True:
        try:
            lab.pod_add("node1", f"default/after-{victim}")
            break
        except Exception:
            assert time.monotonic() < deadline, f"node1 could not write etcd 20 s after {victim} died"
            time.sleep(1)
    lab.router_start(victim)


def test_make_demo_runs_and_cleans_up(new_lab_name):
    name = new_lab_name("d")
    r = subprocess.run([sys.executable, "-m", "tortie.lab.demo", "--name", name], capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "56/56 probes answered" in r.stdout and "everything removed" in r.stdout
    assert "10.65." in r.stdout.split("== 5.")[1].split("== 6.")[0]  # the router learned the blocks
    assert not [n for n in nsutil.netns_list() if topology.is_lab_netns(name, n)]
    assert not os.path.exists(state.lab_dir(name))


def test_agent_killed_and_restarted_keeps_pods_working(lab_factory):
    """kill -9 of a node's agent leaves its pods reachable; the restarted agent adopts them."""
    lab = lab_factory(nodes=2, tor="bird")
    ip_a = lab.pod_add("node1", "default/a")
    lab.pod_add("node2", "default/b")
    assert _wait_matrix(lab).ok
    old = lab.state().proc("agent:node1")
    lab.agent_stop("node1", signal.SIGKILL)
    assert not state.alive(old) and lab.state().proc("agent:node1") is None
    assert lab.probe("default/b", "default/a", 80).ok  # the kernel keeps what the agent set up
    lab.agent_start("node1")
    assert lab.state().proc("agent:node1").pid != old.pid
    lab.pod_add("node1", "default/c")
    m = _wait_matrix(lab)
    assert m.ok, m.render()
    assert lab.pod("default/a").address == ip_a
    lab.down()
