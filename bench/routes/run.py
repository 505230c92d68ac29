"""bench/routes: tortie's RouteManager against `ip -batch`, same routes, same namespace.

Runs in its own uniquely named network namespace (a veth pair inside it), always removed:
  install   50,000 /32 routes (Route() from strings + set_routes + apply, vs `ip -batch`
            reading a file of `route add` lines)
  resync    a full resync of 50,000 installed routes with nothing to change (dump + diff)
  change    one route changed with 50,000 installed (set_route + apply), median of 25
  remove    all 50,000 removed (set_routes([]) + apply vs `ip -batch` route del)
  memory    RSS of a fresh process whose manager holds 10,000 routes + 250 workload routes

    python bench/routes/run.py [--routes N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tortie.routing.model import TORTIE_PROTO, Route
from tortie.routing.route_mgr import RouteManager

TARGET_CHANGE_MS = 5.0
TARGET_RESYNC_S = 0.5
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=50_000)
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
        res = run(ns, n)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    report(res, n, args.json)
    return 0 if all(c["pass"] for c in res["checks"]) else 1


def run(ns: str, n: int) -> dict:
    ips = host_ips(n)
    # ip -batch: the reference, same routes, same namespace
    t_ip_add = ip_batch(ns, [f"route add {ip}/32 dev vA proto {TORTIE_PROTO}" for ip in ips])
    assert kernel_count(ns) == n
    t_ip_del = ip_batch(ns, [f"route del {ip}/32 dev vA proto {TORTIE_PROTO}" for ip in ips])
    assert kernel_count(ns) == 0

    m = RouteManager(netns=ns)
    m.resync()
    # Timed like `ip -batch`, which parses its text too: Route objects built from strings,
    # set as desired, applied.
    t0 = time.perf_counter()
    routes = [Route(f"{ip}/32", dev="vA") for ip in ips]
    t_build = time.perf_counter() - t0
    m.set_routes("workloads", routes)
    st = m.apply()
    t_add = time.perf_counter() - t0
    assert st.added == n and not st.errors, st
    assert kernel_count(ns) == n

    resyncs = []
    for _ in range(3):
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

    t0 = time.perf_counter()
    m.set_routes("workloads", [])
    st = m.apply()
    t_del = time.perf_counter() - t0
    assert st.deleted == n and not st.errors, st
    assert kernel_count(ns) == 0
    m.kernel.close()

    out = sh(sys.executable, "-c", MEMORY_PROBE, ns, "vA").stdout.split()
    rss_base, rss = float(out[0]), float(out[1])

    checks = [
        {"name": "install routes/s >= ip -batch", "value": n / t_add, "ref": n / t_ip_add,
         "pass": n / t_add >= n / t_ip_add},
        {"name": f"one change <= {TARGET_CHANGE_MS} ms", "value": t_change * 1e3,
         "ref": TARGET_CHANGE_MS, "pass": t_change * 1e3 <= TARGET_CHANGE_MS},
        {"name": f"no-op resync <= {TARGET_RESYNC_S} s", "value": t_resync, "ref": TARGET_RESYNC_S,
         "pass": t_resync <= TARGET_RESYNC_S},
        {"name": f"RSS with 10k+250 routes <= {TARGET_RSS_MB:.0f} MB", "value": rss,
         "ref": TARGET_RSS_MB, "pass": rss <= TARGET_RSS_MB},
    ]
    return {
        "routes": n,
        "tortie": {"install_s": t_add, "resync_noop_s": t_resync, "change_ms_p50": t_change * 1e3,
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
    print(f"bench/routes: {n:,} /32 routes in a fresh namespace")
    print(f"{'':28}{'tortie':>14}{'ip -batch':>14}")
    print(f"{'install (s)':28}{t['install_s']:14.3f}{ip['install_s']:14.3f}")
    print(f"{'install (routes/s)':28}{n / t['install_s']:14,.0f}{n / ip['install_s']:14,.0f}")
    print(f"{'remove (s)':28}{t['remove_s']:14.3f}{ip['remove_s']:14.3f}")
    print(f"{'no-op resync (s)':28}{t['resync_noop_s']:14.3f}{'-':>14}")
    print(f"{'one change p50 / max (ms)':28}{t['change_ms_p50']:7.2f} /{t['change_ms_max']:5.2f}{'-':>14}")
    print(f"{'  of which Route() (s)':28}{t['build_route_objects_s']:14.3f}{'-':>14}")
    print(f"{'RSS 10k+250 routes (MB)':28}{t['rss_mb']:14.1f}   (before routes {t['rss_before_routes_mb']:.1f})")
    print()
    for c in res["checks"]:
        print(f"  {'PASS' if c['pass'] else 'MISS'}  {c['name']:36} {c['value']:12,.3f}  (ref {c['ref']:,.3f})")


if __name__ == "__main__":
    sys.exit(main())
