"""bench/soak: pod churn through the installed `tortie` shim and running agents, then a
count of everything churn could leave behind.

    .venv/bin/python bench/soak/run.py [--cycles 2000] [--parallel 10] [--warmup 100] [--json]

A two-node lab (`tortie.lab.cluster.Lab`, `--tor none`, a real `tortie-agent` per node).
`--parallel` workers, half on each node, each with a pod network namespace of its own,
run cycles of ADD then DEL of a fresh container id, exec'ing the lab's installed shim as a
container runtime does (CNI_* env, the network config on stdin). `--warmup` cycles run
first and are not counted: the baseline (agent RSS, routes, rules, nftables) is taken
after them, when no pod exists, and compared with the same once the churn is over.

Figures: cycles/s, ADD and DEL latency p50/p99 under that load. Targets (issue 12,
item 7): every ADD and DEL succeeds; afterwards zero addresses allocated (and `tortiectl
ipam check` clean), zero WorkloadEndpoints, zero host veths, each node's routes, rules
and nftables ruleset (counters aside) as at the baseline; agent RSS growth at most 5 MB
on each node. A missed target prints MISS and the script exits 1. Everything is removed
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import uuid

from tortie.lab.benchutil import cni_env, pct

RSS_GROWTH_MB = 5.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def node_state(netns: str) -> dict[str, str]:
    """What pods may leave in a node: routes, rules, the ruleset without counters, veths."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    ipv6_ll = ("fe80::", "ff00::")  # the kernel's own, per link
    routes = "\n".join(line for line in run("ip", "-n", netns, "route", "show", "table", "all").splitlines()
                       if not any(s in line for s in ipv6_ll))
    veths = [line.split(":")[1].strip().split("@")[0] for line in run("ip", "-n", netns, "-o", "link").splitlines()
             if line.split(":")[1].strip().startswith("tor")]
    return {"routes": routes, "rules": run("ip", "-n", netns, "rule"),
            "nft": run("ip", "netns", "exec", netns, "nft", "-s", "list", "ruleset"), "veths": "\n".join(veths)}


class Churn:
    def __init__(self, lab, parallel: int) -> None:
        from tortie.lab import nsutil, topology

        self.lab = lab
        st = lab.state()
        self.shim = f"{st.bin_dir}/tortie"
        self.cni_path = st.bin_dir
        nodes = [n.name for n in lab.plan().nodes]
        self.slots = []  # (node, pod netns)
        for i in range(parallel):
            ns = topology.pod_netns(lab.name, "soak", f"w{i}")  # named like lab pods: teardown finds them
            nsutil.netns_add(ns)
            self.slots.append((nodes[i % len(nodes)], ns))
        self.confs = {n: json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
                                     "agentSocket": lab.cni_socket(n)}).encode() for n in nodes}
        self.add_ms: list[float] = []
        self.del_ms: list[float] = []
        self.failures: list[str] = []
        self._left = 0
        self._lock = threading.Lock()

    def _call(self, command: str, cid: str, node: str, ns: str) -> float:
        t = time.perf_counter()
        r = subprocess.run([self.shim], input=self.confs[node], env=cni_env(command, cid, ns, self.cni_path),
                           capture_output=True)
        ms = (time.perf_counter() - t) * 1000
        if r.returncode != 0:
            self.failures.append(f"{command} {cid[:12]} on {node}: {r.stdout.decode(errors='replace').strip()}")
        return ms

    def _worker(self, node: str, ns: str) -> None:
        while True:
            with self._lock:
                if self._left <= 0:
                    return
                self._left -= 1
            cid = uuid.uuid4().hex
            self.add_ms.append(self._call("ADD", cid, node, ns))
            self.del_ms.append(self._call("DEL", cid, node, ns))

    def run(self, cycles: int) -> float:
        self._left = cycles
        threads = [threading.Thread(target=self._worker, args=slot) for slot in self.slots]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t

    def drop(self) -> None:
        from tortie.lab import nsutil

        for _, ns in self.slots:
            nsutil.netns_del(ns)


def run(args: argparse.Namespace) -> int:
    from tortie.lab.cluster import Lab

    lab = Lab.up(name="bsoak" + uuid.uuid4().hex[:6], nodes=2, tor="none", agent="agent")
    churn = None
    try:
        churn = Churn(lab, args.parallel)
        nodes = {n.name: n.netns for n in lab.plan().nodes}
        pids = {n: lab.state().proc(f"agent:{n}").pid for n in nodes}
        churn.run(args.warmup)
        time.sleep(2.0)  # the agents apply the last deletes
        base = {n: node_state(ns) for n, ns in nodes.items()}
        rss0 = {n: rss_mb(pid) for n, pid in pids.items()}
        churn.add_ms.clear()
        churn.del_ms.clear()
        wall = churn.run(args.cycles)
        time.sleep(2.0)
        after = {n: node_state(ns) for n, ns in nodes.items()}
        rss1 = {n: rss_mb(pid) for n, pid in pids.items()}
        check = lab.ctl("ipam", "check").stdout
        allocations = int(re.search(r"(\d+) allocations", check).group(1))
        weps = json.loads(lab.ctl("get", "workloadendpoints", "-A", "-o", "json").stdout or "[]")
        weps = weps.get("items", []) if isinstance(weps, dict) else weps
    finally:
        if churn is not None:
            churn.drop()
        lab.down()

    figures = {
        "cycles": args.cycles, "parallel": args.parallel, "wall_s": round(wall, 2),
        "cycles_per_s": round(args.cycles / wall, 1),
        "add_p50_ms": round(pct(churn.add_ms, 50), 1), "add_p99_ms": round(pct(churn.add_ms, 99), 1),
        "del_p50_ms": round(pct(churn.del_ms, 50), 1), "del_p99_ms": round(pct(churn.del_ms, 99), 1),
        "failed_calls": len(churn.failures), "allocations_left": allocations,
        "ipam_check_clean": "No leaks found." in check, "weps_left": len(weps),
        **{f"rss_growth_mb_{n}": round(rss1[n] - rss0[n], 2) for n in nodes},
        **{f"{what}_changed_{n}": base[n][what] != after[n][what] for n in nodes
           for what in ("routes", "rules", "nft", "veths")},
    }
    targets = [("every ADD and DEL succeeded", figures["failed_calls"] == 0),
               ("no address left allocated", allocations == 0 and figures["ipam_check_clean"]),
               ("no WorkloadEndpoint left", not weps)]
    for n in nodes:
        targets += [(f"{n}: no host veth left", not after[n]["veths"]),
                    (f"{n}: routes, rules, nftables as at the baseline",
                     all(base[n][w] == after[n][w] for w in ("routes", "rules", "nft"))),
                    (f"{n}: agent RSS {rss0[n]:.1f} -> {rss1[n]:.1f} MB, growth <= {RSS_GROWTH_MB} MB",
                     rss1[n] - rss0[n] <= RSS_GROWTH_MB)]
    if args.json:
        print(json.dumps({"figures": figures, "targets": dict(targets)}, indent=2))
    else:
        print(f"soak: {args.cycles} ADD/DEL cycles on 2 nodes, {args.parallel} at a time "
              f"(after {args.warmup} warm-up cycles)")
        print(f"  {figures['cycles_per_s']} cycles/s ({figures['wall_s']} s); ADD p50 {figures['add_p50_ms']} ms, "
              f"p99 {figures['add_p99_ms']} ms; DEL p50 {figures['del_p50_ms']} ms, p99 {figures['del_p99_ms']} ms")
        for what, ok in targets:
            print(f"  {'PASS' if ok else 'MISS'}  {what}")
        for f in churn.failures[:5]:
            print(f"    failed: {f}")
        for n in nodes:
            for w in ("routes", "rules", "nft", "veths"):
                if base[n][w] != after[n][w]:
                    import difflib
                    diff = difflib.unified_diff(base[n][w].splitlines(), after[n][w].splitlines(), lineterm="", n=0)
                    print(f"    {n} {w}:\n      " + "\n      ".join(list(diff)[2:12]))
    return 0 if all(ok for _, ok in targets) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cycles < 1 or args.parallel < 1 or args.warmup < 0:
        ap.error("--cycles and --parallel want at least 1, --warmup at least 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
