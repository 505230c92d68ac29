"""bench/egress: how long a pool's flows are lost when its uplink fails, by how the failure
is detected -- BFD, the kernel's neighbour state alone, the BGP hold time -- side by side.

A 1-node lab (`tortie.lab.cluster.Lab`, --tor bird, --uplinks 2: routers tor1 and tor2 on
two segments, the outside host behind both). Pool A's pod sends a numbered UDP datagram
every 10 ms to an echo on the outside host (one flow, one 5-tuple); the loss window of a
failure is the longest gap between two replies. Before each failure the router that
carries the flow is read from nftables counters in both routers, and the outside host's
route back to the pod is pinned to the other router: the replies' path is not what is
measured (return paths are the routers', issue 11's symmetric-return item), the egress
path is. Then the failure, on the flow's router:

  router stop   `tortie-lab router stop`: links down, daemon killed (a power failure)
  link down     `tortie-lab link down node1 ethK`: the node's uplink cut

and the stream runs until replies come back through the other router (or --cap s).

Detection modes, one after the other in the same run and lab:

  BFD            egress.nextHops: [tor1, tor2], each with bfd {300 ms x 3}; the routers' BIRD
                 runs BFD (100 ms x 3): detection 3 x 300 ms by RFC 5880's negotiation
  neighbour      egress.nextHops: [tor1, tor2] without BFD: only the kernel's neighbour
                 state (fib_multipath_use_neigh) and link state move the flow
  BGP hold time  egress.fromPeers: has(router), both routers announce 0.0.0.0/0 and no BFD:
                 a next hop leaves when its BGP session ends (hold time 9 s in the lab,
                 90 s by default)

Target (issue 11): BFD failover p50 at most 1 s (router stop and link down). A MISS exits 1.

    python bench/egress/run.py [--reps 5] [--slow-reps 2] [--cap 60] [--json]

Run as root. The lab is always removed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

from tortie.lab.benchutil import UDPEcho, UDPStream, add_flow_counter, flow_packets

TARGET_S = 1.0  # BFD failover p50
POOL = "10.70.0.0/16"
TABLE = 201
ECHO_PORT = 7001
INTERVAL = 0.01
BFD = {"minTx": 300, "minRx": 300, "multiplier": 3}
HOLD_TIME = 9  # the lab's (lab.routers.HOLD_TIME); 90 s is BGP's default
COUNTERS = "benchegress"
BFD_MODE = "BFD 300 ms x 3"


def _pool(egress: dict) -> str:
    return json.dumps({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool-a"},
                       "spec": {"cidr": POOL, "blockSize": 26, "egress": {"table": TABLE, **egress}}})


class Bench:
    def __init__(self, lab, cap: float) -> None:
        self.lab, self.cap = lab, cap
        plan = lab.plan()
        self.tors = {t.name: t for t in plan.tors}
        self.gateway = {u.router: u.gateway for u in plan.nodes[0].uplinks}  # tor1 -> 10.99.101.1
        self.ifname = {u.router: u.ifname for u in plan.nodes[0].uplinks}  # tor1 -> eth0
        self.ext = plan.ext_address.split("/")[0]
        self.pod = lab.pod_add("node1", "default/a1", pool="pool-a")
        self.results: dict[str, dict[str, list[float]]] = {}
        self.errors: dict[str, str] = {}  # detection mode -> why it could not be measured

    def counters(self) -> None:
        add_flow_counter(self.lab, self.tors, COUNTERS, f"ip saddr {self.pod} ip daddr {self.ext} udp dport {ECHO_PORT}")

    def packets(self, tor: str) -> int:
        return flow_packets(self.lab, tor, COUNTERS)

    def table(self) -> str:
        r = self.lab.exec("node1", ["ip", "route", "show", "table", str(TABLE)], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    def wait(self, cond, what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not within {seconds}s: {what}")
            time.sleep(0.05)

    def both_next_hops(self) -> bool:
        t = self.table()
        return all(f"via {g} " in t for g in self.gateway.values()) and "dead" not in t

    def trial(self, failure: str) -> float:
        """One failure of the router the flow uses: the longest gap in the replies (s)."""
        try:
            # the routers route the replies to the pod by what they learned from the node
            self.wait(lambda: all(st == "Established" for per in self.lab.bgp_sessions().values()
                                  for st in per.values()), "every BGP session established", 60)
            self.wait(self.both_next_hops, "both next hops in pool A's table", 60)
        except RuntimeError as exc:
            raise RuntimeError(self.diagnose(str(exc))) from None
        stream = UDPStream(self.lab.netns_of("default/a1"), self.ext, ECHO_PORT, INTERVAL)
        pinned = None
        try:
            self.wait(lambda: len(stream.replies) >= 20, "the stream is answered", 10)
            before = {t: self.packets(t) for t in self.tors}
            time.sleep(0.2)
            carrying = [t for t in self.tors if self.packets(t) > before[t]]
            if len(carrying) != 1:
                raise RuntimeError(f"one flow, one router expected; counted on {carrying}")
            victim = carrying[0]
            survivor = next(t for t in self.tors if t != victim)
            pinned = ["route", "replace", f"{self.pod}/32", "via", self.tors[survivor].ip]
            self.lab.exec("ext", ["ip", *pinned], check=True)
            time.sleep(0.3)  # replies settle on the pinned path
            t0 = time.monotonic()
            if failure == "router stop":
                self.lab.router_stop(victim)
            else:
                self.lab.link_set("node1", self.ifname[victim], up=False)
            # back when replies flow again: 20 in a row after the failure, none missing
            deadline = t0 + self.cap
            while time.monotonic() < deadline:
                recent = [r for r in stream.replies if r > t0]
                if len(recent) >= 20 and time.monotonic() - recent[-1] < 5 * INTERVAL \
                        and recent[-1] - recent[-20] < 30 * INTERVAL:
                    break
                time.sleep(0.05)
            gap = stream.longest_gap(t0, time.monotonic())
            # restore: the router (or link) back, and both next hops in the table again
            if failure == "router stop":
                self.lab.router_start(victim)
            else:
                self.lab.link_set("node1", self.ifname[victim], up=True)
            return gap
        finally:
            stream.stop()
            if pinned is not None:
                self.lab.exec("ext", ["ip", "route", "del", f"{self.pod}/32"])

    def diagnose(self, what: str) -> str:
        """What went wrong, with what node1 says and the end of its agent's log."""
        log = self.lab.state().proc("agent:node1").log
        with open(log) as f:
            tail = "".join(f.readlines()[-25:])
        return (f"{what}: table {TABLE}: {self.table()!r}; node1: " + self.lab.ctl("node", "status", "node1").stdout
                + f"\nagent log {log}:\n{tail}")

    def applied(self, from_peers: bool) -> bool:
        """The agent says pool A's egress is up, in the form just applied (fresh status)."""
        out = self.lab.ctl("node", "status", "node1").stdout
        line = next((x for x in out.splitlines() if "egress of pool pool-a" in x), "")
        return ("from peers" in line) == from_peers and line.endswith(": up") and "STALE" not in out

    def mode(self, label: str, egress: dict, reps: dict[str, int]) -> dict[str, list[float]]:
        """The trials of one detection mode; a mode that fails is reported, and the others run."""
        try:
            return self._mode(label, egress, reps)
        except RuntimeError as exc:
            self.errors[label] = str(exc)
            print(f"  {label}: FAILED: {exc}", file=sys.stderr, flush=True)
            return {}

    def _mode(self, label: str, egress: dict, reps: dict[str, int]) -> dict[str, list[float]]:
        self.lab.ctl("apply", "-f", "-", input=_pool(egress))
        # The agent's etcd connection may have gone by a router a trial stopped: TCP's
        # retransmission backoff can keep it waiting a minute or more after the router is back.
        t0 = time.monotonic()
        try:
            self.wait(lambda: self.applied("fromPeers" in egress), f"node1 takes pool A's {label} egress", 240)
        except RuntimeError as exc:
            raise RuntimeError(self.diagnose(str(exc))) from None
        if time.monotonic() - t0 > 10:
            print(f"  ({label}: node1 took {time.monotonic() - t0:.0f} s to take the pool change)", file=sys.stderr)
        out: dict[str, list[float]] = {}
        for failure, n in reps.items():
            out[failure] = []
            for i in range(n):
                out[failure].append(self.trial(failure))
                print(f"  {label}, {failure} {i + 1}/{n}: {out[failure][-1]:.3f} s", file=sys.stderr, flush=True)
        return out


def hold(b: Bench, args: argparse.Namespace) -> None:
    """The hold-time case: both routers announce a default, pool A takes it (fromPeers)."""
    for tor in b.tors:
        b.lab.router_announce(tor, "0.0.0.0/0")
    b.results[f"BGP hold time {HOLD_TIME} s (fromPeers)"] = b.mode(
        "hold time", {"fromPeers": "has(router)"}, {"router stop": args.slow_reps, "link down": args.slow_reps})


def summary(gaps: list[float]) -> str:
    if not gaps:
        return "-"
    return f"{statistics.median(gaps):.2f} s (n={len(gaps)}, {min(gaps):.2f}-{max(gaps):.2f})"


def run(args: argparse.Namespace) -> int:
    from tortie.lab.cluster import Lab

    lab = Lab.up(name="begress" + uuid.uuid4().hex[:6], nodes=1, tor="bird", uplinks=2)
    echo = None
    results: dict[str, dict[str, list[float]]] = {}
    try:
        lab.ctl("apply", "-f", "-", input=_pool({"nextHops": [{"address": "10.99.101.1"},
                                                               {"address": "10.99.102.1"}]}))
        b = Bench(lab, args.cap)
        results = b.results
        echo = UDPEcho(lab.netns_of("ext"), b.ext, ECHO_PORT)
        b.counters()
        hops = [{"address": g} for g in b.gateway.values()]
        modes = args.modes.split(",")
        if modes[0] == "hold":
            hold(b, args)
        if "bfd" in modes:
            # BFD: the routers run it, and the lab's BGPPeers ask for it too. One session per
            # address: the agent takes the BGPPeer's timers for it (the lab's are 100 ms), so the
            # BGPPeers get the pool's 300 ms x 3 as well, or that is not what is measured.
            lab.router_bfd(True)
            peers = json.loads(lab.ctl("get", "bgppeers", "-o", "json").stdout)["items"]
            for p in peers:
                p["metadata"] = {k: v for k, v in p["metadata"].items() if k in ("name", "labels")}
                p["spec"]["bfd"] = BFD
            lab.ctl("apply", "-f", "-", input="\n---\n".join(json.dumps(p) for p in peers))
            results[BFD_MODE] = b.mode("BFD", {"nextHops": [{**h, "bfd": BFD} for h in hops]},
                                       {"router stop": args.reps, "link down": args.reps})
            lab.router_bfd(False)  # nothing but the kernel's neighbour and link state from here on
        if "hold" in modes[1:]:
            hold(b, args)
        if "neighbour" in modes:
            results["neighbour state alone"] = b.mode("neighbour", {"nextHops": hops},
                                                      {"router stop": args.slow_reps, "link down": args.reps})
    finally:
        if echo is not None:
            echo.stop()
        lab.down()

    p50s = {f: statistics.median(g) for f, g in results.get(BFD_MODE, {}).items()}
    ok = bool(p50s) and all(v <= TARGET_S for v in p50s.values())
    complete = all(results.values())
    if args.json:
        print(json.dumps({"gaps_s": results, "bfd_p50_s": p50s, "target_s": TARGET_S, "pass": ok,
                          "failed": b.errors}, indent=2))
    else:
        print(f"egress failover: the longest gap in pool A's replies (UDP every {INTERVAL * 1000:.0f} ms) after its "
              "uplink fails, until its flow is on the other router")
        print(f"  {'detection':<32} {'router stop':<32} {'link down':<32}")
        for mode, by in results.items():
            if not by:
                print(f"  {mode:<32} FAILED (see above)")
                continue
            print(f"  {mode:<32} {summary(by.get('router stop', [])):<32} {summary(by.get('link down', [])):<32}")
        print(f"  reference: BGP hold time {HOLD_TIME} s in the lab, 90 s by default; a gap of {args.cap:.0f} s "
              "is the cap (not recovered)")
        print(f"  {'PASS' if ok else 'MISS'}  BFD failover p50 at most {TARGET_S:.0f} s ("
              + (", ".join(f"{f} {v:.2f} s" for f, v in p50s.items()) or "not measured") + ")")
    return 0 if ok and complete else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="failures per case (BFD; link down without BFD)")
    ap.add_argument("--slow-reps", type=int, default=2,
                    help="failures per slow case (router stop without BFD; the hold-time cases)")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds to wait for the flow to come back")
    # Hold time first, neighbour last: after ten BFD trials the agent once never took the switch
    # to the fromPeers pool (its status went stale), and after a failover found by neighbour
    # state a hold-time failover took 41 s instead of 9 (see the README's egress bench notes).
    ap.add_argument("--modes", default="hold,bfd,neighbour", help="which detection modes, in this order")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.reps < 1 or args.slow_reps < 1 or args.cap <= 0:
        ap.error("--reps and --slow-reps want at least 1, --cap more than 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
