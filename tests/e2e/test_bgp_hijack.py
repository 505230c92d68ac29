"""Issue 12 item 3, end to end: a router announcing a live pod's /32 and a more specific of
a node's block does not move that pod's traffic. A two-node lab behind one BIRD; the
router originates both prefixes to every node. Probes from the other node's pod and from
the outside host keep reaching the right pod; the node that owns the block installs
neither route, says so in node status and counts them."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from lab_fixtures import agent_metric

pytestmark = pytest.mark.slow


def wait_for(cond, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.1)


def learned_routes(lab, node: str) -> set[str]:
    """tortie's routes through a gateway (learned over BGP), not its pods' and blackholes."""
    out = lab.exec(node, ["ip", "-j", "route", "show", "proto", "77"], capture_output=True, text=True,
                   check=True).stdout
    return {r["dst"] if "/" in r["dst"] else r["dst"] + "/32"  # ip writes a /32 bare
            for r in json.loads(out or "[]") if "gateway" in r or "nexthops" in r}


def test_a_router_cannot_take_a_pods_address_or_a_part_of_a_nodes_block(lab_factory):
    lab = lab_factory(nodes=2, tor="bird")
    a = lab.pod_add("node1", "default/a")
    lab.pod_add("node2", "default/b")
    router = lab.plan().tors[0].name
    wait_for(lambda: lab.probe("default/b", "default/a", 80).ok, "b reaches a", 20)
    host = f"{a}/32"
    specific = str(ipaddress.ip_network(f"{a}/28", strict=False))  # inside node1's /26 block
    lab.router_announce(router, host)
    lab.router_announce(router, specific)
    # node2 takes them (a's /32 is not its business); node1 refuses both, and says why
    wait_for(lambda: {host, specific} <= learned_routes(lab, "node2"), "node2 learns the announcements", 20)
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bgp_routes_refused") == 2, "node1 counts two refusals", 10)
    assert not {host, specific} & learned_routes(lab, "node1")
    wait_for(lambda: "refused: a local pod's address" in lab.ctl("node", "status", "node1").stdout,
             "node status says why", 10)
    status = lab.ctl("node", "status", "node1").stdout
    assert f"learned route {specific} refused: inside this node's block" in status, status
    # a's traffic still ends at a: from the other node's pod and from the outside host
    for src in ("default/b", "ext"):
        for _ in range(5):
            r = lab.probe(src, "default/a", 80)
            assert r.ok and r.reply.startswith("default/a"), r
    lab.router_announce(router, host, on=False)
    lab.router_announce(router, specific, on=False)
    wait_for(lambda: agent_metric(lab, "node1", "tortie_bgp_routes_refused") == 0, "refusals gone", 20)
    lab.down()
