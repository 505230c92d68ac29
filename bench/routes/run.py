"""bench/routes: tortie's RouteManager against `ip -batch`, same routes, same namespace.

Runs in its own uniquely named network namespace (a veth pair inside it), always removed:
  install   50,000 /32 routes (Route() from strings + set_routes + apply, vs `ip -batch`
            reading a file of `route add` lines), median of 5 rounds that alternate the two
            (wall clock; the CPU time of each is shown too)
  resync    a full resync of 50,000 installed routes with nothing to change (resync() +
            apply(): dump + diff), median of 5; the first one after the install is shown
            too (its messages are not in the dump parser's cache yet)
  change    one route changed with 50,000 installed (set_route + apply), median of 25
  remove    all 50,000 removed (set_routes([]) + apply vs `ip -batch` route del), medians
  memory    RSS of a fresh process whose manager holds 10,000 routes + 250 workload routes

    python bench/routes/run.py [--routes N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.route_mgr import RouteManager

TARGET_INSTALL_RATIO = 1.5  # tortie's install rate over `ip -batch`'s, same run
TARGET_CHANGE_MS = 5.0
TARGET_RESYNC_S = 0.2
TARGET_RSS_MB = 80.0


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def host_ips(n: int, base: int = 10 << 24 | 64 << 16) -> list[str]:
    return [f"{(a >> 24) & 255}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
            for a in range(base, base + n)]


def kernel_count(ns: str) -> int:
    out = sh("ip", "-n", ns, "route", "show", "proto", str(TORTIE_PROTO)).stdout
    return out.count("\n")


def ip_batch(ns: str, lines: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        t0 = time.perf_counter()
        sh("ip", "-n", ns, "-batch", f.name)
        return time.perf_counter() - t0
    finally:
        os.unlink(f.name)


MEMORY_PROBE = r"""
import sys
from tortie.routing.model import Route
from tortie.routing.route_mgr import RouteManager
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
ns, dev = sys.argv[1], sys.argv[2]
m = RouteManager(netns=ns)
base = rss()
bgp = [Route(f"10.{96 + i // 256}.{i % 256}.0/26", gateways=("10.255.0.2",)) for i in range(10000)]
pods = [Route(f"10.250.{i // 256}.{i % 256}/32", dev=dev) for i in range(250)]
m.set_routes("bgp", bgp)
m.set_routes("workloads", pods)
del bgp, pods
st = m.apply()
assert not st.errors, st.errors[:3]
m.resync(); m.apply()
print(base, rss())
"""


def remove_all(m: RouteManager, n: int, ns: str) -> float:
    t0 = time.perf_counter()
    m.set_routes("workloads", [])
    st = m.apply()
    took = time.perf_counter() - t0
    assert st.deleted == n and not st.errors, st
    assert kernel_count(ns) == 0
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5,
                    help="install/remove rounds, alternating with ip -batch (medians)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.routes
    ns = f"tt-bench-routes-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", ns)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "vA", "type", "veth", "peer", "name", "vB"],
                    ["link", "set", "vA", "up"], ["link", "set", "vB", "up"],
                    ["addr", "add", "10.255.0.1/16", "dev", "vA"]):
            sh("ip", "-n", ns, *cmd)
        res = run(ns, n, args.rounds)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    report(res, n, args.json)
    return 0 if all(c["pass"] for c in res["checks"]) else 1


def run(ns: str, n: int, rounds: int) -> dict:
    ips = host_ips(n)
    add_lines = [f"route add {ip}/32 dev vA proto {TORTIE_PROTO}" for ip in ips]
    del_lines = [f"route del {ip}/32 dev vA proto {TORTIE_PROTO}" for ip in ips]
    m = RouteManager(netns=ns)
    m.resync()  # a running agent: the first dump is behind it
    ip_adds, ip_dels, adds, dels, builds, cpu, ip_cpu = [], [], [], [], [], [], []
    # Rounds alternate `ip -batch` and tortie on the same routes in the same namespace, so
    # load drift on this shared machine falls on both sides of the ratio; medians.
    for rnd in range(rounds):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ip_adds.append(ip_batch(ns, add_lines))
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ip_cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert kernel_count(ns) == n
        ip_dels.append(ip_batch(ns, del_lines))
        assert kernel_count(ns) == 0
        # Timed like `ip -batch`, which parses its text too: Route objects built from
        # strings, set as desired, applied.
        c0 = time.thread_time()
        t0 = time.perf_counter()
        routes = [Route(f"{ip}/32", dev="vA") for ip in ips]
        builds.append(time.perf_counter() - t0)
        m.set_routes("workloads", routes)
        st = m.apply()
        adds.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        assert st.added == n and not st.errors, st
        assert kernel_count(ns) == n
        if rnd < rounds - 1:  # the last round's routes stay for the resync and change runs
            dels.append(remove_all(m, n, ns))
    t_ip_add, t_ip_del = statistics.median(ip_adds), statistics.median(ip_dels)
    t_add, t_build = statistics.median(adds), statistics.median(builds)

    resyncs = []
    for _ in range(5):
        t0 = time.perf_counter()
        m.resync()
        st = m.apply()
        resyncs.append(time.perf_counter() - t0)
        assert st.added == st.replaced == st.deleted == 0, st
    t_resync = statistics.median(resyncs)

    changes = []
    for i in range(25):
        r = routes[i * 997 % n]
        moved = Route(r.dst, dev="vB")
        t0 = time.perf_counter()
        m.set_route("workloads", moved)
        st = m.apply()
        changes.append(time.perf_counter() - t0)
        assert st.replaced == 1 and not st.errors, st
        if i == 0:  # the kernel really has it
            shown = sh("ip", "-n", ns, "route", "show", r.dst.split("/")[0]).stdout
            assert "dev vB" in shown, shown
        m.set_route("workloads", r)  # and back, untimed
        m.apply()
    t_change = statistics.median(changes)

    dels.append(remove_all(m, n, ns))
    t_del = statistics.median(dels)
    m.kernel.close()

    out = sh(sys.executable, "-c", MEMORY_PROBE, ns, "vA").stdout.split()
    rss_base, rss = float(out[0]), float(out[1])

    checks = [
        {"name": f"install routes/s >= {TARGET_INSTALL_RATIO}x ip -batch", "value": n / t_add,
         "ref": TARGET_INSTALL_RATIO * n / t_ip_add,
         "pass": n / t_add >= TARGET_INSTALL_RATIO * n / t_ip_add},
        {"name": f"one change <= {TARGET_CHANGE_MS} ms", "value": t_change * 1e3,
         "ref": TARGET_CHANGE_MS, "pass": t_change * 1e3 <= TARGET_CHANGE_MS},
        {"name": f"no-op resync <= {TARGET_RESYNC_S} s", "value": t_resync, "ref": TARGET_RESYNC_S,
         "pass": t_resync <= TARGET_RESYNC_S},
        {"name": f"RSS with 10k+250 routes <= {TARGET_RSS_MB:.0f} MB", "value": rss,
         "ref": TARGET_RSS_MB, "pass": rss <= TARGET_RSS_MB},
    ]
    return {
        "routes": n,
        "rounds": rounds,
        "install_runs_s": {"tortie": adds, "ip_batch": ip_adds},
        "install_cpu_s": {"tortie": cpu, "ip_batch": ip_cpu},
        "tortie": {"install_s": t_add, "resync_noop_s": t_resync, "resync_first_s": resyncs[0], "change_ms_p50": t_change * 1e3,
                   "change_ms_max": max(changes) * 1e3, "remove_s": t_del,
                   "build_route_objects_s": t_build, "rss_mb": rss, "rss_before_routes_mb": rss_base},
        "ip_batch": {"install_s": t_ip_add, "remove_s": t_ip_del},
        "checks": checks,
    }


def report(res: dict, n: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t, ip = res["tortie"], res["ip_batch"]
    print(f"bench/routes: {n:,} /32 routes in a fresh namespace, medians of {res['rounds']} "
          "alternating rounds")
    print(f"{'':28}{'tortie':>14}{'ip -batch':>14}")
    print(f"{'install (s)':28}{t['install_s']:14.3f}{ip['install_s']:14.3f}")
    runs = res["install_runs_s"]
    cpu = res["install_cpu_s"]
    for label, d in (("  each round (s)", runs), ("  its CPU time (s)", cpu)):
        print(f"{label:28}{' '.join(f'{x:.3f}' for x in d['tortie']):>14}"
              f"  {' '.join(f'{x:.3f}' for x in d['ip_batch'])}")
    print(f"{'install (routes/s)':28}{n / t['install_s']:14,.0f}{n / ip['install_s']:14,.0f}")
    print(f"{'remove (s)':28}{t['remove_s']:14.3f}{ip['remove_s']:14.3f}")
    print(f"{'no-op resync (s)':28}{t['resync_noop_s']:14.3f}{'-':>14}")
    print(f"{'  first after install (s)':28}{t['resync_first_s']:14.3f}{'-':>14}")
    print(f"{'one change p50 / max (ms)':28}{t['change_ms_p50']:7.2f} /{t['change_ms_max']:5.2f}{'-':>14}")
    print(f"{'  of which Route() (s)':28}{t['build_route_objects_s']:14.3f}{'-':>14}")
    print(f"{'RSS 10k+250 routes (MB)':28}{t['rss_mb']:14.1f}   (before routes {t['rss_before_routes_mb']:.1f})")
    print()
    for c in res["checks"]:
        print(f"  {'PASS' if c['pass'] else 'MISS'}  {c['name']:36} {c['value']:12,.3f}  (ref {c['ref']:,.3f})")


if __name__ == "__main__":
    sys.exit(main())
