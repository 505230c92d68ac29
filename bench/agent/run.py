"""The agent's resident memory with 250 local pods and 10,000 routes (issue 3's target: 80 MB).

A one-node lab behind a BIRD router: BIRD announces 10,000 /32s over BGP (a static
protocol added to the lab's router config), the agent installs them in the node's
kernel, and 250 pods are created through the real CNI plugin. The agent's RSS is read
from /proc before and after; its ExaBGP child is shown on its own line (a separate
process the agent supervises), and BIRD's RSS holding the same 10,000 routes is the
reference measured in the same run.

Run as root: `python bench/agent/run.py [--pods 250] [--routes 10000] [--json]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import uuid

from tortie.lab import routers, state
from tortie.lab.cluster import Lab
from tortie.routing.model import TORTIE_PROTO

TARGET_MB = 80.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def tortie_routes(netns: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-4", "route", "show", "proto", str(TORTIE_PROTO)],
                         capture_output=True, text=True, check=True).stdout
    return out.count("\n")


def announce_from_bird(lab: Lab, count: int):
    """Give the lab's BIRD a static protocol of `count` /32s and export it to the node."""
    tor = lab.plan().tors[0]
    run = routers.RouterRun(tor, os.path.join(state.lab_dir(lab.name), tor.name),
                            os.path.join(state.lab_dir(lab.name), "logs"))
    conf = open(run.conf).read()
    conf = conf.replace("export where source = RTS_BGP; next hop self;",
                        "export where source ~ [RTS_BGP, RTS_STATIC]; next hop self;")
    base = int(ipaddress.ip_address("10.200.0.0"))
    routes = "\n".join(f"  route {ipaddress.ip_address(base + i)}/32 blackhole;" for i in range(count))
    conf += f"protocol static bench {{\n  ipv4;\n{routes}\n}}\n"
    with open(run.conf, "w") as f:
        f.write(conf)
    # External peers' routes are imported only within their acceptPrefixes.
    peers = json.loads(lab.ctl("get", "bgppeers", "-o", "json").stdout)
    for peer in peers.get("items", peers) if isinstance(peers, dict) else peers:
        peer["spec"]["acceptPrefixes"] = ["10.200.0.0/16"]
        lab.ctl("apply", "-f", "-", input=json.dumps(peer))
    out = routers.birdc(tor.netns, run.control, "configure")
    if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
        raise RuntimeError(f"BIRD did not take the configuration: {out}")
    return run, tor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=250)
    ap.add_argument("--routes", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    name = "bagent" + uuid.uuid4().hex[:6]
    lab = Lab.up(name=name, nodes=1, tor="bird", echo=lambda *_: None)
    try:
        node = lab.plan().nodes[0]
        agent_pid = lab.state().proc(f"agent:{node.name}").pid
        time.sleep(1.0)
        idle = rss_mb(agent_pid)

        t0 = time.monotonic()
        _, tor = announce_from_bird(lab, args.routes)
        while tortie_routes(node.netns) < args.routes:
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"only {tortie_routes(node.netns)} routes after 120 s")
            time.sleep(0.1)
        routes_s = time.monotonic() - t0

        t0 = time.monotonic()
        for i in range(args.pods):
            lab.pod_add(node.name, f"bench/p{i}")
        pods_s = time.monotonic() - t0
        time.sleep(2.0)  # let the agent settle (datastore events of the last pods)

        agent = rss_mb(agent_pid)
        exabgp = sum(rss_mb(p) for p in children(agent_pid))
        bird_pid = lab.state().proc(tor.name).pid
        bird = rss_mb(bird_pid)
        routes_now = tortie_routes(node.netns)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "pods": args.pods, "routes_learned": args.routes, "tortie_routes_in_kernel": routes_now,
            "agent_rss_idle_mb": round(idle, 1), "agent_rss_mb": round(agent, 1),
            "exabgp_rss_mb": round(exabgp, 1), "bird_rss_mb_same_routes": round(bird, 1),
            "routes_installed_s": round(routes_s, 2), "pods_created_s": round(pods_s, 1),
            "target_mb": TARGET_MB, "pass": agent <= TARGET_MB,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"agent memory, {args.pods} local pods and {args.routes:,} learned routes "
                  f"({routes_now:,} tortie routes in the node's kernel)")
            print(f"  {'tortie-agent RSS, idle':<40} {idle:7.1f} MB")
            print(f"  {'tortie-agent RSS, loaded':<40} {agent:7.1f} MB   target <= {TARGET_MB:.0f} MB: "
                  f"{'PASS' if agent <= TARGET_MB else 'MISS'}")
            print(f"  {'its ExaBGP child RSS':<40} {exabgp:7.1f} MB")
            print(f"  {'reference: BIRD holding the same routes':<40} {bird:7.1f} MB")
            print(f"  (routes learned and installed in {routes_s:.1f} s; {args.pods} pods created in {pods_s:.1f} s)")
        return 0 if agent <= TARGET_MB else 1
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
