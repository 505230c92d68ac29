"""BGP benchmarks: tortie's speaker next to BIRD, measured in the same run.

(b) receive: a BIRD peer announces N prefixes; time from the session coming up (the
    sender BIRD's log) until all N are routes in the receiver's kernel (stamped by a
    netlink listener in the receiver's namespace). Receiver: a running `tortie-agent`
    (its own etcd on the receiver's loopback with an IPPool, a BGPConfiguration, the
    BGPPeer of the BIRD neighbour with `acceptPrefixes` covering the N prefixes and the
    Node; the agent's ExaBGP, event loop, calculation and route manager do the rest) vs
    BIRD (kernel protocol). Target: tortie <= 1.5 x BIRD.
(c) announce: with the session established, the receiver BIRD's kernel must hold N
    prefixes; time from the moment the sender is told to export them. Sender: tortie's
    BGPSpeaker driven directly (set_exports + apply; not the agent: an agent exports only
    its blocks and borrowed addresses) vs BIRD (`birdc enable` of a static protocol). No
    target in the issue; shown for reference.

Each measurement gets fresh namespaces (a veth pair), removed afterwards, also on error.
Runs alternate (BIRD, tortie, BIRD, ...); medians of --runs. A missed target prints MISS
and exits 1. Run as root: `python bench/bgp/run.py [--prefixes 10000] [--runs 7] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tortie.lab.nsutil import http_get, stop_group

SENDER, RECEIVER = "10.97.0.2", "10.97.0.1"
AS = 64512
RUN = uuid.uuid4().hex[:6]


def prefixes(n: int) -> list[str]:
    base = int(ipaddress.ip_address("10.200.0.0"))
    return [f"{ipaddress.ip_address(base + i)}/32" for i in range(n)]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


class Pair:
    """Two namespaces joined by a veth: the receiver and the sender."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.rx, self.tx = f"tt-{RUN}-brx-{tag}", f"tt-{RUN}-btx-{tag}"
        self.dir = tempfile.mkdtemp(prefix="tortie-bench-bgp-")
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, str] = {}

    def __enter__(self) -> Pair:
        for ns in (self.rx, self.tx):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "brx0", "netns", self.rx, "type", "veth", "peer", "name", "btx0", "netns", self.tx)
        sh("ip", "-n", self.rx, "addr", "add", f"{RECEIVER}/24", "dev", "brx0")
        sh("ip", "-n", self.tx, "addr", "add", f"{SENDER}/24", "dev", "btx0")
        sh("ip", "-n", self.rx, "link", "set", "brx0", "up")
        sh("ip", "-n", self.tx, "link", "set", "btx0", "up")
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            stop_group(p, 10)
        for ns in (self.rx, self.tx):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def popen(self, ns: str, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def bird(self, ns: str, name: str, body: str) -> str:
        d = os.path.join(self.dir, name)
        os.makedirs(d)
        conf, sock = os.path.join(d, "bird.conf"), os.path.join(d, "bird.ctl")
        rid = RECEIVER if ns == self.rx else SENDER
        self.logs[name] = os.path.join(d, "bird.log")
        with open(conf, "w") as f:
            f.write(f"router id {rid};\ntimeformat log \"%s.%6f\";\nlog \"{d}/bird.log\" all;\n"
                    "protocol device {}\n"
                    "protocol kernel { ipv4 { import none; export all; }; learn off; }\n" + body)
        self.popen(ns, ["bird", "-f", "-c", conf, "-s", sock], stdout=subprocess.DEVNULL,
                   stderr=open(os.path.join(d, "err"), "w"))
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bird did not start: {open(os.path.join(d, 'err')).read()}")
            time.sleep(0.01)
        return sock


def bgp_block(local: str, peer: str, *, disabled_static: bool = False) -> str:
    return (f"protocol bgp peer1 {{\n  local {local} as {AS};\n  neighbor {peer} as {AS};\n  direct;\n"
            "  debug { states };\n"
            "  connect retry time 1;\n  graceful restart on;\n"
            "  ipv4 { import all; export where source = RTS_STATIC; next hop self; gateway direct; };\n}\n")


def static_block(pfx: list[str], *, disabled: bool = False) -> str:
    routes = "".join(f"  route {p} blackhole;\n" for p in pfx)
    return f"protocol static s4 {{\n  {'disabled;' if disabled else ''}\n  ipv4;\n{routes}}}\n"


def count_routes(ns: str, proto: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-4", "route", "show", "proto", proto],
                         capture_output=True, text=True).stdout
    return out.count("\n")


# The end of a measurement: a netlink listener in the receiving namespace stamps the
# moment it holds n routes of the protocol (adds minus deletes seen). Polling `ip route
# show` instead (a 10,000-route dump every few ms) kept one of the two cores busy during
# the measurement and stamped the end one dump late, ~20 ms, for either receiver.
_COUNTER = r"""
import socket, struct, sys, time
proto, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE, else capped by rmem_max
    try:
        s.setsockopt(socket.SOL_SOCKET, opt, 256 << 20)
        break
    except OSError:
        pass
s.bind((0, 0x40))  # RTMGRP_IPV4_ROUTE
print("ready", flush=True)
have, unpack = 0, struct.unpack_from
buf = bytearray(1 << 16)  # reused: a fresh buffer per recv costs page faults
while have < n:
    # one notification per recv: wait for the first, take what is queued, then nap 1 ms,
    # so the counter wakes ~1000 times a second at most instead of once per route
    s.setblocking(True)
    while have < n:
        try:
            size = s.recv_into(buf)
        except BlockingIOError:
            break
        except OSError as exc:  # ENOBUFS: notifications lost; the count would be wrong
            print("lost", exc, flush=True)
            sys.exit(1)
        s.setblocking(False)
        t, off = time.time(), 0
        while off < size:
            length, mtype, flags = unpack("=IHH", buf, off)
            if buf[off + 21] == proto:  # rtm_protocol
                if mtype == 24 and not flags & 0x100:  # RTM_NEWROUTE, not NLM_F_REPLACE: one more
                    have += 1
                elif mtype == 25:  # RTM_DELROUTE
                    have -= 1
            off += (length + 3) & ~3
    if have < n:
        time.sleep(0.001)
print(repr(t), flush=True)
"""
_PROTOS = {"bird": 12, "77": 77}


class RouteCounter:
    """Started in `ns` before the routes can come; `done()` is the wall-clock time the
    n-th route of `proto` appeared (checked against a dump afterwards)."""

    def __init__(self, pair: Pair, ns: str, proto: str, n: int) -> None:
        self.ns, self.proto, self.n = ns, proto, n
        self.p = pair.popen(ns, [sys.executable, "-I", "-S", "-c", _COUNTER, str(_PROTOS[proto]), str(n)],
                            stdout=subprocess.PIPE, text=True)
        if self.p.stdout.readline().strip() != "ready":
            raise RuntimeError("route counter did not start")

    def done(self, timeout: float = 120.0) -> float:
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline().strip() if ready else "timeout"
        try:
            t = float(line)
        except ValueError:
            raise RuntimeError(f"route counter in {self.ns}: {line}") from None
        if (have := count_routes(self.ns, self.proto)) < self.n:
            raise RuntimeError(f"only {have}/{self.n} routes in {self.ns} after all")
        return t


def established_at(log_path: str, before: float) -> float:
    """Wall-clock time the sender BIRD last logged its session up before `before` (its log
    has microseconds). The last one: a connection collision can reset the first session."""
    ups = [float(line.split()[0]) for line in open(log_path)
           if "peer1" in line and "State changed to up" in line]
    ups = [t for t in ups if t <= before]
    if not ups:
        raise RuntimeError(f"no session-up line in {log_path}")
    return ups[-1]


def birdc(sock: str, *args: str) -> str:
    return subprocess.run(["birdc", "-s", sock, *args], capture_output=True, text=True).stdout


def bird_established(sock: str) -> bool:
    return "Established" in birdc(sock, "show", "protocols", "peer1")


# --- (c)'s tortie sender: a BGPSpeaker (and RouteManager) driven over stdin ----------------

def node_main(local: str, peer: str, state_dir: str) -> int:
    """Runs inside the namespace given: speaker + route manager, commands on stdin."""
    from tortie.bgp.peers import Peer
    from tortie.bgp.speaker import BGPSpeaker
    from tortie.log import configure
    from tortie.routing.model import Route, learned_route
    from tortie.routing.route_mgr import RouteManager

    configure(level="warning", stream=open(os.path.join(state_dir, "node.log"), "w"))

    def out(doc: dict) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    async def run() -> None:
        routes = RouteManager()

        def on_routes(table: dict[str, tuple[str, ...]]) -> None:
            routes.set_routes("bgp", [Route(dst=p, gateways=nh) for p, nh in table.items()])
            stats = routes.apply()
            out({"event": "installed", "routes": len(table), "added": stats.added, "t": time.time(),
                 "apply": stats.seconds})

        def on_route_changes(changed: dict[str, tuple[str, ...]], removed: frozenset[str]) -> None:
            # canonical prefixes and next hops, from ExaBGP's parser
            routes.update_routes("bgp", [learned_route(p, hops) for p, hops in changed.items()], removed)
            stats = routes.apply()
            out({"event": "installed", "routes": len(changed), "added": stats.added, "t": time.time(),
                 "apply": stats.seconds})

        sp = BGPSpeaker(node_name="bench", router_id=local, local_as=AS, local_address=local,
                        state_dir=state_dir, on_routes=on_routes, on_route_changes=on_route_changes,
                        settle_time=0.5, batch=int(os.environ.get("BENCH_BGP_BATCH", "500")))
        sp.set_peers([Peer(address=peer, as_number=AS, kind="global", name="bird",
                           accept_prefixes=("10.200.0.0/16",))])
        sp.set_exports([])
        await sp.start()
        await sp.apply()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await asyncio.sleep(0.6)  # past the settle time: a running agent
        out({"event": "ready"})
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["op"] == "exports":
                t0 = time.monotonic()
                sp.set_exports(cmd["prefixes"])
                await sp.apply()
                out({"event": "exported", "t0": t0, "t": time.monotonic()})
            elif cmd["op"] == "status":
                out({"event": "status", "peers": [p.to_dict() for p in sp.status()]})
        await sp.stop()

    asyncio.run(run())
    return 0


class Node:
    def __init__(self, pair: Pair) -> None:
        self.state = os.path.join(pair.dir, "tortie")
        os.makedirs(self.state)
        here = os.path.abspath(__file__)
        self.p = pair.popen(pair.rx, [sys.executable, here, "--node", RECEIVER, SENDER, self.state],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.expect("ready")

    def expect(self, event: str) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"tortie node exited; see {self.state}")
            doc = json.loads(line)
            if doc["event"] == event:
                return doc

    def send(self, doc: dict) -> None:
        self.p.stdin.write(json.dumps(doc) + "\n")
        self.p.stdin.flush()

    def established(self) -> bool:
        self.send({"op": "status"})
        return any(p["state"] == "established" for p in self.expect("status")["peers"])


# --- (b)'s tortie receiver: a running tortie-agent with its own etcd -------------------------

ETCD_PREFIX = "/tortie/"
POOL = "10.96.0.0/16"  # the agent's IPPool; the announced prefixes lie outside it
ACCEPT = "10.200.0.0/16"  # the BGPPeer's acceptPrefixes: where prefixes() are


def agent_resources() -> list[dict]:
    """What the agent reads besides the IPPool (the lab's bootstrap makes that one)."""
    api = "tortie.io/v1"
    return [
        {"apiVersion": api, "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False, "asNumber": AS}},
        {"apiVersion": api, "kind": "BGPPeer", "metadata": {"name": "bird"},
         "spec": {"node": "bench", "peerIP": SENDER, "asNumber": AS, "acceptPrefixes": [ACCEPT]}},
        {"apiVersion": api, "kind": "Node", "metadata": {"name": "bench"},
         "spec": {"bgp": {"ipv4Address": f"{RECEIVER}/24", "asNumber": AS}}},
    ]


class AgentNode:
    """etcd on the receiver's loopback, the resources written by the lab's datastore helper,
    then `tortie-agent` (python -m tortie.agent.main) in the receiver namespace, ready."""

    def __init__(self, pair: Pair, timeout: float = 60.0) -> None:
        from tortie.lab.etcd_server import EtcdServer

        self.dir = os.path.join(pair.dir, "agent")
        os.makedirs(self.dir)
        os.makedirs(os.path.join(self.dir, "etcd"))
        etcd = EtcdServer(data_dir=os.path.join(self.dir, "etcd"), netns=pair.rx)
        try:
            etcd.start()
        finally:
            if etcd.proc is not None:
                pair.procs.append(etcd.proc)  # stopped after the agent (the procs go in reverse)
        extra = [a for r in agent_resources() for a in ("--resource", json.dumps(r))]
        subprocess.run(["ip", "netns", "exec", pair.rx, sys.executable, "-m", "tortie.lab.dsops",
                        "--endpoints", etcd.endpoint, "--prefix", ETCD_PREFIX, "bootstrap", "--cidr", POOL,
                        "--block-size", "26", *extra], check=True, capture_output=True)
        env = {**os.environ, "TORTIE_NODENAME": "bench", "TORTIE_ETCD_ENDPOINTS": etcd.endpoint,
               "TORTIE_ETCD_PREFIX": ETCD_PREFIX, "TORTIE_NODE_IP": f"{RECEIVER}/24",
               "TORTIE_AS_NUMBER": str(AS), "TORTIE_CNI_SOCKET": os.path.join(self.dir, "cni.sock"),
               "TORTIE_STATE_DIR": self.dir, "TORTIE_LOG_FORMAT": "json"}
        self.log = os.path.join(self.dir, "agent.log")
        with open(self.log, "wb") as log:
            self.p = pair.popen(pair.rx, [sys.executable, "-m", "tortie.agent.main"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while http_get(pair.rx, "127.0.0.1", 9099, "/readiness")[0] != 200:
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tortie-agent not ready; log {self.log}:\n" + open(self.log).read()[-2000:])
            time.sleep(0.05)


def wait(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.02)


# --- measurements ---------------------------------------------------------------------------

# (b) is timed from the session coming up (the sender BIRD's log) to the last route in
# the receiver's kernel: how soon a session comes up depends on each side's connect
# timers, which is not what is measured here.

def receive_bird(n: int) -> float:
    with Pair() as pair:
        count = RouteCounter(pair, pair.rx, "bird", n)
        pair.bird(pair.rx, "rx", bgp_block(RECEIVER, SENDER))
        pair.bird(pair.tx, "tx", static_block(prefixes(n)) + bgp_block(SENDER, RECEIVER))
        done = count.done()
        return done - established_at(pair.logs["tx"], done)


PROFILE: list[str] = []  # --profile DIR: py-spy samples the agent in the first tortie (b) run


def receive_tortie(n: int) -> float:
    with Pair() as pair:
        count = RouteCounter(pair, pair.rx, "77", n)
        agent = AgentNode(pair)
        profile = None
        if PROFILE:
            from tortie.lab.benchutil import Profiler

            profile = Profiler(agent.p.pid, PROFILE.pop(), threads=("MainThread", "tortie-dataplane"))
            profile.start("agent-receive")
        pair.bird(pair.tx, "tx", static_block(prefixes(n)) + bgp_block(SENDER, RECEIVER))
        done = count.done()
        if profile:
            profile.stop()
        return done - established_at(pair.logs["tx"], done)


def announce_bird(n: int) -> float:
    with Pair() as pair:
        pair.bird(pair.rx, "rx", bgp_block(RECEIVER, SENDER))
        tx = pair.bird(pair.tx, "tx", static_block(prefixes(n), disabled=True) + bgp_block(SENDER, RECEIVER))
        wait(lambda: bird_established(tx))
        count = RouteCounter(pair, pair.rx, "bird", n)
        t0 = time.time()
        birdc(tx, "enable", "s4")
        return count.done() - t0


def announce_tortie(n: int) -> float:
    with Pair() as pair:
        # the roles swap: tortie sends from the "rx" namespace, BIRD receives in "tx"
        node = Node(pair)
        bird = pair.bird(pair.tx, "tx", bgp_block(SENDER, RECEIVER))
        wait(lambda: bird_established(bird) and node.established())
        pfx = prefixes(n)
        count = RouteCounter(pair, pair.tx, "bird", n)
        t0 = time.time()
        node.send({"op": "exports", "prefixes": pfx})
        return count.done() - t0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--node":
        return node_main(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefixes", type=int, default=10_000)
    # 7: BIRD-to-BIRD now and then takes ~3 s (a receiver holding its last routes back),
    # and a median of 3 lets one such run or one slow ExaBGP decode decide the verdict.
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=("b", "c"), help="run one measurement only")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the agent (loop, dataplane driver) in the first tortie (b) run")
    args = ap.parse_args()
    if args.profile:
        PROFILE.append(os.path.abspath(args.profile))
    if os.geteuid() != 0:
        print("needs root (network namespaces)")
        return 1
    n, results, runs = args.prefixes, {}, {}
    # BIRD and tortie runs alternate, so load that comes and goes on the machine falls on
    # both sides of a ratio alike
    parts = {"b": (("receive_bird", receive_bird), ("receive_tortie", receive_tortie)),
             "c": (("announce_bird", announce_bird), ("announce_tortie", announce_tortie))}
    for part, pair_fns in parts.items():
        if args.only and part != args.only:
            for name, _ in pair_fns:
                results[name] = math.nan
            continue
        times: dict[str, list[float]] = {name: [] for name, _ in pair_fns}
        for _ in range(args.runs):
            for name, fn in pair_fns:
                times[name].append(fn(n))
        for name, ts in times.items():
            results[name], runs[name] = statistics.median(ts), ts
            if not args.json:
                print(f"  {name:16s} runs: {', '.join(f'{t:.3f}s' for t in ts)}", flush=True)
    rb, rt = results["receive_bird"], results["receive_tortie"]
    ab, at = results["announce_bird"], results["announce_tortie"]
    verdict = "-" if math.isnan(rt) else "PASS" if rt <= 1.5 * rb else "MISS"
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prefixes": n,
                          "runs": args.runs, "results_s": results, "runs_s": runs,
                          "targets": {"receive": {"tortie_s": rt, "bird_s": rb, "ratio": rt / rb, "limit": 1.5,
                                                  "verdict": verdict}}}, indent=2))
        return 1 if verdict == "MISS" else 0
    print(f"\nBGP, {n} prefixes, median of {args.runs} runs (same machine, same run)")
    print(f"{'measurement':58s} {'tortie':>9s} {'BIRD':>9s} {'ratio':>7s}")
    if verdict != "-":
        print(f"{'(b) BIRD peer -> receiver kernel routes (tortie-agent)':58s} {rt:8.3f}s {rb:8.3f}s "
              f"{rt / rb:6.2f}x")
    if not math.isnan(at):
        print(f"{'(c) sender told to export -> BIRD peer kernel (BGPSpeaker)':58s} {at:8.3f}s {ab:8.3f}s "
              f"{at / ab:6.2f}x")
    if verdict != "-":
        print(f"\ntarget (b): tortie <= 1.5 x BIRD = {1.5 * rb:.3f}s: {verdict} ({rt:.3f}s, {rt / rb:.2f}x)")
    print("target (c): none set; reference only")
    return 1 if verdict == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
