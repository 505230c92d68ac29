"""bench/scale (idle): what a node costs when nothing happens -- the agent and its ExaBGP,
next to BIRD holding as many sessions, measured in the same run.

An N-node lab (`tortie.lab.cluster.Lab`, --tor none: the full mesh, N-1 sessions a node)
is brought up and left alone: no pods, no changes. Once every session is established
(the nodes' BGP status in etcd) and --settle seconds have passed, the CPU time of each
node's processes over --window seconds: `tortie-agent` (all its threads), its ExaBGP
child, and ExaBGP's API helper(s). The PIDs are the lab's own record (the agents) and
their children in /proc.

Reference, same window: N BIRD 2 daemons in namespaces of their own on one bridge, a full
iBGP mesh (N-1 sessions each, hold time 90 s like tortie's mesh, one static route
announced each, device and kernel protocols as in bench/bgp), all Established before the
window starts.

CPU time: /proc/<pid>/task/*/schedstat (ns), summed over the process's threads; the
/proc/<pid>/stat utime+stime delta (10 ms ticks) is in --json beside it. The default 30 s
window holds one keepalive of every session (both sides send one every hold/3 = 30 s).

Target (issue 14): agent + speaker (ExaBGP and its helpers) at most 0.5% of a core on
every node. A MISS exits 1.

    python bench/scale/idle.py [--nodes 5] [--window 30] [--settle 5] [--json]

Run as root. The lab, the BIRD namespaces and their files are always removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tortie.lab.benchutil import _stat_seconds, _task_ns, children
from tortie.lab.nsutil import stop_group

TARGET_PCT = 0.5  # agent + speaker, % of one core, per node
BIRD_AS = 64512
BIRD_HOLD = 90  # tortie's mesh default (bgp.config.DEFAULT_HOLD_TIME)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class Sample:
    """CPU seconds of a set of processes: (schedstat ns over live threads, stat ticks)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t = time.monotonic()
        self.cpu = {k: (_task_ns(p) / 1e9, _stat_seconds(p)) for k, p in pids.items()}

    def rates(self, later: Sample) -> dict[str, dict[str, float]]:
        dt = later.t - self.t
        return {k: {"pct": 100 * (later.cpu[k][0] - self.cpu[k][0]) / dt,
                    "stat_pct": 100 * (later.cpu[k][1] - self.cpu[k][1]) / dt}
                for k in self.pids}


# --- the reference: a BIRD full mesh ---------------------------------------------------------


class BirdMesh:
    """N BIRDs, each in its namespace with a veth to one bridge, every pair peered (iBGP)."""

    def __init__(self, n: int, tag: str) -> None:
        self.n = n
        self.net = f"ti-{tag}-bnet"
        self.nss = [f"ti-{tag}-b{i}" for i in range(1, n + 1)]
        self.dir = tempfile.mkdtemp(prefix="tortie-bench-idle-")
        self.procs: list[subprocess.Popen] = []
        self.socks: list[str] = []

    @staticmethod
    def ip(i: int) -> str:
        return f"10.98.0.{i}"

    def __enter__(self) -> BirdMesh:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
        sh("ip", "netns", "add", self.net)
        sh("ip", "-n", self.net, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.net, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nss, 1):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"b{i}", "netns", self.net)
            sh("ip", "-n", self.net, "link", "set", f"b{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for i, ns in enumerate(self.nss, 1):
            d = os.path.join(self.dir, f"b{i}")
            os.makedirs(d)
            conf, sock = os.path.join(d, "bird.conf"), os.path.join(d, "bird.ctl")
            peers = "".join(
                f"protocol bgp p{j} from mesh {{ neighbor {self.ip(j)} as {BIRD_AS}; }}\n"
                for j in range(1, self.n + 1) if j != i)
            with open(conf, "w") as f:
                f.write(f"router id {self.ip(i)};\n"
                        "protocol device {}\n"
                        "protocol kernel { ipv4 { import none; export all; }; learn off; }\n"
                        f"protocol static {{ ipv4; route 10.81.{i}.0/24 blackhole; }}\n"
                        f"template bgp mesh {{\n  local {self.ip(i)} as {BIRD_AS};\n  direct;\n"
                        f"  hold time {BIRD_HOLD};\n  connect retry time 1;\n"
                        "  ipv4 { import all; export where source = RTS_STATIC; next hop self; };\n}\n"
                        + peers)
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "bird", "-f", "-c", conf, "-s", sock],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "err"), "w"), start_new_session=True))
            self.socks.append(sock)

    def established(self) -> int:
        up = 0
        for sock in self.socks:
            out = subprocess.run(["birdc", "-s", sock, "show", "protocols"], capture_output=True,
                                 text=True).stdout
            up += sum(1 for line in out.splitlines() if line.startswith("p") and "Established" in line)
        return up

    def pids(self) -> dict[str, int]:
        # `ip netns exec` execs BIRD: the PID we started is BIRD's
        return {f"b{i}": p.pid for i, p in enumerate(self.procs, 1)}

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            stop_group(p, 10)
        for ns in [*self.nss, self.net]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the lab's nodes ---------------------------------------------------------------------------


def node_pids(lab) -> dict[str, dict[str, list[int]]]:
    """node -> {"agent": [pid], "exabgp": [pid], "helpers": [pids]} from the lab's record and /proc."""
    out = {}
    st = lab.state()
    for node in lab.plan().nodes:
        agent = st.proc(f"agent:{node.name}").pid
        exa = [c for c in children(agent) if "exabgp" in cmdline(c)]
        helpers = [h for e in exa for h in children(e)]
        out[node.name] = {"agent": [agent], "exabgp": exa, "helpers": helpers}
    return out


def mesh_established(lab, n: int) -> int:
    """Established sessions over all nodes, from the status every agent publishes in etcd."""
    r = lab.ctl("node", "status", "-o", "json", check=False)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return 0
    nodes = doc if isinstance(doc, list) else doc.get("nodes", [doc])
    return sum(1 for node in nodes for p in (node.get("peers") or []) if p.get("state") == "established")


def wait(check, want: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (have := check()) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {have}/{want} sessions established after {timeout:.0f} s")
        time.sleep(0.5)


def run(nodes: int, window: float, settle: float) -> dict:
    from tortie.lab.cluster import Lab
    from tortie.lab.teardown import teardown

    tag = uuid.uuid4().hex[:6]
    name = f"bi{tag}"
    sessions = nodes * (nodes - 1)
    try:
        with BirdMesh(nodes, tag) as birds:
            lab = Lab.up(name, nodes, "none")
            wait(lambda: mesh_established(lab, nodes), sessions, 60, "tortie mesh")
            wait(birds.established, sessions, 60, "BIRD mesh")
            time.sleep(settle)
            procs = node_pids(lab)
            flat = {f"{node}/{role}/{pid}": pid for node, roles in procs.items()
                    for role, pids in roles.items() for pid in pids}
            flat |= {f"bird/{k}": p for k, p in birds.pids().items()}
            s0 = Sample(flat)
            time.sleep(window)
            s1 = Sample(flat)
            rates = s0.rates(s1)
            # every process still the one measured (a restart in the window would hide its time)
            if node_pids(lab) != procs:
                raise RuntimeError("a node's agent or ExaBGP restarted during the window")
            still_up = mesh_established(lab, nodes), birds.established()
    finally:
        left = teardown(name)
        if left:
            print(f"teardown left: {left}", file=sys.stderr)
    per_node = {}
    for node, roles in procs.items():
        row = {role: sum(rates[f"{node}/{role}/{p}"]["pct"] for p in pids) for role, pids in roles.items()}
        row["stat"] = sum(rates[f"{node}/{role}/{p}"]["stat_pct"] for role, pids in roles.items() for p in pids)
        row["speaker"] = row["exabgp"] + row["helpers"]
        row["total"] = row["agent"] + row["speaker"]
        per_node[node] = {k: round(v, 4) for k, v in row.items()}
    bird = {k.split("/")[1]: round(v["pct"], 4) for k, v in rates.items() if k.startswith("bird/")}
    worst = max(r["total"] for r in per_node.values())
    return {
        "benchmark": "scale: idle node",
        "nodes": nodes, "sessions_per_node": nodes - 1, "window_s": window, "settle_s": settle,
        "per_node_pct": per_node,
        "bird_pct": bird,
        "median_pct": {k: round(statistics.median(r[k] for r in per_node.values()), 4)
                       for k in ("agent", "exabgp", "helpers", "total")}
        | {"bird": round(statistics.median(bird.values()), 4)},
        "established_after": {"tortie": still_up[0], "bird": still_up[1], "want": sessions},
        "target_pct": TARGET_PCT,
        "worst_node_pct": round(worst, 4),
        "result": "PASS" if worst <= TARGET_PCT and still_up[0] == sessions else "MISS",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--window", type=float, default=30.0, help="seconds of idle measured")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after every session is up")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/scale/idle: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.nodes < 2:
        print("bench/scale/idle: --nodes must be at least 2 (a mesh)", file=sys.stderr)
        return 2
    r = run(args.nodes, args.window, args.settle)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["result"] == "PASS" else 1
    print(f"idle CPU, % of one core over {args.window:.0f} s: {args.nodes}-node lab (full mesh, "
          f"{args.nodes - 1} sessions a node), no pods, nothing changing")
    print(f"{'':10}{'agent':>9}{'ExaBGP':>9}{'helpers':>9}{'total':>9}   "
          f"reference: BIRD, {args.nodes - 1} sessions")
    birds = list(r["bird_pct"].values())
    for i, (node, row) in enumerate(r["per_node_pct"].items()):
        ref = f"{birds[i]:9.3f}" if i < len(birds) else ""
        print(f"{node:10}{row['agent']:9.3f}{row['exabgp']:9.3f}{row['helpers']:9.3f}{row['total']:9.3f}   {ref}")
    m = r["median_pct"]
    print(f"{'median':10}{m['agent']:9.3f}{m['exabgp']:9.3f}{m['helpers']:9.3f}{m['total']:9.3f}   {m['bird']:9.3f}")
    e = r["established_after"]
    print(f"sessions established after the window: tortie {e['tortie']}/{e['want']}, BIRD {e['bird']}/{e['want']}")
    print(f"target: agent + speaker <= {TARGET_PCT}% of a core on every node: {r['result']} "
          f"(worst node {r['worst_node_pct']:.3f}%, {r['worst_node_pct'] / max(m['bird'], 1e-6):.0f}x BIRD's median)")
    return 0 if r["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
