"""`make demo`: a two-node tortie lab behind a BIRD router, four pods, who reaches whom
(nodes, pods and an outside host), then everything removed.

Run as root: python -m tortie.lab.demo [--name LAB] [--tor bird|frr|none] [--keep]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from tortie.errors import TortieError
from tortie.lab import nsutil, routers, topology
from tortie.lab.cluster import Lab
from tortie.lab.teardown import teardown

DEMO_LAB = "demo"
NODES = 2
PODS = (("node1", "default/web-1"), ("node1", "default/web-2"),
        ("node2", "default/web-3"), ("node2", "shop/cart-1"))


def _step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _show_ctl(lab: Lab, *args: str) -> None:
    print(f"$ tortie-lab ctl -- {' '.join(args)}")
    try:
        r = lab.ctl(*args, check=False)
    except (TortieError, OSError) as exc:
        print(f"  (tortiectl unavailable: {exc})")
        return
    print((r.stdout + r.stderr).rstrip() or "(no output)")


def run(name: str, keep: bool = False, tor: str = "bird") -> int:
    t0 = time.monotonic()
    where = "on one L2 segment" if tor == "none" else f"each on its own link to a {tor} router"
    print(f"tortie lab demo: {NODES} nodes {where}, each a network namespace,\n"
          f"etcd in its own namespace, pods wired by the tortie CNI plugin. Lab name: {name}.")
    lab: Lab | None = None
    try:
        _step(1, f"tortie-lab up --nodes {NODES} --tor {tor} --name {name}")
        lab = Lab.up(name, NODES, tor, echo=lambda s: print(f"  {s}", flush=True))

        _step(2, "tortie-lab pod add NODE NAMESPACE/NAME  (every pod serves TCP+UDP on 80 and 81)")
        for node, pod in PODS:
            print(f"  {pod:<16} on {node}: {lab.pod_add(node, pod)}", flush=True)

        _step(3, "the address pool in etcd")
        _show_ctl(lab, "get", "ippools")
        _step(4, "address blocks claimed by the nodes")
        _show_ctl(lab, "ipam", "show", "--show-blocks")

        for t in lab.status()["tors"]:
            _step(5, f"routes the {t['kind']} router learned over BGP (each node announces its blocks)")
            r = nsutil.run(["ip", "-n", t["namespace"], "-4", "route", "show", "proto",
                             routers.KERNEL_PROTO[t["kind"]]], check=False)
            print("\n".join(f"  {line}" for line in r.stdout.splitlines()) or "  (none yet)")

        _step(6, "tortie-lab matrix: every node and pod to every pod, TCP and UDP on port 80")
        m = lab.matrix(80)
        for _ in range(20):  # routes between nodes arrive over BGP a moment after the pods
            if m.ok:
                break
            time.sleep(0.5)
            m = lab.matrix(80)
        print(m.render())
        for r in m.failures[:8]:
            print(f"  {r.src} -> {r.dst} {r.proto}: {r.error or 'no answer'}")
        if not m.ok:
            print("  (traffic between nodes needs their BGP routes: see logs in "
                  f"{lab.state().dir}/logs)")
        if keep:
            print(f"\nlab kept: try `tortie-lab --name {name} status`, then `tortie-lab --name {name} down`")
        return 0 if m.ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except TortieError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if not keep or lab is None:
            # A second Ctrl-C must not cut the teardown short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _step(7, f"tortie-lab down --name {name}")
            left = teardown(name)
            print("  everything removed" if not left else f"  left behind: {left}")
            print(f"\ndemo took {time.monotonic() - t0:.1f}s")


def main(name: str | None = None, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tortie-lab demo")
    ap.add_argument("--name", default=name or DEMO_LAB)
    ap.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    ap.add_argument("--tor", default="bird", choices=topology.TOR_KINDS)
    args = ap.parse_args(argv)
    topology.check_lab_name(args.name)
    signal.signal(signal.SIGTERM, _interrupt)
    return run(args.name, keep=args.keep, tor=args.tor)


if __name__ == "__main__":
    sys.exit(main())
