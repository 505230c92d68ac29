"""The lab's top-of-rack router: BIRD2 (issue 4; FRR to follow) in `<lab>-tor`.

The router peers over eBGP with every node on that node's own link, installs what it
learns (the nodes' pod blocks) in its kernel so the outside host behind it reaches the
pods, and re-announces each node's blocks to the others. The datastore side -- mesh off,
one BGPPeer per node pointing at the router -- is `bgp_resources()`.
"""

from __future__ import annotations

import os
import re
import subprocess

from tortie.lab import nsutil
from tortie.lab.topology import NodePlan, Plan, TorPlan

API_VERSION = "tortie.io/v1"
HOLD_TIME = 9  # seconds: a lab wants quick failure detection


def bird_config(plan: Plan, tor: TorPlan, log_path: str) -> str:
    """BIRD 2 configuration: one eBGP session per node, learned routes to the kernel."""
    lines = [
        f'log "{log_path}" {{ info, warning, error, fatal }};',
        f"router id {tor.ip};",
        "protocol device { scan time 5; }",
        "protocol direct { ipv4; }",
        "protocol kernel {",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "  merge paths on;",
        "}",
        "template bgp node {",
        f"  local as {tor.as_number};",
        f"  hold time {HOLD_TIME};",
        "  connect retry time 1;",
        "  error wait time 1, 10;",
        "  ipv4 { import all; export where source = RTS_BGP; next hop self; };",
        "}",
    ]
    for node in plan.nodes:
        lines += [
            f"protocol bgp {node.name} from node {{",
            f"  local {node.gateway} as {tor.as_number};",
            f"  neighbor {node.ip} as {node.as_number};",
            "}",
        ]
    return "\n".join(lines) + "\n"


def bird_command(conf: str, control: str) -> list[str]:
    # -f: stay in the foreground, so the PID the lab records is BIRD's own.
    return ["bird", "-f", "-c", conf, "-s", control]


def birdc(netns: str, control: str, *args: str) -> str:
    r = nsutil.run(["ip", "netns", "exec", netns, "birdc", "-s", control, *args], check=False, timeout=10)
    return r.stdout


def bird_sessions(netns: str, control: str) -> dict[str, str]:
    """BGP session state per protocol name (node1: Established, ...)."""
    out = birdc(netns, control, "show", "protocols")
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "BGP":
            states[parts[0]] = parts[5] if parts[3] == "up" else (parts[5] if len(parts) > 5 else parts[3])
    return states


def bird_ready(netns: str, control: str) -> bool:
    if not os.path.exists(control):
        return False
    r = subprocess.run(["ip", "netns", "exec", netns, "birdc", "-s", control, "show", "status"],
                       capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and bool(re.search(r"Daemon is up and running", r.stdout))


def bgp_resources(plan: Plan) -> list[dict]:
    """Mesh off; each node peers with the router on its link (and keeps its own AS)."""
    if not plan.tors:
        return []
    tor = plan.tors[0]
    res: list[dict] = [{
        "apiVersion": API_VERSION, "kind": "BGPConfiguration", "metadata": {"name": "default"},
        "spec": {"nodeToNodeMeshEnabled": False, "asNumber": plan.nodes[0].as_number - 1},
    }]
    for node in plan.nodes:
        res += [
            {"apiVersion": API_VERSION, "kind": "BGPConfiguration", "metadata": {"name": f"node.{node.name}"},
             "spec": {"asNumber": node.as_number}},
            {"apiVersion": API_VERSION, "kind": "BGPPeer", "metadata": {"name": f"{tor.name}-{node.name}"},
             "spec": {"node": node.name, "peerIP": node.gateway, "asNumber": tor.as_number,
                      "holdTime": f"{HOLD_TIME}s"}},
        ]
    return res


def router_node_link(node: NodePlan) -> str:
    """The router's interface name for a node's link."""
    return node.bridge_port
