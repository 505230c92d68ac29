"""bench/cni: the exec'd `tortie` plugin against Debian's `ptp` + `host-local`, same node, same run.

    .venv/bin/python bench/cni/run.py [--pods 200] [--burst 50] [--json]

Everything happens in a node network namespace of this run's own: the script re-executes
itself inside it, starts a private etcd (loopback of that namespace) and the CNI server,
installs the shim into a private bin dir and execs the plugins as a runtime does
(CNI_* env, config on stdin), one pod network namespace per pod. Measured per plugin:
ADD and DEL latency over N sequential pods (exec to exit, p50/p99) and the wall time of
a burst of concurrent ADDs (then DELs). ptp sets ip_forward in the namespace it runs in,
which is why it only ever runs inside this node namespace. Everything is removed at the
end, also on failure.
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

from tortie.lab.nsutil import stop_group

TARGETS = {"add_p50_ms": 25.0, "add_p99_ms": 60.0, "burst_add_s": 2.5}
POOL = "10.96.0.0/16"
PTP_SUBNET = "10.97.0.0/16"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


# ---- outer: make the node namespace, run inside it, always clean up ---------------------------


def outer(args: argparse.Namespace) -> int:
    run = f"tbc-{uuid.uuid4().hex[:6]}"
    node_ns = f"{run}-node"
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    try:
        subprocess.run(["ip", "-n", node_ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", node_ns, "addr", "add", "192.168.251.1/32", "dev", "lo"], check=True)
        cmd = ["ip", "netns", "exec", node_ns, sys.executable, os.path.abspath(__file__), "--inner", run,
               "--pods", str(args.pods), "--burst", str(args.burst)]
        if args.json:
            cmd.append("--json")
        return subprocess.run(cmd).returncode
    finally:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(f"{run}-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ---- inner: runs inside the node namespace -------------------------------------------------


class Bench:
    def __init__(self, run: str, work: str) -> None:
        self.run = run
        self.work = work
        self.bin_dir = os.path.join(work, "bin")
        self.n = 0

    def pod_ns(self) -> str:
        self.n += 1
        name = f"{self.run}-p{self.n}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        return name

    def env(self, command: str, cid: str, ns: str) -> dict:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0", "CNI_PATH": self.bin_dir,
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-{cid[:8]}"}

    def exec_timed(self, plugin: str, command: str, cid: str, ns: str, conf: bytes) -> float:
        t = time.perf_counter()
        r = subprocess.run([os.path.join(self.bin_dir, plugin)], input=conf, env=self.env(command, cid, ns),
                           capture_output=True)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"{plugin} {command} failed: {r.stdout.decode()} {r.stderr.decode()}")
        return dt

    def burst(self, plugin: str, command: str, pods: list[tuple[str, str]], conf: bytes) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen([os.path.join(self.bin_dir, plugin)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env(command, cid, ns))
                 for cid, ns in pods]
        for p in procs:  # feed everyone first, then collect: they all run at once
            p.stdin.write(conf)
            p.stdin.close()
        failures = []
        for p in procs:
            out = p.stdout.read()
            p.stderr.read()
            if p.wait() != 0:
                failures.append(out.decode())
            p.stdout.close()
            p.stderr.close()
        dt = time.perf_counter() - t
        if failures:
            raise RuntimeError(f"{plugin} burst {command}: {len(failures)} failed, e.g. {failures[0]}")
        return dt

    def measure(self, plugin: str, conf: dict, pods: int, burst: int) -> dict:
        raw = json.dumps(conf).encode()
        # one warm-up pod (first block claim, page cache), not counted
        cid, ns = uuid.uuid4().hex, self.pod_ns()
        self.exec_timed(plugin, "ADD", cid, ns, raw)
        self.exec_timed(plugin, "DEL", cid, ns, raw)
        seq = [(uuid.uuid4().hex, self.pod_ns()) for _ in range(pods)]
        adds = [self.exec_timed(plugin, "ADD", cid, ns, raw) for cid, ns in seq]
        dels = [self.exec_timed(plugin, "DEL", cid, ns, raw) for cid, ns in seq]
        group = [(uuid.uuid4().hex, self.pod_ns()) for _ in range(burst)]
        burst_add = self.burst(plugin, "ADD", group, raw)
        burst_del = self.burst(plugin, "DEL", group, raw)
        for _cid, pod in [*seq, *group, (cid, ns)]:
            subprocess.run(["ip", "netns", "del", pod], capture_output=True)
        ms = 1000.0
        return {
            "add_p50_ms": statistics.median(adds) * ms, "add_p99_ms": pct(adds, 99) * ms,
            "del_p50_ms": statistics.median(dels) * ms, "del_p99_ms": pct(dels, 99) * ms,
            "burst_add_s": burst_add, "burst_del_s": burst_del,
        }


def inner(args: argparse.Namespace) -> int:
    os.environ.setdefault("TORTIE_LOG_LEVEL", "warning")
    from tortie.cni.install import install
    from tortie.datastore.etcd import EtcdClient, EtcdConfig
    from tortie.datastore.store import ResourceStore
    from tortie.lab.etcd_server import EtcdServer

    work = tempfile.mkdtemp(prefix="tortie-bench-cni-")
    etcd = server = log = None
    try:
        bench = Bench(args.inner, work)
        install(bench.bin_dir)
        for plugin in ("ptp", "host-local"):
            os.symlink(f"/usr/lib/cni/{plugin}", os.path.join(bench.bin_dir, plugin))
        os.makedirs(os.path.join(work, "etcd"))
        etcd = EtcdServer(data_dir=os.path.join(work, "etcd")).start()
        prefix = "/tortie-bench/"
        with EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix)) as client:
            ResourceStore(client).apply({"apiVersion": "tortie.io/v1", "kind": "IPPool",
                                         "metadata": {"name": "bench"}, "spec": {"cidr": POOL, "blockSize": 26}})
        sock = os.path.join(work, "cni.sock")
        log = open(os.path.join(work, "server.log"), "wb")
        env = {**os.environ, "TORTIE_ETCD_ENDPOINTS": etcd.endpoint, "TORTIE_ETCD_PREFIX": prefix,
               "TORTIE_LOG_LEVEL": "warning", "TORTIE_LOG_FORMAT": "json"}
        server = subprocess.Popen([sys.executable, "-m", "tortie.agent.cni_server", "--socket", sock,
                                   "--node", "bench-node"], env=env, stdout=subprocess.PIPE, stderr=log,
                                  start_new_session=True)
        if not server.stdout.readline().startswith(b"ready"):
            raise RuntimeError("CNI server did not start; see " + log.name)

        tortie_conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie", "agentSocket": sock}
        ptp_conf = {"cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "ipMasq": False,
                    "ipam": {"type": "host-local", "subnet": PTP_SUBNET, "dataDir": os.path.join(work, "hl")}}
        results = {
            "tortie": bench.measure("tortie", tortie_conf, args.pods, args.burst),
            "ptp+host-local": bench.measure("ptp", ptp_conf, args.pods, args.burst),
        }
        report(results, args)
        t = results["tortie"]
        return 0 if all(t[k] <= v for k, v in TARGETS.items()) else 1
    finally:
        if server is not None:
            stop_group(server, 10)
            server.stdout.close()
        if log is not None:
            log.close()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, args: argparse.Namespace) -> None:
    t, ref = results["tortie"], results["ptp+host-local"]
    verdicts = {k: ("PASS" if t[k] <= v else "MISS") for k, v in TARGETS.items()}
    if args.json:
        print(json.dumps({"pods": args.pods, "burst": args.burst, "results": results, "targets": TARGETS,
                          "verdicts": verdicts}, indent=2))
        return
    print(f"CNI: {args.pods} sequential pods, then a burst of {args.burst} concurrent; exec to exit, "
          "inside one node namespace")
    print(f"{'metric':<16}{'tortie':>12}{'ptp+host-local':>16}{'target':>10}  verdict")
    for key, unit in (("add_p50_ms", "ms"), ("add_p99_ms", "ms"), ("del_p50_ms", "ms"), ("del_p99_ms", "ms"),
                      ("burst_add_s", "s"), ("burst_del_s", "s")):
        fmt = "{:.1f}" if unit == "ms" else "{:.2f}"
        target = TARGETS.get(key)
        print(f"{key:<16}{fmt.format(t[key]) + ' ' + unit:>12}{fmt.format(ref[key]) + ' ' + unit:>16}"
              f"{(fmt.format(target) + ' ' + unit) if target else '-':>10}  {verdicts.get(key, '')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cni needs root (network namespaces)", file=sys.stderr)
        return 2
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
