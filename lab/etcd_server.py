"""Run a single-member etcd (Debian's etcd-server) for tests and the lab.

Unique ports and a private data dir per instance; stopped by the PID we started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from tortie.lab.nsutil import stop_group

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"


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
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_dir: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 15.0) -> EtcdServer:
        if not self.client_port:
            self.client_port = free_port(self.host) if not self.netns else 2379
        if not self.peer_port:
            self.peer_port = free_port(self.host) if not self.netns else 2380
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="tortie-etcd-")
            self._own_dir = True
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            ETCD_BIN, "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--log-level", "error", "--logger", "zap",
            "--auto-compaction-retention", "0",
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log_path = os.path.join(self.data_dir, "..", f"{os.path.basename(self.data_dir)}.log")
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; log: {log_path}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy after {timeout}s; log: {log_path}")

    def healthy(self) -> bool:
        if self.netns:
            r = subprocess.run(["ip", "netns", "exec", self.netns, "etcdctl", "--endpoints", self.endpoint,
                                "endpoint", "health"], capture_output=True)
            return r.returncode == 0
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=0.5) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc:
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
