"""Helpers the benchmarks share: percentiles, a process's CPU time, the agent's metrics.

    cpu = AgentCPU(pid)          # CPU time of every thread of the agent (ns resolution)
    before = cpu.by_thread(); ...; _, after = cpu.settle()   # CPU seconds by thread id
    m = parse_metrics(lab.http_get(node, 9091, "/metrics")[1])
    histogram_quantile(m, "tortie_event_loop_lag_seconds", 0.99, before=m0)

Not a test fixture: the benches under bench/ run as scripts and import this module.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from tortie.lab.nsutil import socket_in, stop_group

Labels = tuple[tuple[str, str], ...]
Metrics = dict[str, dict[Labels, float]]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile by rank (nearest rank; q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --- exec'ing a CNI plugin as a container runtime does -----------------------------------------

def cni_env(command: str, cid: str, netns: str, cni_path: str) -> dict[str, str]:
    """The CNI_* environment of one call for pod network namespace `netns` (a name)."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
            "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0", "CNI_PATH": cni_path,
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-{cid[:12]};"
                        f"K8S_POD_INFRA_CONTAINER_ID={cid}"}


def exec_concurrently(argv: list[str], envs: list[dict[str, str]],
                      stdin: bytes) -> tuple[float, list[tuple[int, str]]]:
    """Start one process per env, all at once, each given `stdin`.

    Returns the wall time until all exited and (index, output) of those that failed."""
    t = time.perf_counter()
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for env in envs]
    for p in procs:  # feed everyone first, then collect: they all run at once
        try:
            p.stdin.write(stdin)
            p.stdin.close()
        except BrokenPipeError:  # a process that exits without reading its stdin
            pass
    failures = []
    for i, p in enumerate(procs):
        out = p.stdout.read()
        err = p.stderr.read()
        if p.wait() != 0:
            failures.append((i, (out or err or f"exit {p.returncode}".encode()).decode(errors="replace")))
        p.stdout.close()
        p.stderr.close()
    return time.perf_counter() - t, failures


# --- CPU time of a running process ---------------------------------------------------------

def _thread_ns(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def _py_spy() -> str:
    return shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")


def thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name of a running Python process (via `py-spy dump`;
    Python does not name its OS threads, so /proc cannot tell them apart)."""
    try:
        out = subprocess.run([_py_spy(), "dump", "--pid", str(pid), "--nonblocking"],
                             capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError:  # no py-spy (pip install -e '.[bench]'): only the main thread is known
        return {pid: "MainThread"}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out, re.M)}


def _task_ns(pid: int) -> int:
    """Sum of sum_exec_runtime (ns) over the live threads of pid: /proc/<pid>/task/*/schedstat.

    /proc/<pid>/stat counts in clock ticks (10 ms here), too coarse for a 1 ms budget.
    A thread that exits takes its time with it; the agent's threads are long-lived pools."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return total


def _stat_seconds(pid: int) -> float:
    """utime + stime of pid (all threads, including exited ones), in seconds (tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class AgentCPU:
    """The CPU time a running process (the agent) spends, read from /proc around an operation."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def seconds(self) -> float:
        return _task_ns(self.pid) / 1e9

    def by_thread(self) -> dict[int, float]:
        """CPU seconds of each live thread, by native thread id."""
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                out[int(tid)] = _thread_ns(self.pid, int(tid)) / 1e9
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
        return out

    def main_thread_seconds(self) -> float:
        """The main thread's alone: for the agent, its asyncio loop (not the CNI server's pool,
        where IPAM, etcd writes and the netns wiring run, nor grpc's threads)."""
        return _thread_ns(self.pid, self.pid) / 1e9

    def ticks_seconds(self) -> float:
        return _stat_seconds(self.pid)

    def idle_rate(self, window: float = 1.0) -> dict[int, float]:
        """CPU seconds per second each thread burns when nothing is asked of the process."""
        t0, c0 = time.monotonic(), self.by_thread()
        time.sleep(window)
        dt, c1 = time.monotonic() - t0, self.by_thread()
        return {tid: (c1[tid] - c0.get(tid, 0.0)) / dt for tid in c1}

    def settle(self, quiet: float = 0.25, eps: float = 0.0005, timeout: float = 30.0,
               not_before: float = 0.0) -> tuple[float, dict[int, float]]:
        """Wait until the process used less than eps CPU seconds over `quiet` seconds, and
        the monotonic clock is past `not_before` (a window of the same length for every
        operation, whatever the machine's load makes of `eps`).

        Returns (monotonic time, CPU seconds by thread) at the start of that quiet window:
        where the work being measured ended, without the quiet window itself."""
        t0 = time.monotonic()
        last = (t0, self.by_thread())
        while time.monotonic() - t0 < timeout:
            time.sleep(quiet)
            now = (time.monotonic(), self.by_thread())
            if sum(now[1].values()) - sum(last[1].values()) < eps and last[0] >= not_before - quiet:
                return last
            last = now
        raise TimeoutError(f"process {self.pid} still busy after {timeout:.0f} s")

    def wait_quiet(self, quiet: float = 0.25, eps: float = 0.0005, timeout: float = 30.0) -> None:
        self.settle(quiet, eps, timeout)


# --- the agent's Prometheus text -------------------------------------------------------------

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition -> {sample name: {sorted label pairs: value}}."""
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out.setdefault(m.group(1), {})[labels] = float(m.group(3))
        except ValueError:
            continue
    return out


def metric_sum(metrics: Metrics, name: str, **match: str) -> float | None:
    """Sum of the samples of `name` whose labels include `match`; None if the metric is absent."""
    samples = metrics.get(name)
    if samples is None:
        return None
    return sum(v for labels, v in samples.items() if all((k, want) in labels for k, want in match.items()))


def histogram_buckets(metrics: Metrics, name: str, before: Metrics | None = None,
                      **match: str) -> list[tuple[float, float]] | None:
    """[(le, cumulative count)] of histogram `name` (minus `before`), summed over other labels."""
    samples = metrics.get(name + "_bucket")
    if samples is None:
        return None
    old = (before or {}).get(name + "_bucket", {})
    acc: dict[float, float] = {}
    for labels, v in samples.items():
        d = dict(labels)
        if any(d.get(k) != want for k, want in match.items()):
            continue
        le = float(d["le"])  # "+Inf" parses as inf
        acc[le] = acc.get(le, 0.0) + v - old.get(labels, 0.0)
    return sorted(acc.items())


def histogram_quantile(metrics: Metrics, name: str, q: float, before: Metrics | None = None,
                       **match: str) -> float | None:
    """Prometheus' histogram_quantile (linear within a bucket) of the observations since `before`.

    None when the metric is absent or nothing was observed; inf when q falls in +Inf."""
    buckets = histogram_buckets(metrics, name, before, **match)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lo_le, lo_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return lo_le if lo_le else math.inf
            if n == lo_n:
                return le
            return lo_le + (le - lo_le) * (rank - lo_n) / (n - lo_n)
        lo_le, lo_n = le, n
    return buckets[-1][0]


def delta(after: Metrics, before: Metrics, name: str, **match: str) -> float | None:
    a, b = metric_sum(after, name, **match), metric_sum(before, name, **match)
    if a is None:
        return None
    return a - (b or 0.0)


def has_metrics(metrics: Mapping[str, object], *names: str) -> bool:
    return all(n in metrics or n + "_bucket" in metrics for n in names)


# --- wall-clock profiles of a running agent (py-spy) ------------------------------------------

class Profiler:
    """py-spy sampling a Python process's threads, waiting ones included (wall-clock), while one
    phase runs; `stop()` writes NAME.txt (collapsed stacks) and NAME.top.txt (the top frames of
    `threads`, by self and total time, without their idle samples)."""

    def __init__(self, pid: int, out_dir: str, threads: tuple[str, ...] = ("MainThread",)) -> None:
        self.pid, self.dir, self.threads = pid, out_dir, threads
        self.p: subprocess.Popen | None = None
        os.makedirs(out_dir, exist_ok=True)

    def start(self, name: str) -> None:
        self.path = os.path.join(self.dir, name + ".txt")
        self.p = subprocess.Popen([_py_spy(), "record", "--pid", str(self.pid), "--rate", "1000", "--format", "raw",
                                   "--threads", "--idle", "--output", self.path, "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        if self.p is not None:
            os.killpg(self.p.pid, 2)  # SIGINT: py-spy writes its output and exits
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                stop_group(self.p, 5)
            self.p = None
            summarize_profile(self.path, self.threads)


# Leaves where a thread waits for work rather than for an answer: those samples are left out.
IDLE_LEAVES = ("EpollSelector.select (selectors.py", "_worker (concurrent/futures/thread.py:81)")


def summarize_profile(path: str, threads: tuple[str, ...], top: int = 25) -> None:
    """Top frames (file:line function) by self and by total samples, from py-spy's collapsed stacks
    (wall-clock: waits included), of `threads` (names) while they are not idle."""
    selfs: dict[str, int] = {}
    totals: dict[str, int] = {}
    total = 0
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        if not any(t in frames[0] for t in threads) or frames[-1].startswith(IDLE_LEAVES):
            continue
        total += count
        if frames:
            selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for f in set(frames):
            totals[f] = totals.get(f, 0) + count
    with open(path[:-4] + ".top.txt", "w") as f:
        f.write(f"{total} samples\n\nby self time:\n")
        for fr, n in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]:
            f.write(f"  {100 * n / total:5.1f}%  {fr}\n")
        f.write("\nby total time:\n")
        for fr, n in sorted(totals.items(), key=lambda kv: -kv[1])[:top * 3]:
            f.write(f"  {100 * n / total:5.1f}%  {fr}\n")


def children(pid: int) -> list[int]:
    """The direct children of a process (over all its threads)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def memory_mb(pids: list[int]) -> dict[str, float]:
    """Resident memory of the processes: RSS summed (counts shared pages once per process)
    and PSS (shared pages split among their sharers: sums to what they really hold)."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


# --- a UDP probe stream (bench/egress): datagrams every few ms, the gaps in the replies ----------

class UDPEcho:
    """Echoes every datagram back to its sender, on `address:port` inside `netns` (a thread of
    this process; the socket lives in the namespace). `stop()` closes it."""

    def __init__(self, netns: str, address: str, port: int) -> None:
        self.sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="udp-echo")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
                self.sock.sendto(data, peer)
            except OSError:  # timeout, or an ICMP error from a reply that went nowhere
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class UDPStream:
    """A datagram every `interval` s from namespace `netns` to `dst:port`, each numbered; the
    arrival time of every reply. The loss window of a failure is the longest gap between
    consecutive replies (`longest_gap`)."""

    def __init__(self, netns: str, dst: str, port: int, interval: float = 0.01) -> None:
        self.sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((dst, port))  # one flow: the same 5-tuple for every datagram
        self.sock.settimeout(0.2)
        self.interval = interval
        self.replies: list[float] = []  # monotonic arrival times
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True, name="udp-send"),
                         threading.Thread(target=self._receive, daemon=True, name="udp-recv")]
        for t in self._threads:
            t.start()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def _send(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sock.send(self.sent.to_bytes(8, "big"))
            except OSError:  # ICMP unreachable reported on a connected socket: keep going
                pass
            self.sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(64)
            except OSError:
                continue
            self.replies.append(time.monotonic())

    def replied_since(self, t: float) -> int:
        return sum(1 for r in self.replies if r >= t)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a reply between `start` and `end` (both ends count)."""
        marks = [start, *(r for r in self.replies if start < r < end), end]
        return max(b - a for a, b in itertools.pairwise(marks))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.sock.close()


def add_flow_counter(lab, routers, table: str, match: str) -> None:
    """In each router: a named counter `carried` (nftables table `inet <table>`, forward hook) of
    the packets that `match` (an nft expression): which router carried a flow."""
    for tor in routers:
        lab.exec(tor, ["nft", "-f", "-"], check=True, text=True, input=(
            f"table inet {table} {{\n  counter carried {{}}\n  chain counting {{\n"
            f"    type filter hook forward priority 0; policy accept;\n    {match} counter name \"carried\"\n  }}\n}}\n"))


def flow_packets(lab, router: str, table: str) -> int:
    out = lab.exec(router, ["nft", "-j", "list", "counter", "inet", table, "carried"],
                   capture_output=True, text=True, check=True).stdout
    return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)
