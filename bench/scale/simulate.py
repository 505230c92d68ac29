"""bench/scale (simulate): N node stand-ins against a real etcd -- what etcd pays for a
cluster of N tortie agents, without namespaces or BGP.

A stand-in is the datastore half of a `tortie-agent`, built from the agent's own parts:
- two etcd clients like the agent (`client` for the syncer and the BGP status,
  `cni_client` with the CNI deadline for the store, IPAM and the datastore monitor), on one
  TCP connection of its own (as one agent process has);
- registers its Node (get + apply, as `Agent.register_node`);
- follows the datastore with the agent's `Syncer` on the agent's prefixes (resources and
  block affinities: one watch stream per stand-in, so etcd holds N watchers and every
  change fans out N times), folding every event into the agent's `ClusterState`;
- probes etcd with the agent's `DatastoreMonitor` (a linearizable read every 3 s);
- once it has seen every node, publishes its BGP status document every 10 s
  (`STATUS_REFRESH_INTERVAL`) with one `established` entry per peer that `bgp.peers`
  gives it (mesh: N-1 peers; rr: two reflectors), built by `bgp.status.document`;
- claims its first block with the real IPAM (`IPAM.auto_assign` of one address: context
  reads, the block list, the pending claim, the confirm, the allocation, each a
  compare-and-swap transaction).

Many stand-ins share a worker process (an asyncio loop; the syncers' and the blocking etcd
calls' threads), `--workers` processes in all, so 1,000 fit on 2 cores.

Phases and what is measured (etcd: /proc/<pid>/stat CPU, RSS, its /metrics):
1. start: every stand-in registers and syncs until it has seen all N Nodes.
2. idle (`--idle` s): probes and status writes only; etcd CPU and db growth.
3. claims: every stand-in claims a block, `--concurrent` (M) at once per wave, the waves
   started together across the workers: claim latency (auto_assign wall time), failed
   compare-and-swap transactions and etcd round trips per claim; and the fan-out: from the
   claimer's reply to its confirm transaction to each other stand-in's consumer seeing the
   confirmed affinity (one shared monotonic clock; the consumer side includes the worker's
   event loop, shared by N/workers stand-ins, so this is an upper bound).
Finally the agent's real `Calculation` is fed the resulting datastore once, in this
process, and timed: what one agent's CPU pays per Node event and per affinity at N nodes.

etcd's documented limits (etcd.io/docs/v3.4/dev-guide/limit, op-guide/hardware,
benchmarks/etcd-3-watch-memory-benchmark): requests up to 1.5 MiB, a 2 GiB backend quota
by default (8 GiB suggested maximum), O(10k) clients and O(100k) watch streams.
PASS when the largest request and the db stay under them and no request was refused.

    python bench/scale/simulate.py [--nodes 100] [--concurrent 20] [--workers 4]
        [--topology mesh|rr] [--idle 20] [--pool 10.64.0.0/14] [--json]
    python bench/scale/simulate.py --nodes 100,300,1000 --topology rr   # docs/scale.md

The private etcd (its own ports and data dir) and the workers are always removed.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

# `make bench` runs every bench script without arguments: the default is the quick size;
# the 100/300/1,000 table of docs/scale.md takes several minutes (--nodes 100,300,1000)
DEFAULT_NODES = (100,)
MAX_REQUEST = 1.5 * 1024 * 1024  # etcd --max-request-bytes default
QUOTA_DEFAULT = 2 * 1024**3  # etcd --quota-backend-bytes default
QUOTA_SUGGESTED_MAX = 8 * 1024**3
RR_CLUSTER_ID = "244.0.0.1"
CLAIMERS = 2  # claimer processes
WATCHER_NICE = 10
AS_NUMBER = 64512


def node_name(i: int) -> str:
    return f"sim-{i:05d}"


def node_ip(i: int) -> str:
    # data only: nothing is configured on the machine
    return f"100.{64 + (i + 1) // 65536}.{(i + 1) // 256 % 256}.{(i + 1) % 256}"


# --- a stand-in (runs in a worker process) -------------------------------------------------------


def _counting_client_class():
    from tortie.datastore.etcd import EtcdClient

    class CountingClient(EtcdClient):
        """The agent's etcd client, counting what the claiming thread asks of etcd (round
        trips, compare-and-swap transactions refused) and when each confirmed affinity
        committed (the reply's time and revision)."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.track = threading.local()
            self.confirms: list[tuple[int, float, float]] = []  # (revision, sent, answered)

        def rpc(self, *args, **kwargs):  # every unary call to etcd goes through it
            counts = getattr(self.track, "counts", None)
            if counts is not None:
                counts["rpcs"] += 1
            return super().rpc(*args, **kwargs)

        def transaction(self, txn):
            sent = time.monotonic()
            ok, revision = super().transaction(txn)
            t = time.monotonic()
            counts = getattr(self.track, "counts", None)
            if counts is not None:
                counts["txn_failed" if not ok else "txn_ok"] += 1
            if ok and any("/ipam/affinity/" in k and b'"confirmed"' in v for k, v in txn.puts):
                self.confirms.append((revision, sent, t))
            return ok, revision

    return CountingClient


@contextlib.contextmanager
def own_connection(tag: str):
    """Channels made inside get gRPC channel args naming this stand-in: gRPC shares one
    TCP connection between channels with equal args, so a stand-in's two clients share
    one connection (as in one agent) and no two stand-ins do (as on N machines)."""
    from tortie.datastore import etcd as etcd_mod

    saved = etcd_mod.CHANNEL_OPTIONS
    etcd_mod.CHANNEL_OPTIONS = (*saved, ("grpc.primary_user_agent", f"tortie-standin/{tag}"))
    try:
        yield
    finally:
        etcd_mod.CHANNEL_OPTIONS = saved


class StandIn:
    def __init__(self, index: int, n: int, config, topology: str, executor: ThreadPoolExecutor) -> None:
        from tortie.agent.main import CNI_ETCD_TIMEOUT
        from tortie.agent.state import ClusterState
        from tortie.datastore.ipam import IPAM
        from tortie.datastore.monitor import DatastoreMonitor
        from tortie.datastore.store import ResourceStore

        client_cls = _counting_client_class()
        self.index, self.n, self.name, self.topology = index, n, node_name(index), topology
        self.config = config
        self.executor = executor
        with own_connection(self.name):
            self.client = client_cls(config)
            self.cni_client = client_cls(replace(config, timeout=min(config.timeout, CNI_ETCD_TIMEOUT)))
        self.store = ResourceStore(self.cni_client)
        self.ipam = IPAM(self.cni_client)
        self.monitor_downs = 0  # probes that missed the agent's 1 s deadline, after an answer
        self.monitor = DatastoreMonitor(self.cni_client, on_change=self._on_datastore)
        self.state = ClusterState(prefix=config.prefix)
        self.syncer = None
        self.seen_rev = array.array("q")
        self.seen_t = array.array("d")
        self.register_s = 0.0
        self.register_retries = 0
        self.n_confirmed = 0  # confirmed affinities held (kept by follow(): polled often)
        self.status_bytes = 0
        self.status_writes = 0
        self.errors: list[str] = []
        self.tasks: list[asyncio.Task] = []

    def _on_datastore(self, up: bool, error: str | None) -> None:
        self.monitor_downs += not up

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def register_node(self) -> None:
        """What `Agent.register_node` costs etcd on a fresh cluster (a get that finds
        nothing, then an apply), with this stand-in's made-up address."""
        from tortie import errors

        with contextlib.suppress(errors.NotFound):
            self.store.get("node", self.name)
        bgp = {"ipv4Address": f"{node_ip(self.index)}/10"}
        if self.topology == "rr" and self.index < 2:
            bgp["routeReflectorClusterID"] = RR_CLUSTER_ID
        self.store.apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": self.name},
                          "spec": {"bgp": bgp, "addresses": [{"address": node_ip(self.index),
                                                              "type": "CalicoNodeIP"}]}})

    async def register(self) -> None:
        """Register as `Agent.run` does: again after RETRY_DELAY while etcd does not answer
        within the CNI client's deadline (N stand-ins starting at once do meet that)."""
        from tortie.agent.main import RETRY_DELAY
        from tortie.errors import DatastoreUnavailable

        t0 = time.monotonic()
        while True:
            try:
                await self._run(self.register_node)
                break
            except DatastoreUnavailable:
                self.register_retries += 1
                await asyncio.sleep(RETRY_DELAY)
        self.register_s = time.monotonic() - t0

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.follow()), asyncio.create_task(self.monitor.run())]

    async def follow(self) -> None:
        """The agent's `_follow_datastore`: its syncer, its prefixes, its state fold."""
        from tortie.datastore import keys
        from tortie.datastore.watch import Snapshot, Syncer

        p = self.config.prefix
        aff = p + keys.IPAM_AFFINITY
        self.syncer = Syncer(self.client, [p + keys.RESOURCES, aff])
        async for event in self.syncer.events():
            t = time.monotonic()
            if isinstance(event, Snapshot):
                self.state.clear()
                for key, value in event.items.items():
                    self.state.apply(key, value)
                self.n_confirmed = sum(1 for v in self.state.affinities.values() if v)
                continue
            parsed = keys.parse_affinity(event.key[len(p):]) if event.key.startswith(aff) else None
            was = parsed is not None and self.state.affinities.get(parsed, False)
            self.state.apply(event.key, event.value)
            if parsed is not None:
                now = self.state.affinities.get(parsed, False)
                self.n_confirmed += now - was
                if now and not was and parsed[0] != self.name:
                    self.seen_rev.append(event.revision)
                    self.seen_t.append(t)

    def confirmed(self) -> int:
        return self.n_confirmed

    async def publish_status(self, interval: float) -> None:
        """The agent's status refresh: its BGP status document, every `interval` seconds,
        started at a random phase (agents do not start in step)."""
        from tortie.agent.calc_desired import bgp_peers
        from tortie.bgp.status import PeerStatus, document
        from tortie.datastore import keys
        from tortie.errors import DatastoreUnavailable

        now = time.time()
        peers = [PeerStatus(p.address, p.kind, "established", now, prefixes_received=1, prefixes_sent=1,
                            name=p.name, passive=p.passive).to_dict()
                 for p in bgp_peers(self.state, self.name)]
        self.peers = len(peers)
        key = self.config.prefix + keys.bgp_status_key(self.name)
        extra = {"router_id": node_ip(self.index), "as_number": AS_NUMBER, "address": node_ip(self.index),
                 "exabgp_pid": 0, "restarts": 0, "egress": [], "bfd": {}}
        await asyncio.sleep((self.index * 0.618) % 1.0 * interval)
        while True:
            doc = document(self.name, (), extra)
            doc["peers"] = peers
            body = json.dumps(doc, sort_keys=True).encode()
            self.status_bytes = max(self.status_bytes, len(body))
            try:
                await self._run(self.client.put, key, body)
                self.status_writes += 1
            except DatastoreUnavailable as exc:
                self.errors.append(f"status: {exc}")
            await asyncio.sleep(interval)

    def stop(self) -> None:
        if self.syncer is not None:
            self.syncer.stop()
        for t in self.tasks:
            t.cancel()
        self.client.close()
        self.cni_client.close()


def claim(name: str, client) -> dict:
    """One block claim as the first pod on a node makes it: a fresh IPAM (what a just
    started agent holds) on a warm connection; blocking, in a claimer's thread."""
    from tortie.datastore.ipam import IPAM
    from tortie.datastore.ipam_blocks import DEFAULT_NETWORK
    from tortie.errors import TortieError

    counts = {"rpcs": 0, "txn_ok": 0, "txn_failed": 0}
    client.track.counts = counts
    client.confirms.clear()
    t0, cpu0 = time.monotonic(), time.thread_time()
    error = None
    try:
        IPAM(client).auto_assign(f"{DEFAULT_NETWORK}.sim-{name}", name, num_v4=1,
                                 attrs={"namespace": "sim", "pod": f"{name}-p0"})
    except TortieError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        client.track.counts = None
    latency, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    commit = client.confirms[-1] if client.confirms else (0, 0.0, 0.0)
    return {"node": name, "latency": latency, "cpu": cpu, "error": error, **counts,
            "confirm_rev": commit[0], "confirm_sent": commit[1], "confirm_rtt": commit[2] - commit[1]}


async def claimer_main(args) -> None:
    """A claimer process: the stand-ins' block claims, M/claimers at once, each on one of
    a pool of warm connections (the CNI client's deadline). Claims run apart from the
    watching stand-ins so that their latency is not the watchers' GIL queue: on a real
    cluster the claiming agent has its node's CPU to itself."""
    from tortie import log as tlog
    from tortie.agent.main import CNI_ETCD_TIMEOUT
    from tortie.datastore.etcd import EtcdConfig

    tlog.configure(level=os.environ.get("TORTIE_SIM_LOG_LEVEL", "critical"), fmt="json")
    loop = asyncio.get_running_loop()
    config = EtcdConfig(endpoints=(args.endpoint,), prefix=args.prefix, timeout=CNI_ETCD_TIMEOUT)
    client_cls = _counting_client_class()
    pool: asyncio.Queue = asyncio.Queue()
    for i in range(args.concurrent):
        with own_connection(f"claimer-{args.slot}-{i}"):
            c = client_cls(config)
        c.revision()  # connect now: an agent's connection is long open when a pod arrives
        pool.put_nowait(c)
    executor = ThreadPoolExecutor(max_workers=args.concurrent, thread_name_prefix="claim")

    async def one(name: str) -> dict:
        c = await pool.get()
        try:
            return await loop.run_in_executor(executor, claim, name, c)
        finally:
            pool.put_nowait(c)

    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] != "claim":
            break
        await asyncio.sleep(max(0.0, cmd["at"] - time.monotonic()))
        results = await asyncio.gather(*(one(n) for n in cmd["names"]))
        print(json.dumps({"event": "claimed", "results": results}), flush=True)
    executor.shutdown(wait=False, cancel_futures=True)


def _rss_kb(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def worker_main(args) -> None:
    """One worker process: its share of stand-ins, driven by JSON lines on stdin."""
    from tortie import log as tlog
    from tortie.agent.main import STATUS_REFRESH_INTERVAL
    from tortie.datastore.etcd import EtcdConfig

    # 1,000 stand-ins would repeat each warning 1,000 times; what matters is counted instead
    # (probes that timed out, status writes refused, syncer resyncs) and sent to the parent
    tlog.configure(level=os.environ.get("TORTIE_SIM_LOG_LEVEL", "critical"), fmt="json")
    # On a cluster each agent has its node's CPU and etcd its own. Here N watchers share two
    # cores with etcd, the claimers and other people's work: niced, they yield first. That
    # is not enough at 1,000 (the scheduler weighs threads, and they are thousands): during
    # claim waves etcd still waits for the CPU, which docs/scale.md reports as such.
    os.nice(WATCHER_NICE)
    loop = asyncio.get_running_loop()
    # round robin: the M stand-ins of a claim wave spread over every worker
    indexes = range(args.slot, args.nodes, args.nworkers)
    # threads for the blocking etcd calls (registration, probes, status writes)
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="etcd")
    loop.set_default_executor(executor)
    config = EtcdConfig(endpoints=(args.endpoint,), prefix=args.prefix)
    out_lock = threading.Lock()

    def send(msg: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "stop"})

    threading.Thread(target=read_stdin, daemon=True, name="commands").start()
    standins = [StandIn(i, args.nodes, config, args.topology, executor) for i in indexes]
    # every node registers, then every agent starts (a snapshot each): the cluster after a
    # restart of all agents. Nodes joining one by one would make every stand-in fold each
    # Node as an event, N^2 in all, which the simulator's two cores cannot do for 1,000;
    # what such an event costs one agent is measured separately (agent_calc).
    await asyncio.gather(*(s.register() for s in standins))
    send({"event": "registered", "register_s": [s.register_s for s in standins],
          "register_retries": sum(s.register_retries for s in standins)})
    cmd = await commands.get()
    assert cmd["cmd"] == "sync", cmd
    for s in standins:
        s.start()
    while any(len(s.state.nodes) < args.nodes for s in standins):
        await asyncio.sleep(0.1)
    send({"event": "ready", "rss_kb": _rss_kb()})
    interval = args.status_interval or STATUS_REFRESH_INTERVAL
    if args.status_interval >= 0:
        for s in standins:
            s.tasks.append(asyncio.create_task(s.publish_status(interval)))
    while True:
        cmd = await commands.get()
        what = cmd["cmd"]
        if what == "converge":
            deadline = time.monotonic() + cmd["timeout"]
            while any(s.confirmed() < cmd["want"] for s in standins) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            send({"event": "converged", "short": sum(max(0, cmd["want"] - s.confirmed()) for s in standins)})
        elif what == "collect":
            commits = {int(k): v for k, v in cmd["commits"].items()}
            lat = array.array("f")
            unknown = 0
            for s in standins:
                for rev, t in zip(s.seen_rev, s.seen_t, strict=True):
                    if rev in commits:
                        lat.append((t - commits[rev]) * 1000.0)
                    else:
                        unknown += 1
            send({"event": "collected", "fanout_ms": base64.b64encode(lat.tobytes()).decode(),
                  "unknown": unknown, "rss_kb": _rss_kb(),
                  "peers": [getattr(s, "peers", 0) for s in standins],
                  "status_bytes": max(s.status_bytes for s in standins),
                  "status_writes": sum(s.status_writes for s in standins),
                  "syncer_resyncs": sum(s.syncer.resyncs for s in standins if s.syncer),
                  "monitor_down": sum(s.monitor_downs for s in standins),
                  "errors": [e for s in standins for e in s.errors][:20]})
        elif what == "stop":
            for s in standins:
                s.stop()
            send({"event": "stopped"})
            executor.shutdown(wait=False, cancel_futures=True)
            return


# --- the parent: etcd, the workers, the figures -------------------------------------------------


class Worker:
    """A worker process (`--worker`: watching stand-ins; `--claimer`: claims) on JSON lines."""

    def __init__(self, mode: str, args_list: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, *args_list],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True, bufsize=1)

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self, want: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()}) while we waited for {want}")
        msg = json.loads(line)
        if msg.get("event") != want:
            raise RuntimeError(f"worker {self.proc.pid}: wanted {want}, got {msg}")
        return msg

    def stop(self) -> None:
        from tortie.lab.nsutil import stop_group

        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "stop"})
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_group(self.proc, 5)


def etcd_metrics(endpoint: str, before: dict | None = None) -> dict:
    """etcd's own figures; disk latency quantiles over what happened since `before`."""
    from tortie.lab.benchutil import histogram_quantile, metric_sum, parse_metrics

    with urllib.request.urlopen(endpoint + "/metrics", timeout=5) as r:
        m = parse_metrics(r.read().decode())
    names = {
        "db_bytes": "etcd_mvcc_db_total_size_in_bytes",
        "db_in_use_bytes": "etcd_mvcc_db_total_size_in_use_in_bytes",
        "quota_bytes": "etcd_server_quota_backend_bytes",
        "watchers": "etcd_debugging_mvcc_watcher_total",
        "watch_streams": "etcd_debugging_mvcc_watch_stream_total",
        "slow_watchers": "etcd_debugging_mvcc_slow_watcher_total",
        "keys": "etcd_debugging_mvcc_keys_total",
        "puts": "etcd_debugging_mvcc_put_total",
        "txns": "etcd_debugging_mvcc_txn_total",
        "ranges": "etcd_debugging_mvcc_range_total",
        "events": "etcd_debugging_mvcc_events_total",
        "rx_bytes": "etcd_network_client_grpc_received_bytes_total",
        "tx_bytes": "etcd_network_client_grpc_sent_bytes_total",
    }
    out = {}
    for k, name in (("wal_fsync", "etcd_disk_wal_fsync_duration_seconds"),
                    ("backend_commit", "etcd_disk_backend_commit_duration_seconds")):
        q = histogram_quantile(m, name, 0.99, before=before)
        out[k + "_p99_ms"] = round(q * 1000, 1) if q is not None else float("nan")
    for k, name in names.items():
        v = metric_sum(m, name)
        out[k] = v if v is not None else float("nan")
    # unary requests that did not end OK: refused by etcd's limits (the quota and the request
    # size are ResourceExhausted / InvalidArgument) or given up by the client (its deadline)
    out["raw"] = m
    codes: dict[str, float] = {}
    for labels, v in m.get("grpc_server_handled_total", {}).items():
        d = dict(labels)
        if d.get("grpc_type") == "unary" and d.get("grpc_code") != "OK":
            codes[d["grpc_code"]] = codes.get(d["grpc_code"], 0.0) + v
    out["refused"] = codes.get("ResourceExhausted", 0.0) + codes.get("InvalidArgument", 0.0)
    out["grpc_errors"] = sum(codes.values())
    return out


class EtcdProbe:
    """CPU (ticks of /proc/<pid>/stat), RSS and open sockets of the etcd we started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_peak_kb = 0

    def cpu(self) -> float:
        from tortie.lab.benchutil import _stat_seconds

        return _stat_seconds(self.pid)

    def rss_kb(self) -> int:
        kb = _rss_kb(self.pid)
        self.rss_peak_kb = max(self.rss_peak_kb, kb)
        return kb

    def sockets(self) -> int:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    n += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:")
        return n


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine: was it saturated?"""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Phase:
    """CPU of etcd, of the workers and of the machine between start and end."""

    def __init__(self, probe: EtcdProbe, workers: list[Worker]) -> None:
        from tortie.lab.benchutil import _stat_seconds

        self.probe, self.workers = probe, workers
        self._ws = _stat_seconds
        self.t0 = time.monotonic()
        self.e0 = probe.cpu()
        self.w0 = sum(self._ws(w.proc.pid) for w in workers)
        self.m0 = machine_busy()

    def end(self) -> dict:
        dt = time.monotonic() - self.t0
        m1 = machine_busy()
        return {"seconds": round(dt, 2),
                "etcd_cpu_pct": round(100 * (self.probe.cpu() - self.e0) / dt, 1),
                "standins_cpu_pct": round(100 * (sum(self._ws(w.proc.pid) for w in self.workers) - self.w0) / dt, 1),
                "machine_busy_pct": round(100 * (m1[0] - self.m0[0]) / max(1, m1[1] - self.m0[1]), 1)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def setup_datastore(client, pool: str, topology: str) -> None:
    from tortie.datastore.store import ResourceStore

    store = ResourceStore(client)
    store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "sim"},
                 "spec": {"cidr": pool, "blockSize": 26}})
    store.apply({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
                 "spec": {"nodeToNodeMeshEnabled": topology == "mesh", "asNumber": AS_NUMBER}})


def agent_calc_cost(client, prefix: str, name: str) -> dict:
    """One agent's Calculation fed the datastore as the stand-ins left it: its snapshot
    fold, and one Node event and one other node's affinity event, timed (CPU)."""
    from tortie.agent.calc import Calculation
    from tortie.datastore import keys

    kvs, _ = client.get_prefix(prefix + keys.RESOURCES)
    aff, _ = client.get_prefix(prefix + keys.IPAM_AFFINITY)
    items = {kv.key: kv.value for kv in (*kvs, *aff)}
    calc = Calculation(name, prefix=prefix)
    t0 = time.thread_time()
    calc.on_snapshot(items)
    calc.take_messages()
    snap = time.thread_time() - t0
    node_kv = next(kv for kv in kvs if kv.key.endswith("/node/" + node_name(1)))
    doc = json.loads(node_kv.value)
    doc["metadata"].setdefault("labels", {})["sim"] = "changed"
    t0 = time.thread_time()
    calc.on_update(node_kv.key, json.dumps(doc).encode())
    msgs = calc.take_messages()
    node_event = time.thread_time() - t0
    other = next(kv for kv in aff if f"/{node_name(1)}/" in kv.key)
    t0 = time.thread_time()
    for _ in range(100):
        calc.on_update(other.key, other.value)
        calc.take_messages()
    aff_event = (time.thread_time() - t0) / 100
    return {"snapshot_ms": round(snap * 1000, 1), "node_event_ms": round(node_event * 1000, 2),
            "node_event_messages": len(msgs), "affinity_event_ms": round(aff_event * 1000, 3)}


def run(n: int, *, workers: int, concurrent: int, topology: str, idle: float, pool: str,
        status_interval: float, timeout: float) -> dict:
    from tortie.datastore.etcd import EtcdClient, EtcdConfig
    from tortie.lab.etcd_server import EtcdServer

    prefix = f"/tortie-sim-{uuid.uuid4().hex[:8]}/"
    workers = max(1, min(workers, n))
    result: dict = {"nodes": n, "workers": workers, "concurrent": concurrent, "topology": topology,
                    "pool": pool}
    etcd = EtcdServer()
    procs: list[Worker] = []
    try:
        etcd.start()
        result["etcd_data_dir"] = etcd.data_dir
        probe = EtcdProbe(etcd.proc.pid)
        client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix))
        setup_datastore(client, pool, topology)
        m_start = etcd_metrics(etcd.endpoint)

        # 1. register every node, then start every stand-in (a snapshot each)
        phase = Phase(probe, [])
        for slot in range(workers):
            procs.append(Worker("--worker", [
                "--endpoint", etcd.endpoint, "--prefix", prefix, "--nodes", str(n), "--slot", str(slot),
                "--nworkers", str(workers), "--topology", topology, "--status-interval", str(status_interval)]))
        phase.workers = procs
        register = []
        retries = rss_ready = 0
        for w in procs:
            msg = w.recv("registered")
            register += msg["register_s"]
            retries += msg["register_retries"]
        result["register"] = phase.end() | {
            "register_p50_ms": round(1000 * pct(register, 50), 1), "register_p99_ms": round(1000 * pct(register, 99), 1),
            "register_retries": retries}
        phase = Phase(probe, procs)
        for w in procs:
            w.send({"cmd": "sync"})
        for w in procs:
            rss_ready += w.recv("ready")["rss_kb"]
            probe.rss_kb()
        result["start"] = phase.end() | {"standins_rss_mb": round(rss_ready / 1024, 1)}
        result["etcd_sockets"] = probe.sockets()
        claimers = [Worker("--claimer", ["--endpoint", etcd.endpoint, "--prefix", prefix, "--slot", str(i),
                                         "--concurrent", str(math.ceil(concurrent / CLAIMERS))])
                    for i in range(CLAIMERS)]
        procs += claimers
        for c in claimers:
            c.recv("ready")
        watchers = procs[:workers]
        m_ready = etcd_metrics(etcd.endpoint)
        result["watchers"] = m_ready["watchers"]
        result["watch_streams"] = m_ready["watch_streams"]

        # 2. idle: probes and status writes only
        phase = Phase(probe, procs)
        db0, t0 = m_ready["db_bytes"], time.monotonic()
        end = time.monotonic() + idle
        while time.monotonic() < end:
            probe.rss_kb()
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        m_idle = etcd_metrics(etcd.endpoint, before=m_ready["raw"])
        idle_phase = phase.end()
        dt = time.monotonic() - t0
        idle_phase["db_growth_mb_per_min"] = round((m_idle["db_bytes"] - db0) / dt * 60 / 1e6, 2)
        idle_phase["rx_mb_per_s"] = round((m_idle["rx_bytes"] - m_ready["rx_bytes"]) / dt / 1e6, 2)
        idle_phase["requests_per_s"] = round(sum(m_idle[k] - m_ready[k] for k in ("puts", "txns", "ranges")) / dt, 1)
        idle_phase |= {"wal_fsync_p99_ms": m_idle["wal_fsync_p99_ms"],
                       "backend_commit_p99_ms": m_idle["backend_commit_p99_ms"]}
        result["idle"] = idle_phase

        # 3. claims, M at once
        # a few claims alone first: the same path without contention, the reference for the
        # M-at-once waves (on this machine both include the stand-ins' shared CPU)
        names = [node_name(i) for i in range(n)]
        solo_n = max(1, min(10, n // 10))
        solo: list[dict] = []
        for name in names[:solo_n]:
            claimers[0].send({"cmd": "claim", "at": 0, "names": [name]})
            solo += claimers[0].recv("claimed")["results"]
        phase = Phase(probe, procs)
        claims: list[dict] = []
        short = 0
        for wave in range(solo_n, n, concurrent):
            batch = names[wave:wave + concurrent]
            at = time.monotonic() + 0.3
            for i, c in enumerate(claimers):
                c.send({"cmd": "claim", "at": at, "names": batch[i::CLAIMERS]})
            for c in claimers:
                claims += c.recv("claimed")["results"]
                probe.rss_kb()
            # the next wave once every stand-in has seen this one: a backlog of fan-out on
            # the simulator's two cores would otherwise be counted against the next claims
            want = sum(1 for c in (*solo, *claims) if not c["error"])
            for w in watchers:
                w.send({"cmd": "converge", "want": want, "timeout": timeout})
            short = sum(w.recv("converged")["short"] for w in watchers)
        # (`short`: confirmed blocks some stand-in had not seen when the last wave's wait ended)
        claim_phase = phase.end()
        # from the moment the confirm transaction was sent: its commit lies between that and
        # the reply, and watchers are told before the claimer hears back, so the send is the
        # one reference every delivery comes after (the reply's round trip is printed beside)
        commits = {c["confirm_rev"]: c["confirm_sent"] for c in (*solo, *claims)
                   if not c["error"] and c["confirm_rev"]}
        rtts = [c["confirm_rtt"] * 1000 for c in claims if not c["error"] and c["confirm_rev"]]
        solo_ms = [c["latency"] * 1000 for c in solo if not c["error"]]
        cpu_ms = [c["cpu"] * 1000 for c in claims]
        fanout: list[float] = []
        extra = {"unknown": 0, "status_writes": 0, "syncer_resyncs": 0, "monitor_down": 0}
        rss_end, peers, status_bytes, errors = 0, [], 0, []
        for w in watchers:
            w.send({"cmd": "collect", "commits": {str(k): v for k, v in commits.items()}})
            msg = w.recv("collected")
            lat = array.array("f")
            lat.frombytes(base64.b64decode(msg["fanout_ms"]))
            fanout += lat.tolist()
            rss_end += msg["rss_kb"]
            peers += msg["peers"]
            status_bytes = max(status_bytes, msg["status_bytes"])
            errors += msg["errors"]
            for k in extra:
                extra[k] += msg[k]
        m_end = etcd_metrics(etcd.endpoint, before=m_idle["raw"])
        lat_ms = [c["latency"] * 1000 for c in claims if not c["error"]]
        failed = [c["txn_failed"] for c in claims]
        claim_phase |= {
            "claims": len(claims), "claim_errors": sum(1 for c in (*solo, *claims) if c["error"]),
            "solo_claims": len(solo), "solo_claim_p50_ms": round(pct(solo_ms, 50), 1),
            "claim_p50_ms": round(pct(lat_ms, 50), 1), "claim_p99_ms": round(pct(lat_ms, 99), 1),
            "claim_max_ms": round(max(lat_ms, default=float("nan")), 1),
            "claim_cpu_p50_ms": round(pct(cpu_ms, 50), 1),
            "conflicts_total": sum(failed), "claims_with_conflict": sum(1 for f in failed if f),
            "conflicts_max": max(failed, default=0),
            "rpcs_per_claim": round(statistics.mean(c["rpcs"] for c in claims), 1) if claims else 0,
            "fanout_deliveries": len(fanout), "fanout_expected": len(commits) * (n - 1),
            "fanout_short_at_end": short,
            "fanout_p50_ms": round(pct(fanout, 50), 1), "fanout_p99_ms": round(pct(fanout, 99), 1),
            "fanout_max_ms": round(max(fanout, default=float("nan")), 1),
            "fanout_min_ms": round(min(fanout, default=float("nan")), 2),
            "wal_fsync_p99_ms": m_end["wal_fsync_p99_ms"],
            "backend_commit_p99_ms": m_end["backend_commit_p99_ms"],
            "confirm_rtt_p50_ms": round(pct(rtts, 50), 1), "confirm_rtt_p99_ms": round(pct(rtts, 99), 1),
        }
        result["claims"] = claim_phase
        result["claim_error_samples"] = sorted({c["error"] for c in (*solo, *claims) if c["error"]})[:5]
        result["standins"] = {"rss_mb": round(rss_end / 1024, 1), "rss_kb_each": round(rss_end / n),
                              "peers_median": statistics.median(peers), "peers_max": max(peers),
                              "status_doc_bytes_max": status_bytes,
                              "errors": errors[:5], **extra}
        result["etcd"] = {
            "rss_peak_mb": round(probe.rss_peak_kb / 1024, 1), "rss_end_mb": round(probe.rss_kb() / 1024, 1),
            "db_mb": round(m_end["db_bytes"] / 1e6, 2), "db_in_use_mb": round(m_end["db_in_use_bytes"] / 1e6, 2),
            "quota_mb": round(m_end["quota_bytes"] / 1e6), "keys": m_end["keys"],
            "revisions": int(m_end["puts"] + m_end["txns"]), "slow_watchers": m_end["slow_watchers"],
            "grpc_errors": m_end["grpc_errors"] - m_start["grpc_errors"],
            "refused": m_end["refused"] - m_start["refused"],
            "largest_request_bytes": status_bytes,
        }
        result["agent_calc"] = agent_calc_cost(client, prefix, node_name(0))
        client.close()
    finally:
        for w in procs:
            w.stop()
        etcd.stop()
    result["cleaned_up"] = not os.path.exists(result.get("etcd_data_dir", "/nonexistent")) and \
        all(w.proc.poll() is not None for w in procs)
    e = result["etcd"]
    minutes_to_quota = (QUOTA_DEFAULT / 1e6 - e["db_mb"]) / result["idle"]["db_growth_mb_per_min"] \
        if result["idle"]["db_growth_mb_per_min"] > 0 else float("inf")
    result["limits"] = {
        "request_ok": e["largest_request_bytes"] < MAX_REQUEST,
        "db_ok": e["db_mb"] * 1e6 < QUOTA_DEFAULT,
        "no_refusals": e["refused"] == 0,
        "minutes_to_default_quota_without_compaction": round(minutes_to_quota, 1),
    }
    ok = all(v for k, v in result["limits"].items() if k.endswith(("_ok", "refusals")))
    result["limits"]["etcd_within"] = ok
    complete = result["claims"]["claim_errors"] == 0 and result["claims"]["fanout_short_at_end"] == 0
    result["result"] = "PASS" if ok and complete else "MISS"
    return result


def print_table(results: list[dict]) -> None:
    cols = [("stand-ins", lambda r: r["nodes"]),
            ("start s", lambda r: r["start"]["seconds"]),
            ("watchers", lambda r: int(r["watchers"])),
            ("etcd CPU% start/idle/claims", lambda r: f'{r["start"]["etcd_cpu_pct"]}/{r["idle"]["etcd_cpu_pct"]}/{r["claims"]["etcd_cpu_pct"]}'),
            ("etcd RSS MB", lambda r: r["etcd"]["rss_peak_mb"]),
            ("db MB", lambda r: r["etcd"]["db_mb"]),
            ("db MB/min idle", lambda r: r["idle"]["db_growth_mb_per_min"]),
            ("claim alone p50 ms", lambda r: r["claims"]["solo_claim_p50_ms"]),
            ("claim M-at-once p50/p99 ms", lambda r: f'{r["claims"]["claim_p50_ms"]}/{r["claims"]["claim_p99_ms"]}'),
            ("CAS conflicts (claims hit)", lambda r: f'{r["claims"]["conflicts_total"]} ({r["claims"]["claims_with_conflict"]})'),
            ("fan-out p50/p99/max ms", lambda r: f'{r["claims"]["fanout_p50_ms"]}/{r["claims"]["fanout_p99_ms"]}/{r["claims"]["fanout_max_ms"]}'),
            ("stand-ins RSS MB", lambda r: r["standins"]["rss_mb"]),
            ("machine busy% claims", lambda r: r["claims"]["machine_busy_pct"]),
            ("limits", lambda r: r["result"])]
    rows = [[str(h) for h, _ in cols]] + [[str(f(r)) for _, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default=",".join(map(str, DEFAULT_NODES)), help="comma-separated N")
    ap.add_argument("--concurrent", type=int, default=20, help="stand-ins claiming at once (M)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes")
    ap.add_argument("--topology", choices=("mesh", "rr"), default="mesh")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of the idle window")
    ap.add_argument("--pool", default="10.64.0.0/14")
    ap.add_argument("--status-interval", type=float, default=0.0,
                    help="seconds between BGP status writes (0: the agent's; -1: none)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the fan-out")
    ap.add_argument("--json", action="store_true")
    # a worker process (started by the parent)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--claimer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--slot", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nworkers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.nodes = int(args.nodes)
        asyncio.run(worker_main(args))
        return 0
    if args.claimer:
        asyncio.run(claimer_main(args))
        return 0
    from tortie import log as tlog

    # the parent's own writes (the pool before any node exists) would only add noise
    tlog.configure(level=os.environ.get("TORTIE_LOG_LEVEL", "error"))
    if not shutil.which("etcd") and not os.path.exists("/usr/bin/etcd"):
        print("bench/scale/simulate: needs etcd (Debian etcd-server)", file=sys.stderr)
        return 2
    results = []
    for n in (int(x) for x in args.nodes.split(",")):
        r = run(n, workers=args.workers, concurrent=min(args.concurrent, n), topology=args.topology,
                idle=args.idle, pool=args.pool, status_interval=args.status_interval, timeout=args.timeout)
        results.append(r)
        if not args.json:
            print(f"-- {n} stand-ins done: {r['result']}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"simulate: {args.topology}, M={args.concurrent} claiming at once, {args.workers} workers, "
              f"pool {args.pool}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print_table(results)
        for r in results:
            print(f"N={r['nodes']}: agent Calculation at N: snapshot {r['agent_calc']['snapshot_ms']} ms, "
                  f"one Node event {r['agent_calc']['node_event_ms']} ms, one affinity "
                  f"{r['agent_calc']['affinity_event_ms']} ms; largest status doc {r['standins']['status_doc_bytes_max']} B "
                  f"(median {r['standins']['peers_median']} peers, max {r['standins']['peers_max']}); etcd sockets {r['etcd_sockets']}; "
                  f"{r['claims']['rpcs_per_claim']} round trips a claim; "
                  f"quota reached in {r['limits']['minutes_to_default_quota_without_compaction']} min "
                  "without compaction")
        print("etcd within its documented limits (request < 1.5 MiB, db < 2 GiB quota, nothing refused): "
              + ", ".join(f"{r['nodes']}: {'yes' if r['limits']['etcd_within'] else 'NO'}" for r in results))
        print("every claim done and seen by every stand-in: "
              + ", ".join(f"{r['nodes']}: {r['result']} ({r['claims']['claim_errors']} claims failed)"
                          for r in results))
    return 0 if all(r["result"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
