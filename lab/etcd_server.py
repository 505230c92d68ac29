"""Run etcd (Debian's etcd-server) for tests and the lab: one member, or a cluster.

Unique ports and a private data dir per instance; stopped by the PID we started.
`EtcdServer` is one member (alone, or one of an `initial_cluster`); with `tls` it serves
its clients and peers over TLS and asks both for a certificate of the lab CA.
`EtcdCluster` starts N members on one host (loopback, free ports) for tests of failover.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from tortie.lab.nsutil import stop_group
from tortie.lab.pki import Pki, issue, make_ca
from tortie.process import die_with_parent

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
# A cluster elects a new leader within about a second of losing one (the defaults, 100 ms
# and 1 s randomised up to 2 s, take up to 2.5 s): a CNI ADD waits out an election
# inside its 1.5 s etcd deadline. Members share 2 loaded cores here, so not shorter.
CLUSTER_TUNING = ("--heartbeat-interval", "100", "--election-timeout", "500")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    data_dir: str | None = None
    netns: str | None = None  # run inside this network namespace (the lab's control ns)
    name: str = "n1"
    initial_cluster: str | None = None  # name=peer URL,...; None: this member alone
    pki: Pki | None = None  # TLS for clients and peers; certs named after the member
    log_path: str | None = None
    # an etcd of a test or benchmark goes with the process that started it, however that
    # ends; a lab's outlives `tortie-lab up` (it goes with `tortie-lab down`)
    die_with_owner: bool = True
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_dir: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    def _ports(self) -> None:
        if not self.client_port:
            self.client_port = free_port(self.host) if not self.netns else 2379
        if not self.peer_port:
            self.peer_port = free_port(self.host) if not self.netns else 2380

    def command(self) -> list[str]:
        self._ports()
        peer = self.peer_url
        cmd = [
            ETCD_BIN, "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--log-level", "error", "--logger", "zap",
            "--auto-compaction-retention", "0",
        ]
        if self.initial_cluster:
            cmd += CLUSTER_TUNING
        if self.pki:
            cert, key = self.pki.member(self.name)
            for side in ("", "peer-"):
                cmd += [f"--{side}cert-file", cert, f"--{side}key-file", key,
                        f"--{side}trusted-ca-file", self.pki.ca, f"--{side}client-cert-auth"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def launch(self) -> EtcdServer:
        """Start the process; `wait_healthy()` waits for it (members of a cluster are
        launched together: none is healthy before a quorum runs)."""
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="tortie-etcd-")
            self._own_dir = True
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        cmd = self.command()
        self.log_path = self.log_path or os.path.join(self.data_dir, "..", f"{os.path.basename(self.data_dir)}.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, start_new_session=True,
                                     preexec_fn=die_with_parent if self.die_with_owner else None)
        return self

    def wait_healthy(self, timeout: float = 15.0) -> EtcdServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd {self.name} not healthy after {timeout}s; log: {self.log_path}")

    def start(self, timeout: float = 15.0) -> EtcdServer:
        return self.launch().wait_healthy(timeout)

    def etcdctl(self) -> list[str]:
        """etcdctl against this member (inside its namespace), with the lab's client cert."""
        cmd = ["etcdctl", "--endpoints", self.endpoint]
        if self.pki:
            cert, key = self.pki.client
            cmd += ["--cacert", self.pki.ca, "--cert", cert, "--key", key]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def healthy(self) -> bool:
        if self.netns:
            r = subprocess.run([*self.etcdctl(), "endpoint", "health"], capture_output=True)
            return r.returncode == 0
        ctx = None
        if self.pki:
            ctx = ssl.create_default_context(cafile=self.pki.ca)
            ctx.load_cert_chain(*self.pki.client)
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=0.5, context=ctx) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the member's process group (SIGKILL: a crash; SIGSTOP: a freeze)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGCONT) if self.proc.poll() is None else None
            stop_group(self.proc, 5)
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            try:
                os.unlink(os.path.join(os.path.dirname(self.data_dir), os.path.basename(self.data_dir) + ".log"))
            except OSError:
                pass

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def initial_cluster(members: Sequence[EtcdServer]) -> str:
    for m in members:
        m._ports()
    return ",".join(f"{m.name}={m.peer_url}" for m in members)


class EtcdCluster:
    """N members on loopback with free ports, optionally over TLS (a CA of its own)."""

    def __init__(self, size: int = 3, *, tls: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="tortie-etcdc-")
        self.pki = make_ca(os.path.join(self.dir, "pki")) if tls else None
        self.members = [EtcdServer(name=f"n{i}", data_dir=os.path.join(self.dir, f"n{i}"), pki=self.pki)
                        for i in range(1, size + 1)]
        cluster = initial_cluster(self.members)
        for m in self.members:
            m.initial_cluster = cluster
            if self.pki:
                issue(self.pki, m.name, ips=[m.host])
        if self.pki:
            issue(self.pki, "client", server=False)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def member(self, name: str) -> EtcdServer:
        return next(m for m in self.members if m.name == name)

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        try:
            for m in self.members:
                m.launch()
            for m in self.members:
                m.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str, timeout: float = 20.0) -> None:
        """Start a stopped member again on its data."""
        m = self.member(name)
        m._log.close()
        m.launch().wait_healthy(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
