"""Services end to end (issue 9): a 3-node lab behind BIRD and one behind FRR, no kube-proxy, tortie's proxy
on every node; Services made with `tortie-lab svc add` (the lab allocates and keeps the
EndpointSlices), judged by real TCP and UDP probes whose answers say which pod answered
and which client address it saw.

Pods: default/client on node1; default/web1 on node2, default/web2 and web3 on node3
(app=web), so the Service's endpoints are all on other nodes than the client.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections import Counter

import pytest
from lab_fixtures import PROBE, eventually, netpol

from tortie.errors import NotFound

pytestmark = pytest.mark.slow

WEBS = {"default/web1": "node2", "default/web2": "node3", "default/web3": "node3"}


@pytest.fixture(scope="module", params=["bird", "frr"])
def lab(lab_factory, request):
    lab = lab_factory(nodes=3, tor=request.param)
    lab.pod_add("node1", "default/client", labels={"role": "client"})
    for ref, node in WEBS.items():
        lab.pod_add(node, ref, labels={"app": "web"})
    return lab


@pytest.fixture
def svc(lab):
    made = []

    def add(ref, *ports, **kw):
        made.append(ref)
        return lab.svc_add(ref, kw.pop("selector", "app=web"), list(ports) or ["80"], **kw)

    yield add
    for ref in made:
        with contextlib.suppress(NotFound):  # a test may have removed it itself
            lab.svc_del(ref)


def answers(lab, src, dst, port, n, udp=False) -> list:
    out = []
    for _ in range(n):
        r = lab.probe(src, dst, port, udp=udp, timeout=PROBE)
        out.append(r if r.ok else None)
    return out


def test_cluster_ip_from_a_pod_and_a_node_tcp_and_udp(lab, svc):
    doc = svc("default/web", "80", "81/udp")
    assert doc["endpoints"] == sorted(WEBS) and doc["clusterIP"].startswith("10.96.")
    for udp, port in ((False, 80), (True, 81)):
        assert eventually(lambda u=udp, p=port: lab.probe("default/client", "svc:default/web", p, udp=u,
                                                         timeout=PROBE).ok, True), (udp, port)
        r = lab.probe("default/client", "svc:default/web", port, udp=udp, timeout=PROBE)
        assert r.answered_by in WEBS and r.seen_as == lab.pod("default/client").address, r
    assert eventually(lambda: lab.probe("node1", "svc:default/web", 80, timeout=PROBE).ok, True)


def test_flows_spread_over_every_endpoint_and_affinity_holds(lab, svc):
    svc("default/web")
    assert eventually(lambda: lab.probe("default/client", "svc:default/web", 80, timeout=PROBE).ok, True)
    got = answers(lab, "default/client", "svc:default/web", 80, 300)
    assert all(got), [r for r in got if r is None][:1]
    hits = Counter(r.answered_by for r in got)
    assert set(hits) == set(WEBS) and max(hits.values()) <= 150, hits
    svc("default/sticky", selector="app=web", affinity="ClientIP")
    assert eventually(lambda: lab.probe("default/client", "svc:default/sticky", 80, timeout=PROBE).ok, True)
    sticky = answers(lab, "default/client", "svc:default/sticky", 80, 30)
    assert all(sticky) and len({r.answered_by for r in sticky}) == 1, Counter(r and r.answered_by for r in sticky)


def test_no_endpoints_fails_at_once(lab, svc):
    svc("default/nobody", "80", "80/udp", selector="app=none")
    time.sleep(2.0)  # converged
    for udp in (False, True):
        r = lab.probe("default/client", "svc:default/nobody", 80, udp=udp, timeout=2.0)
        assert not r.ok and r.ms < 500, r  # refused or reset, not a timeout


def test_node_port_cluster_masquerades_and_local_keeps_the_source(lab, svc):
    status = lab.status()
    nodes = {n["name"]: n["ip"] for n in status["nodes"]}
    ext = status["outside"]["ip"]
    doc = svc("default/np", "80", kind="NodePort")
    port = doc["nodePorts"]["80"]
    assert eventually(lambda: lab.probe("ext", nodes["node1"], port, timeout=PROBE).ok, True)
    r = lab.probe("ext", nodes["node1"], port, timeout=PROBE)
    assert r.answered_by in WEBS and r.seen_as != ext, r  # Cluster: a node's address
    doc = svc("default/np-local", "80", kind="NodePort", external_traffic_policy="Local")
    port = doc["nodePorts"]["80"]
    assert eventually(lambda: lab.probe("ext", nodes["node2"], port, timeout=PROBE).ok, True)
    for _ in range(5):
        r = lab.probe("ext", nodes["node2"], port, timeout=PROBE)
        assert r.answered_by == "default/web1" and r.seen_as == ext, r  # Local: node2's own, source kept


def test_network_policy_applies_through_the_service(lab, svc, policies):
    svc("default/guarded", selector="app=web")
    assert eventually(lambda: lab.probe("default/client", "svc:default/guarded", 80, timeout=PROBE).ok, True)
    policies(netpol("default", "web-deny-client", podSelector={"matchLabels": {"app": "web"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "nobody"}}}]}]))
    assert eventually(lambda: lab.probe("default/client", "svc:default/guarded", 80, timeout=PROBE).ok, False)
    assert not any(answers(lab, "default/client", "svc:default/guarded", 80, 10))


def test_removing_a_service_removes_every_trace_within_2s(lab, svc):
    doc = svc("default/gone", "80", kind="LoadBalancer", external_traffic_policy="Local")
    cip, lb, port = doc["clusterIP"], doc["loadBalancerIP"], doc["nodePorts"]["80"]
    assert eventually(lambda: lab.probe("default/client", "svc:default/gone", 80, timeout=PROBE).ok, True)
    assert eventually(lambda: bool(_router_hops(lab, f"{lb}/32")), True, 10)
    lab.svc_del("default/gone")
    t0 = time.monotonic()

    def clean() -> bool:
        tables = [lab.exec(n, ["nft", "list", "table", "ip", "tortie-proxy"], capture_output=True, text=True).stdout
                  for n in ("node1", "node2", "node3")]
        return not any(x in t for t in tables for x in (cip, lb, f". {port} ")) and not _router_hops(lab, f"{lb}/32")

    while not clean():
        assert time.monotonic() - t0 < 2.0, "a node still holds the Service after 2 s"
        time.sleep(0.1)


def _router_hops(lab, prefix: str) -> set[str]:
    """The next hops the router's kernel holds for prefix (ECMP: one per node)."""
    out = lab.exec("tor", ["ip", "route", "show", "exact", prefix], capture_output=True, text=True).stdout
    return set(re.findall(r"via (\S+)", out))


def test_load_balancer_from_outside_local_announced_by_its_nodes_only(lab, svc):
    status = lab.status()
    via = {n["name"]: n["ip"] for n in status["nodes"]}
    ext = status["outside"]["ip"]
    doc = svc("default/lb", "80", kind="LoadBalancer")
    assert doc["loadBalancerIP"].startswith("10.97.0.")
    assert eventually(lambda: lab.probe("ext", doc["loadBalancerIP"], 80, timeout=PROBE).ok, True, 10)
    r = lab.probe("ext", doc["loadBalancerIP"], 80, timeout=PROBE)
    assert r.answered_by in WEBS and r.seen_as != ext, r  # Cluster: masqueraded by the node
    assert _router_hops(lab, "10.97.0.0/24") == set(via.values())  # the range, from every node

    local = svc("default/lb-local", "80", kind="LoadBalancer", external_traffic_policy="Local")
    lb = local["loadBalancerIP"]
    assert eventually(lambda: _router_hops(lab, f"{lb}/32") == {via["node2"], via["node3"]}, True, 10), \
        _router_hops(lab, f"{lb}/32")
    assert eventually(lambda: lab.probe("ext", lb, 80, timeout=PROBE).ok, True)
    seen = answers(lab, "ext", lb, 80, 20)
    assert all(seen) and {r.seen_as for r in seen} == {ext}, seen  # Local: the outside host's own address
    # node2's only endpoint goes: the router loses node2's path within 2 s
    lab.pod_label("default/web1", remove=["app"])
    t0 = time.monotonic()
    while _router_hops(lab, f"{lb}/32") != {via["node3"]}:
        assert time.monotonic() - t0 < 2.0, _router_hops(lab, f"{lb}/32")
        time.sleep(0.05)
    lab.pod_label("default/web1", {"app": "web"})
    assert eventually(lambda: _router_hops(lab, f"{lb}/32") == {via["node2"], via["node3"]}, True, 10)
    # the health check node port answers as kube-proxy's: 200 where there is a local endpoint
    hc = local["healthCheckNodePort"]
    assert lab.http_get("node2", hc, "/")[0] == 200 and lab.http_get("node1", hc, "/")[0] == 503


def test_hand_edits_of_the_proxy_table_are_repaired(lab, svc):
    doc = svc("default/edited", "80")
    cip = doc["clusterIP"]
    assert eventually(lambda: lab.probe("default/client", "svc:default/edited", 80, timeout=PROBE).ok, True)
    r = lab.exec("node1", ["nft", "delete", "element", "ip", "tortie-proxy", "service-ips",
                           f"{{ {cip} . tcp . 80 }}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the agent sees another process's commit and puts the element back
    assert eventually(lambda: lab.probe("default/client", "svc:default/edited", 80, timeout=PROBE).ok, True, 5)
    listing = lab.exec("node1", ["nft", "list", "map", "ip", "tortie-proxy", "service-ips"],
                       capture_output=True, text=True).stdout
    assert f"{cip} . tcp . 80" in listing


def test_hairpin_a_pod_reaches_itself_through_its_service(lab, svc):
    lab.pod_label("default/web1", {"solo": "yes"})
    try:
        svc("default/solo", selector="solo=yes")
        assert eventually(lambda: lab.probe("default/web1", "svc:default/solo", 80, timeout=PROBE).ok, True)
        r = lab.probe("default/web1", "svc:default/solo", 80, timeout=PROBE)
        assert r.answered_by == "default/web1" and r.seen_as != lab.pod("default/web1").address, r
    finally:
        lab.pod_label("default/web1", remove=["solo"])


def test_the_cli(lab, svc):
    """svc add prints the cluster IP last; svc show and status -o json list the Service;
    probe --show prints the answer."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tortie.lab.cli", *args, "--name", lab.name],
                              capture_output=True, text=True, timeout=60)

    r = cli("svc", "add", "default/cli", "--selector", "app=web", "--port", "80", "--type", "NodePort")
    try:
        assert r.returncode == 0, r.stderr
        cip = r.stdout.strip().splitlines()[-1]
        shown = json.loads(cli("svc", "show", "default/cli", "-o", "json").stdout)
        assert shown["clusterIP"] == cip and shown["endpoints"] == sorted(WEBS)
        assert set(shown["nodePorts"]) == {"80"} and shown["loadBalancerIP"] is None
        status = json.loads(cli("status", "-o", "json").stdout)
        assert any(s["name"] == "default/cli" and s["clusterIP"] == cip for s in status["services"])
        assert eventually(lambda: cli("probe", "default/client", "svc:default/cli", "80").returncode == 0, True)
        out = cli("probe", "default/client", "svc:default/cli", "80", "--show").stdout.splitlines()
        assert out[0].split()[0] in WEBS and out[0].split()[1] == lab.pod("default/client").address, out
        bad = cli("svc", "add", "default/bad", "--selector", "app=web", "--port", "70000")
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "port" in bad.stderr, bad.stderr
    finally:
        cli("svc", "del", "default/cli")


def test_proxy_mode_none_leaves_services_to_kube_proxy_but_still_announces(lab_factory):
    """TORTIE_PROXY_MODE=none (a cluster that keeps kube-proxy): no proxy table on the node,
    the Service ranges still reach the router."""
    lab = lab_factory(nodes=1, tor="bird", agent_env={"TORTIE_PROXY_MODE": "none"})
    lab.pod_add("node1", "default/web1", labels={"app": "web"})
    lab.svc_add("default/web", "app=web", ["80"])
    time.sleep(2.0)
    r = lab.exec("node1", ["nft", "list", "table", "ip", "tortie-proxy"], capture_output=True, text=True)
    assert r.returncode != 0, r.stdout  # nothing programmed: kube-proxy's job
    assert eventually(lambda: bool(_router_hops(lab, "10.96.0.0/16")), True, 10)
