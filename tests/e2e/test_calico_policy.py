"""Calico's policy model end to end (issue 10 item 2): tortie.io/v1 NetworkPolicy,
GlobalNetworkPolicy and Tier, applied with tortiectl, judged by real TCP probes.

One 2-node lab for the file: namespaces x and y; web pods x/web (node1) and y/web (node2),
clients x/client (node2) and y/client (node1), and x/other (node1) that is neither.
"""

from __future__ import annotations

import json
import sys

import pytest
from lab_fixtures import PROBE, agent_metric, eventually, netpol, wait_matrix

pytestmark = pytest.mark.slow

PODS = {"x/web": ("node1", "web"), "y/web": ("node2", "web"), "x/client": ("node2", "client"),
        "y/client": ("node1", "client"), "x/other": ("node1", "other")}
SETTLE = 6.0


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2)
    for ref, (node, app) in PODS.items():
        lab.pod_add(node, ref, labels={"app": app})
    m = wait_matrix(lab)
    assert m.ok, m
    return lab


@pytest.fixture
def apply(lab):
    made: list[tuple[str, str, str | None]] = []

    def go(*docs: dict) -> None:
        for d in docs:
            lab.ctl("apply", "-f", "-", input=json.dumps(d))
            kind = {"tortie.io/v1": d["kind"].lower()}.get(d["apiVersion"], "networkpolicy")
            if kind == "networkpolicy":
                kind = "tnp" if d["apiVersion"] == "tortie.io/v1" else "networkpolicy"
            made.append((kind, d["metadata"]["name"], d["metadata"].get("namespace")))

    yield go
    for kind, name, ns in reversed(made):
        lab.ctl("delete", kind, name, *(("-n", ns) if ns else ()), "--ignore-not-found")
    assert eventually(lambda: lab.matrix(timeout=PROBE, nodes=False).ok, True, 8), "policies deleted, traffic still blocked"


def policy(kind: str, name: str, ns: str | None = None, **spec) -> dict:
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"apiVersion": "tortie.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def reach(lab, src: str, dst: str) -> bool:
    return lab.probe(src, dst, 80, timeout=PROBE).ok


def expect(lab, want: dict[tuple[str, str], bool], seconds: float = SETTLE) -> None:
    got = {}

    def now():
        got.clear()
        got.update({k: reach(lab, *k) for k in want})
        return got
    assert eventually(now, want, seconds), {k: v for k, v in got.items() if want[k] != v}


def test_deny_at_order_10_beats_allow_at_order_20(lab, apply):
    web = "app == 'web'"
    apply(policy("NetworkPolicy", "allow-all", "x", order=20, selector=web, ingress=[{"action": "Allow"}]),
          policy("NetworkPolicy", "deny-clients", "x", order=10, selector=web,
                 ingress=[{"action": "Deny", "source": {"selector": "app == 'client'"}}]))
    # x/client is denied first; y/client is not in the namespaced rule's reach: allowed at 20
    expect(lab, {("x/client", "x/web"): False, ("y/client", "x/web"): True, ("x/other", "x/web"): True,
                 ("x/client", "y/web"): True})
    # The same deny after the allow (order 30) never gets its turn.
    apply(policy("NetworkPolicy", "deny-clients", "x", order=30, selector=web,
                 ingress=[{"action": "Deny", "source": {"selector": "app == 'client'"}}]))
    expect(lab, {("x/client", "x/web"): True, ("y/client", "x/web"): True})


def test_pass_hands_the_decision_to_the_next_tier(lab, apply):
    """Tier security (order 100): a GlobalNetworkPolicy on every web pod passes clients and
    denies the rest. Default tier: a Kubernetes NetworkPolicy in x allows x's clients."""
    apply(policy("Tier", "security", order=100),
          policy("GlobalNetworkPolicy", "web-guard", tier="security", order=1, selector="app == 'web'",
                 ingress=[{"action": "Pass", "source": {"selector": "app == 'client'"}},
                          {"action": "Deny"}]),
          netpol("x", "web-from-clients", podSelector={"matchLabels": {"app": "web"}},
                 ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]))
    expect(lab, {
        ("x/client", "x/web"): True,    # passed, then allowed by the Kubernetes policy
        ("y/client", "x/web"): False,   # passed, then denied at the end of the default tier
        ("x/other", "x/web"): False,    # denied in tier security
        ("y/client", "y/web"): True,    # passed; no policy of the default tier selects y/web
        ("x/client", "y/web"): True,    # the global policy reaches every namespace...
        ("x/other", "y/web"): False,    # ...and denies there too
    })


def test_global_policy_applies_in_every_namespace_and_kubernetes_policy_still_applies(lab, apply):
    """A GlobalNetworkPolicy (tier security) denies x/other to every web pod and passes the
    rest; in the default tier a Kubernetes policy lets into y/web only what comes from x."""
    apply(policy("Tier", "security", order=100),
          policy("GlobalNetworkPolicy", "no-other", tier="security", order=5, selector="app == 'web'",
                 ingress=[{"action": "Deny", "source": {"selector": "app == 'other'"}}, {"action": "Pass"}]),
          netpol("y", "web-only-x", podSelector={"matchLabels": {"app": "web"}},
                 ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}]}]))
    expect(lab, {
        ("x/other", "x/web"): False, ("x/other", "y/web"): False,  # both namespaces
        ("x/other", "y/client"): True,    # not selected by the global policy
        ("x/client", "x/web"): True, ("y/client", "x/web"): True,
        ("x/client", "y/web"): True,      # from x: allowed by the Kubernetes policy
        ("y/client", "y/web"): False,     # from y: not, though the Calico policy passed it
    })


def test_pass_in_the_default_tier_skips_its_kubernetes_policies(lab, apply):
    """Calico's rule, not a bug: Pass leaves the whole tier, the Kubernetes policies at
    order 1000 in it included; what passes the last tier is allowed."""
    apply(netpol("y", "web-only-x", podSelector={"matchLabels": {"app": "web"}},
                 ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}]}]))
    expect(lab, {("y/client", "y/web"): False, ("x/client", "y/web"): True})
    apply(policy("GlobalNetworkPolicy", "pass-clients", order=5, selector="app == 'web'",
                 ingress=[{"action": "Pass", "source": {"selector": "app == 'client'"}}]))
    expect(lab, {("y/client", "y/web"): True, ("x/client", "y/web"): True, ("x/other", "y/web"): True,
                 ("x/other", "x/web"): False})  # x/web: selected in the tier, matched by nothing


@pytest.mark.parametrize("spec,field", [
    ({"ingress": [{"action": "Reject"}]}, "spec.ingress[0].action"),
    ({"selector": "app ==="}, "spec.selector"),
    ({"order": "first"}, "spec.order"),
    ({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}}]},
     "spec.ingress[0].destination.ports[0]"),
    ({"ingress": [{"action": "Allow", "protocol": "ICMP", "icmp": {"code": 0}}]}, "spec.ingress[0].icmp.code"),
])
def test_bad_input_is_one_line_naming_the_field_and_nothing_is_stored(lab, spec, field):
    doc = policy("GlobalNetworkPolicy", "bad-one", **spec)
    r = lab.ctl("apply", "-f", "-", input=json.dumps(doc), check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr
    got = lab.ctl("get", "globalnetworkpolicy", "bad-one", check=False)
    assert got.returncode != 0


# Each datagram from a socket of its own: a new flow each. Policy sees a flow's first packets
# only; once the pod answered, conntrack passes the rest before any rule.
SEND_UDP = """
import socket, sys
for _ in range(int(sys.argv[2])):
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (sys.argv[1], 80))
"""


def log_lines(lab, node: str, needle: str) -> int:
    path = lab.status()["nodes"][int(node[-1]) - 1]["agent"]["log"]
    with open(path) as f:
        return sum(1 for line in f if "policy log" in line and needle in line)


def rule_packets(lab, node: str, policy_key: str, rule: int, action: str) -> float:
    return agent_metric(lab, node, "tortie_policy_packets_total", action=action, direction="in",
                        policy=policy_key, rule=str(rule)) or 0.0


def test_log_rule_writes_one_line_per_packet_and_the_rules_count_what_they_matched(lab, apply):
    key = "*/GlobalNetworkPolicy:audit"
    apply(policy("GlobalNetworkPolicy", "audit", order=1, selector="app == 'web'",
                 ingress=[{"action": "Log", "protocol": "UDP", "source": {"selector": "app == 'client'"}},
                          {"action": "Allow", "source": {"selector": "app == 'client'"}},
                          {"action": "Deny"}]))
    expect(lab, {("x/other", "x/web"): False, ("x/client", "x/web"): True})  # in place on node1
    logged, log0, allow0 = (log_lines(lab, "node1", key), rule_packets(lab, "node1", key, 0, "Log"),
                            rule_packets(lab, "node1", key, 1, "Allow"))
    lab.exec("x/client", [sys.executable, "-c", SEND_UDP, lab.pod("x/web").address, "3"], check=True)
    assert reach(lab, "x/client", "x/web")  # TCP: not logged (the Log rule is UDP), allowed by rule 1
    assert eventually(lambda: log_lines(lab, "node1", key) - logged, 3, 5), \
        f"one log line per UDP packet, not {log_lines(lab, 'node1', key) - logged}"
    assert eventually(lambda: rule_packets(lab, "node1", key, 0, "Log") - log0, 3, 5)
    # 3 datagrams and a SYN (a probe under load may send a second SYN: a new flow too)
    assert rule_packets(lab, "node1", key, 1, "Allow") - allow0 >= 4
    denied = rule_packets(lab, "node1", key, 2, "Deny")
    assert not reach(lab, "x/other", "x/web")
    assert rule_packets(lab, "node1", key, 2, "Deny") > denied
    assert log_lines(lab, "node1", key) - logged == 3  # what was not a client's UDP was never logged


def active_on(lab, *args: str) -> str:
    out = lab.ctl("get", *args, "-o", "wide").stdout.splitlines()
    return out[1].split()[-1] if len(out) > 1 else ""


def test_get_wide_shows_on_how_many_endpoints_of_each_node_a_policy_is_active(lab, apply):
    apply(policy("GlobalNetworkPolicy", "webs", order=1, selector="app == 'web'", ingress=[{"action": "Pass"}]),
          policy("GlobalNetworkPolicy", "not-web", order=1, selector="app != 'web'", ingress=[{"action": "Pass"}]),
          policy("NetworkPolicy", "x-all", "x", order=1, ingress=[{"action": "Pass"}]),
          netpol("y", "y-web", podSelector={"matchLabels": {"app": "web"}}, ingress=[{}]))
    want = {("globalnetworkpolicy", "webs"): "node1=1,node2=1",
            ("globalnetworkpolicy", "not-web"): "node1=2,node2=1",
            ("tnp", "x-all", "-n", "x"): "node1=2,node2=1",
            ("networkpolicy", "y-web", "-n", "y"): "node2=1"}
    got = {}

    def now():
        got.update({args: active_on(lab, *args) for args in want})
        return got
    assert eventually(now, want, 8), got
    header = lab.ctl("get", "gnp", "-o", "wide").stdout.splitlines()[0].split()
    assert header == ["NAME", "TIER", "ORDER", "SELECTOR", "TYPES", "ACTIVE-ON"]
