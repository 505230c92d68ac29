"""bench/cni: the exec'd `tortie` plugin through a running tortie-agent, against Debian's
`ptp` + `host-local` and the bare interpreter start, same node namespace, same run.

    .venv/bin/python bench/cni/run.py [--pods 200] [--burst 50] [--bursts 3] [--json]
                                      [--profile DIR]

A one-node lab (`tortie.lab.cluster.Lab`, `--tor none`) runs etcd and a real `tortie-agent`
(its event loop, calculation, route/nftables managers and ExaBGP) in its node namespace.
The script enters that node namespace (its network namespace only) and execs, exactly as a
container runtime does (CNI_* env, the network config on stdin, one pod network
namespace per pod):
  - the installed `tortie` shim (the lab's bin dir), answered by the running agent;
  - Debian's `ptp` with `host-local` IPAM, in the same node namespace;
  - the floor: the shim's own interpreter line, `<interpreter> -I -S -c pass`, exec'd
    with the same env and stdin: no Python plugin can start faster than this.
The three are interleaved pod by pod (the order rotates), so load that comes and goes on
the machine falls on all of them alike. Measured: ADD and DEL latency over N sequential
pods (exec to exit, p50/p99) and the wall time of bursts of concurrent ADDs then DELs
(tortie and ptp alternating, median of --bursts).

Targets (the issue "The agent's core", item 6), each against ptp measured here:
  tortie's own share of an ADD (its p50 minus the floor's p50) <= 0.5 x ptp's ADD p50;
  ADD p50 and p99 <= 1.4 x ptp's; DEL p50 <= 1.2 x ptp's; ADD burst <= 1.5 x ptp's.
A missed target prints MISS and the script exits 1.

--profile DIR samples the agent with py-spy during the sequential tortie ADDs and writes
DIR/agent-add.txt (collapsed stacks) plus the top lines by self and total time.
Everything (the lab, the pod namespaces, host-local's state) is removed at the end, also
on failure.
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

from tortie.lab.benchutil import Profiler, cni_env, exec_concurrently, pct

PTP_SUBNET = "10.97.0.0/16"  # outside the lab's pool (10.65.0.0/16) and underlay (10.99.0.0/16)
PLUGINS = ("tortie", "ptp", "floor")
# ratio targets against ptp+host-local measured in the same run (never loosen them)
TARGETS = {
    "add_share_p50": ("tortie ADD p50 - floor ADD p50", "add_p50_ms", 0.5),
    "add_p50": ("tortie ADD p50", "add_p50_ms", 1.4),
    "add_p99": ("tortie ADD p99", "add_p99_ms", 1.4),
    "del_p50": ("tortie DEL p50", "del_p50_ms", 1.2),
    "burst_add": ("tortie ADD burst", "burst_add_s", 1.5),
}


# ---- the lab; the measurements run in its node namespace -------------------------------------


def run(args: argparse.Namespace) -> int:
    from tortie.lab.cluster import Lab
    from tortie.lab.nsutil import in_netns

    name = "bcni" + uuid.uuid4().hex[:6]
    lab = Lab.up(name=name, nodes=1, tor="none", agent="agent")  # the agent as the lab runs it
    work = tempfile.mkdtemp(prefix="tortie-bench-cni-")
    st = lab.state()
    node = lab.plan().nodes[0]
    bench = Bench(name, st.bin_dir, work)
    try:
        confs = {
            "tortie": json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
                                  "agentSocket": lab.cni_socket(node.name)}).encode(),
            "ptp": json.dumps({"cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "ipMasq": False,
                               "ipam": {"type": "host-local", "subnet": PTP_SUBNET,
                                        "dataDir": os.path.join(work, "hl")}}).encode(),
        }
        confs["floor"] = confs["tortie"]
        agent_pid = st.proc(f"agent:{node.name}").pid
        # the threads that serve a CNI request: the agent's loop and the CNI server's pool
        profile = (Profiler(agent_pid, os.path.abspath(args.profile), threads=("MainThread", "tortie-cni", "tortie-dataplane"))
                   if args.profile else None)
        # This thread enters the node's network namespace (not its mount namespace, so the pod
        # namespaces it makes are visible to the agent); every plugin exec'd from it starts there.
        with in_netns(node.netns):
            results = bench.measure(confs, args.pods, args.burst, args.bursts, profile)
        verdicts = check(results)
        report(results, verdicts, bench.failures, bench.floor_cmd, args)
        # a failed tortie call in a burst is a MISS too (the runtime would have to retry it)
        failed = any(f["plugin"] == "tortie" and f["failed"] for f in bench.failures)
        return 0 if all(v["verdict"] == "PASS" for v in verdicts.values()) and not failed else 1
    finally:
        bench.drop_netns()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


# ---- the measurements ---------------------------------------------------------------------------


def shim_interpreter(shim: str) -> list[str]:
    """The shim's interpreter line as argv: `#!/usr/bin/python3.11 -IS` -> [path, "-IS"]."""
    with open(shim, "rb") as f:
        first = f.readline().decode().strip()
    if not first.startswith("#!"):
        raise RuntimeError(f"{shim} has no interpreter line")
    return first[2:].split()


class Bench:
    def __init__(self, lab: str, bin_dir: str, work: str) -> None:
        self.lab = lab
        self.bin_dir = bin_dir
        self.work = work
        self.n = 0
        self.netns: list[str] = []
        self.failures: list[dict] = []  # failed calls in the bursts
        interp = shim_interpreter(os.path.join(bin_dir, "tortie"))
        self.argv = {
            "tortie": [os.path.join(bin_dir, "tortie")],
            "ptp": ["/usr/lib/cni/ptp"],
            # the floor: the shim's interpreter started bare, `-I -S -c pass`, exec'd the same way
            "floor": [interp[0], "-I", "-S", "-c", "pass"],
        }
        self.floor_cmd = " ".join(self.argv["floor"])

    def pod_ns(self) -> str:
        """A pod network namespace named like the lab's pods, so the lab's teardown finds it."""
        self.n += 1
        name = f"{self.lab}-pod-b{self.n}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)
        return name

    def drop_netns(self) -> None:
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.netns.clear()

    def env(self, command: str, cid: str, ns: str) -> dict:
        return cni_env(command, cid, ns, f"{self.bin_dir}:/usr/lib/cni")

    def exec_timed(self, plugin: str, command: str, cid: str, ns: str, conf: bytes) -> float | None:
        """Exec to exit; None if the call failed (recorded in self.failures: a MISS for tortie)."""
        t = time.perf_counter()
        r = subprocess.run(self.argv[plugin], input=conf, env=self.env(command, cid, ns), capture_output=True)
        dt = time.perf_counter() - t
        self.fail(plugin, command, "sequential", int(r.returncode != 0), 1,
                  (r.stdout or r.stderr or f"exit {r.returncode}".encode()).decode(errors="replace"))
        return dt if r.returncode == 0 else None

    def fail(self, plugin: str, command: str, phase: str, failed: int, of: int, example: str) -> None:
        for f in self.failures:  # one line per plugin, command and phase
            if (f["plugin"], f["command"], f["phase"]) == (plugin, command, phase):
                f["failed"] += failed
                f["of"] += of
                f["example"] = f["example"] or (example.strip()[:300] if failed else "")
                return
        self.failures.append({"plugin": plugin, "command": command, "phase": phase, "failed": failed, "of": of,
                              "example": example.strip()[:300] if failed else ""})

    def burst(self, plugin: str, command: str, pods: list[tuple[str, str]], conf: bytes) -> float:
        """Wall time of the burst; failed calls are counted (a runtime would retry them: so do we,
        one by one, so the next burst starts clean)."""
        dt, failed = exec_concurrently(self.argv[plugin], [self.env(command, cid, ns) for cid, ns in pods], conf)
        self.fail(plugin, command, "burst", len(failed), len(pods), failed[0][1] if failed else "")
        if failed:
            for i, _ in failed:
                cid, ns = pods[i]
                subprocess.run(self.argv[plugin], input=conf, env=self.env(command, cid, ns), capture_output=True)
        return dt

    def measure(self, confs: dict[str, bytes], pods: int, burst: int, bursts: int,
                profile: Profiler | None) -> dict:
        times = {p: {"ADD": [], "DEL": []} for p in PLUGINS}
        # one warm-up pod each (first block claim, page cache), not counted
        for plugin in PLUGINS:
            cid, ns = uuid.uuid4().hex, self.pod_ns()
            self.exec_timed(plugin, "ADD", cid, ns, confs[plugin])
            self.exec_timed(plugin, "DEL", cid, ns, confs[plugin])
        seq = [{p: (uuid.uuid4().hex, self.pod_ns()) for p in PLUGINS} for _ in range(pods)]
        if profile:
            profile.start("agent-add")
        for command in ("ADD", "DEL"):
            if profile and command == "DEL":
                profile.stop()
                profile.start("agent-del")
            for i, pod in enumerate(seq):
                order = PLUGINS[i % 3:] + PLUGINS[:i % 3]  # rotate who goes first
                for plugin in order:
                    cid, ns = pod[plugin]
                    dt = self.exec_timed(plugin, command, cid, ns, confs[plugin])
                    if dt is not None:  # a failed ADD is still DELeted below (DEL is idempotent)
                        times[plugin][command].append(dt)
        if profile:
            profile.stop()
        self.drop_netns()
        bursts_t = {p: {"ADD": [], "DEL": []} for p in PLUGINS}
        for r in range(bursts):
            order = PLUGINS if r % 2 == 0 else ("ptp", "tortie", "floor")
            for plugin in order:
                group = [(uuid.uuid4().hex, self.pod_ns()) for _ in range(burst)]
                bursts_t[plugin]["ADD"].append(self.burst(plugin, "ADD", group, confs[plugin]))
                bursts_t[plugin]["DEL"].append(self.burst(plugin, "DEL", group, confs[plugin]))
            self.drop_netns()
        ms = 1000.0
        out = {}
        for p in PLUGINS:
            adds, dels = times[p]["ADD"], times[p]["DEL"]
            out[p] = {
                "add_p50_ms": statistics.median(adds) * ms, "add_p99_ms": pct(adds, 99) * ms,
                "del_p50_ms": statistics.median(dels) * ms, "del_p99_ms": pct(dels, 99) * ms,
                "burst_add_s": statistics.median(bursts_t[p]["ADD"]),
                "burst_del_s": statistics.median(bursts_t[p]["DEL"]),
                "burst_add_runs_s": bursts_t[p]["ADD"], "burst_del_runs_s": bursts_t[p]["DEL"],
            }
        return out


def check(results: dict) -> dict:
    t, ref, floor = results["tortie"], results["ptp"], results["floor"]
    out = {}
    for key, (what, metric, factor) in TARGETS.items():
        value = t[metric] - floor[metric] if key == "add_share_p50" else t[metric]
        limit = factor * ref[metric]
        out[key] = {"what": what, "value": value, "ptp": ref[metric], "factor": factor, "limit": limit,
                    "ratio": value / ref[metric] if ref[metric] else None,
                    "verdict": "PASS" if value <= limit else "MISS"}
    return out


def report(results: dict, verdicts: dict, failures: list[dict], floor_cmd: str, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pods": args.pods,
                          "burst": args.burst, "bursts": args.bursts, "floor": floor_cmd,
                          "results": results, "targets": verdicts, "burst_failures": failures}, indent=2))
        return
    print(f"CNI through a running tortie-agent: {args.pods} sequential pods (interleaved with the "
          f"references), then {args.bursts} bursts of {args.burst} concurrent; exec to exit, inside "
          "one node namespace")
    print(f"floor = `{floor_cmd}` exec'd like a plugin")
    print(f"{'metric':<14}{'tortie':>12}{'ptp+host-local':>16}{'floor':>12}")
    for key, unit in (("add_p50_ms", "ms"), ("add_p99_ms", "ms"), ("del_p50_ms", "ms"), ("del_p99_ms", "ms"),
                      ("burst_add_s", "s"), ("burst_del_s", "s")):
        fmt = "{:.1f}" if unit == "ms" else "{:.3f}"
        row = [fmt.format(results[p][key]) + " " + unit for p in PLUGINS]
        print(f"{key:<14}{row[0]:>12}{row[1]:>16}{row[2]:>12}")
    print("\ntargets (against ptp+host-local, same run):")
    for v in verdicts.values():
        unit = "s" if "burst" in v["what"] else "ms"
        fmt = "{:.3f}" if unit == "s" else "{:.1f}"
        print(f"  {v['what']:<32} {fmt.format(v['value']):>7} {unit} <= {v['factor']}x ptp "
              f"({fmt.format(v['limit'])} {unit})   {v['ratio']:.2f}x  {v['verdict']}")
    for f in failures:
        if not f["failed"]:
            continue
        verdict = "MISS" if f["plugin"] == "tortie" else "(reference)"
        print(f"  {f['plugin']} {f['phase']} {f['command']}: {f['failed']} of {f['of']} calls failed {verdict}: "
              f"{f['example']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--bursts", type=int, default=3, help="bursts per plugin (median)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the agent during the tortie ADDs and DELs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cni needs root (network namespaces)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
