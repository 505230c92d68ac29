"""Issue 12, item 2: etcd gone (killed, or frozen with SIGSTOP) on a 2-node lab with a
BGP router. While it is gone: no probe between the nodes' pods is lost, routes, rules,
nftables and the router's sessions and routes stay as they were, CNI ADD answers code 11
within 2 s, DEL of a known pod succeeds, readiness is 503 with the `datastore` condition
while liveness stays 200. Within 5 s of etcd's return: ready again, ADD works, the
deleted pod's endpoint and address are gone, and `tortiectl ipam check` is clean.

The outage is short by default so CI stays fast; TORTIE_OUTAGE_SECONDS=60 makes both
cases the issue's long form.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import time

import faulthelpers
import pytest
from faulthelpers import ADD_ANSWER, Prober, converged, ipam_check, readiness, timed_add, wait_until

from tortie.lab import routers

pytestmark = pytest.mark.slow

OUTAGE = {"kill": 20.0, "pause": 8.0}  # seconds; TORTIE_OUTAGE_SECONDS overrides both


def outage_seconds(mode: str) -> float:
    return faulthelpers.outage_seconds(OUTAGE[mode])


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, tor="bird")
    lab.pod_add("node1", "default/a")
    lab.pod_add("node2", "default/b")
    return lab


def dataplane(lab, skip: tuple[str, ...]) -> dict[str, str]:
    """Every node's routes, rules and nftables ruleset (without counters), the router's
    routes and BGP protocols (with their 'since' times): lines naming `skip` left out."""
    skip = (*skip, "fe80::", "ff00::")  # the kernel's own IPv6 link-local routes come and go with DAD

    def run(*cmd: str) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return "\n".join(line for line in out.splitlines() if not any(s and s in line for s in skip))

    plan = lab.plan()
    out = {}
    for n in plan.nodes:
        out[f"{n.name} routes"] = run("ip", "-n", n.netns, "route", "show", "table", "all")
        out[f"{n.name} rules"] = run("ip", "-n", n.netns, "rule")
        out[f"{n.name} nft"] = run("ip", "netns", "exec", n.netns, "nft", "-s", "list", "ruleset")
    for t in plan.tors:
        out[f"{t.name} routes"] = run("ip", "-n", t.netns, "route")
        out[f"{t.name} bgp"] = routers.birdc(t.netns, lab._router(t).control, "show", "protocols")
    return out


@pytest.mark.parametrize("mode", ["kill", "pause"])
def test_etcd_outage(lab, mode):
    victim = f"default/v-{mode}"
    victim_ip = lab.pod_add("node1", victim)
    victim_if = lab.pod(victim).host_ifname
    probers = [Prober(lab, "default/a", "default/b"), Prober(lab, "default/b", "default/a")]
    assert all(p.lab.probe(p.src, p.dst, 80).ok for p in probers)
    before = dataplane(lab, skip=(f"{victim_ip} ", victim_if))
    for p in probers:
        p.start()
    figures: dict[str, float | None] = {}
    gone = time.monotonic()
    try:
        if mode == "kill":
            lab.etcd_stop(sig=signal.SIGKILL)
        else:
            lab.etcd_pause()
        try:
            # At once, before the agent may have noticed: a frozen etcd answers nothing at all.
            took, error = timed_add(lab, "node2")
            figures["ADD answered"] = took
            assert "code 11" in error and took < ADD_ANSWER, (took, error)
            # Readiness says so on both nodes; liveness stays.
            figures["not ready"] = wait_until(
                lambda: all(readiness(lab, n)[0] == 503 for n in ("node1", "node2")), 5.0, since=gone)
            assert figures["not ready"] is not None, readiness(lab, "node1")
            body = readiness(lab, "node1")[1]
            assert "etcd unreachable" in body["components"]["datastore"]["notReady"], body
            assert all(lab.http_get(n, 9099, "/liveness")[0] == 200 for n in ("node1", "node2"))

            took, error = timed_add(lab, "node1")
            figures["ADD answered when known"] = took
            assert "code 11" in error and took < 0.5, (took, error)

            t0 = time.monotonic()
            lab.pod_del(victim)  # the kernel side now, the datastore side when etcd is back
            figures["DEL"] = time.monotonic() - t0
            assert victim_if not in subprocess.run(["ip", "-n", lab.node("node1").netns, "link"],
                                                   capture_output=True, text=True).stdout

            time.sleep(max(0.0, outage_seconds(mode) - (time.monotonic() - gone)))
            during = dataplane(lab, skip=(f"{victim_ip} ", victim_if))
            assert all(lab.http_get(n, 9099, "/liveness")[0] == 200 for n in ("node1", "node2"))
        finally:
            if mode == "kill":
                lab.etcd_start()  # returns once etcd is healthy
            else:
                lab.etcd_resume()
        figures.update(converged(lab, ("node1", "node2"), victim, ("node2", f"default/after-{mode}"),
                                 time.monotonic()))
    finally:
        for p in probers:
            p.halt.set()
        for p in probers:
            p.join(10)
    print(f"etcd {mode} for {outage_seconds(mode):.0f}s: "
          + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}s'}" for k, v in figures.items()))
    assert figures["ready again"] is not None, readiness(lab, "node1")
    assert figures["ADD works"] is not None
    assert figures["victim released"] is not None, ipam_check(lab)
    assert [f for p in probers for f in p.failed] == []
    assert all(p.sent >= 10 * outage_seconds(mode) * 0.5 for p in probers), [p.sent for p in probers]
    changed = {k: "\n".join(difflib.unified_diff(before[k].splitlines(), during[k].splitlines(), lineterm=""))
               for k in before if during.get(k) != before[k]}
    if changed:  # say why: the router's and the agents' own words
        logs = {}
        for name in ("tor1", "agent-node1", "agent-node2"):
            with open(os.path.join(lab.state().dir, "logs", f"{name}.log"), errors="replace") as f:
                logs[name] = [line for line in f.read().splitlines()[-400:]
                              if re.search(r"bgp|BGP|session|peer|exabgp|error", line)][-15:]
        pytest.fail(f"dataplane changed: {changed}\n" + json.dumps(logs, indent=1))
    assert all(st == "Established" for per in lab.bgp_sessions().values() for st in per.values())
    out, allocations = ipam_check(lab)
    assert "No leaks found." in out, out
    assert allocations == len(lab.state().pods), out
    assert lab.probe("default/a", f"default/after-{mode}", 80).ok
