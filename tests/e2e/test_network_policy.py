"""Kubernetes NetworkPolicy end to end: policies applied with tortiectl, enforced by each
node's agent in its `inet tortie-filter` table, judged by real TCP probes.

One 2-node lab for the file. Pods: prod/web1 (node1) and prod/web2 (node2), app=web;
prod/client (node1), unlabeled; dev/tool (node2). Every test deletes its policies at the
end (the `policies` fixture), so each starts from "no policy: everything allowed".
"""

from __future__ import annotations

import json
import signal

import pytest
from lab_fixtures import PROBE, eventually, netpol, wait_matrix

pytestmark = pytest.mark.slow

WEB = {"podSelector": {"matchLabels": {"app": "web"}}}


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2)
    lab.pod_add("node1", "prod/web1", labels={"app": "web"})
    lab.pod_add("node2", "prod/web2", labels={"app": "web"})
    lab.pod_add("node1", "prod/client")
    lab.pod_add("node2", "dev/tool")
    lab.ctl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dev", "labels": {"team": "dev"}}}))
    m = wait_matrix(lab)
    assert m.ok, m
    return lab


def reach(lab, src: str, dst: str, port: int = 80, udp: bool = False):
    return lambda: lab.probe(src, dst, port, udp=udp, timeout=PROBE).ok


def test_no_policy_allows_everything(lab):
    m = lab.matrix(timeout=PROBE)
    assert m.ok, m


def test_default_deny_ingress_blocks_its_namespace_only(lab, policies):
    policies(netpol("prod", "deny-all"))
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)  # same node
    assert not lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok  # cross node
    assert not lab.probe("prod/web1", "prod/web2", timeout=PROBE).ok  # inside prod, cross node
    assert not lab.probe("dev/tool", "prod/web2", udp=True, timeout=PROBE).ok  # UDP too
    # Other namespaces are untouched, and prod's egress is open (replies pass).
    assert lab.probe("prod/client", "dev/tool", timeout=PROBE).ok
    assert lab.probe("prod/web2", "dev/tool", timeout=PROBE).ok
    # The node itself reaches its own pods (kubelet probes); another node does not.
    assert lab.probe("node1", "prod/web1", timeout=PROBE).ok
    assert lab.probe("node2", "prod/web2", timeout=PROBE).ok
    assert not lab.probe("node2", "prod/web1", timeout=PROBE).ok


def test_allow_from_labelled_pods_follows_the_label(lab, policies):
    policies(netpol("prod", "deny-all"),
             netpol("prod", "web-from-clients", **WEB,
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                              "ports": [{"port": 80}]}]))
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)
    lab.pod_label("prod/client", {"role": "client"})
    assert eventually(reach(lab, "prod/client", "prod/web1"), True)
    assert eventually(reach(lab, "prod/client", "prod/web2"), True)  # the other node learned it too
    assert not lab.probe("prod/client", "prod/web1", 81, timeout=PROBE).ok  # only port 80
    assert not lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok  # podSelector: prod only
    assert not lab.probe("prod/web2", "prod/client", timeout=PROBE).ok  # client itself is isolated
    lab.pod_label("prod/client", remove=["role"])
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)
    assert not lab.probe("prod/client", "prod/web2", timeout=PROBE).ok


def test_namespace_selector(lab, policies):
    policies(netpol("prod", "web-from-dev", **WEB,
                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "dev"}}}]}]))
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)
    assert lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok
    assert lab.probe("dev/tool", "prod/web2", 81, timeout=PROBE).ok  # no ports: every port
    assert not lab.probe("prod/web2", "prod/web1", timeout=PROBE).ok
    assert lab.probe("prod/web1", "prod/client", timeout=PROBE).ok  # client is not selected


def test_egress_ip_block(lab, policies):
    web2 = lab.pod("prod/web2").address
    policies(netpol("dev", "tool-out", policyTypes=["Egress"],
                    egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [f"{web2}/32"]}}],
                             "ports": [{"port": 80}]}]))
    assert eventually(reach(lab, "dev/tool", "prod/web2"), False)  # the except (same node)
    assert lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok  # cross node, in the block
    assert lab.probe("dev/tool", "prod/client", timeout=PROBE).ok
    assert not lab.probe("dev/tool", "prod/web1", 81, timeout=PROBE).ok  # port 80 only
    assert lab.probe("prod/web2", "dev/tool", timeout=PROBE).ok  # tool's ingress is open


def test_deleting_the_policy_restores_traffic(lab, policies):
    policies(netpol("prod", "deny-all"))
    assert eventually(reach(lab, "dev/tool", "prod/web1"), False)
    lab.ctl("delete", "networkpolicy", "deny-all", "-n", "prod")
    assert eventually(reach(lab, "dev/tool", "prod/web1"), True)
    assert lab.probe("prod/client", "prod/web1", timeout=PROBE).ok


def test_hand_edit_of_the_filter_is_undone(lab, policies):
    policies(netpol("prod", "deny-all"))
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)
    flush = lab.exec("node1", ["nft", "flush", "chain", "inet", "tortie-filter", "forward-ingress"],
                     capture_output=True, text=True)
    assert flush.returncode == 0, flush.stderr
    # The agent hears the nftables event, sees its table changed and writes it back.
    assert eventually(lambda: "oifname vmap @ingress-pods" in lab.exec(
        "node1", ["nft", "list", "chain", "inet", "tortie-filter", "forward-ingress"],
        capture_output=True, text=True).stdout, True)
    assert not lab.probe("prod/client", "prod/web1", timeout=PROBE).ok


def test_policy_holds_while_the_agent_is_down_and_after_its_restart(lab, policies):
    policies(netpol("prod", "deny-all"),
             netpol("prod", "web-from-dev", **WEB,
                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "dev"}}}]}]))
    assert eventually(reach(lab, "prod/client", "prod/web1"), False)
    lab.agent_stop("node1", signal.SIGKILL)
    try:
        # The kernel keeps the table: the pods stay protected without their agent.
        assert not lab.probe("prod/client", "prod/web1", timeout=PROBE).ok
        assert lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok
    finally:
        lab.agent_start("node1")
    assert not lab.probe("prod/client", "prod/web1", timeout=PROBE).ok
    assert lab.probe("dev/tool", "prod/web1", timeout=PROBE).ok


def _policy_counter(lab, node: str, name_part: str) -> tuple[int, int]:
    """(packets, handle) of the named counter of the policy chain whose name has `name_part`."""
    out = lab.exec(node, ["nft", "-j", "list", "counters", "table", "inet", "tortie-filter"],
                   capture_output=True, text=True, check=True).stdout
    found = [o["counter"] for o in json.loads(out)["nftables"]
             if "counter" in o and o["counter"]["name"].endswith(name_part)]  # not its rules' "-rN"
    assert len(found) == 1, found
    return found[0]["packets"], found[0]["handle"]


def test_a_policy_counter_survives_an_unrelated_pod_add_and_del(lab, policies):
    """The filter table is changed element by element, never rewritten: a stateful object of
    tortie's (the policy's accept counter) keeps its count and its handle across a pod that
    comes and goes through the real CNI path."""
    policies(netpol("prod", "web-from-client", **WEB, ingress=[
        {"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}}]}]))
    assert eventually(reach(lab, "dev/tool", "prod/web1"), False)
    for _ in range(3):
        assert lab.probe("prod/client", "prod/web1", timeout=PROBE).ok
    packets, handle = _policy_counter(lab, "node1", "prod_web-from-client")
    assert packets >= 3
    lab.pod_add("node1", "prod/passer-by")
    assert eventually(reach(lab, "prod/passer-by", "prod/web1"), True)  # unlabelled: allowed
    lab.pod_del("prod/passer-by")
    after, after_handle = _policy_counter(lab, "node1", "prod_web-from-client")
    assert after_handle == handle
    assert after >= packets + 1  # the passer-by's probe counted on top, nothing reset


def test_the_agent_forks_no_process_per_pod(lab):
    """In steady state the agent (its loop, CNI server and dataplane thread) starts no
    process for a pod ADD or DEL: 50 pods added and deleted (100 CNI calls) while the
    kernel reports every fork whose parent is the agent."""
    from forkwatch import ForkWatch

    agent = lab.state().proc("agent:node1").pid
    with ForkWatch(agent) as watch:
        for i in range(50):
            lab.pod_add("node1", f"prod/churn-{i}")
        for i in range(50):
            lab.pod_del(f"prod/churn-{i}")
    assert watch.events > 100  # the watch saw the lab's own forks: it is listening
    assert watch.children == []
