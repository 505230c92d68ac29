"""Helpers for the CNI tests: a node namespace running the CNI server, a runtime-like
exec of the installed plugins, and a real TCP probe between namespaces."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore
from tortie.lab.nsutil import stop_group

POOL_CIDR = "10.244.0.0/16"
NODE_ADDR = "192.168.250.1"
NETWORK = "k8s-pod-network"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Call:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout) if self.stdout.strip() else None


def net_config(version: str = "1.0.0", *, socket_path: str, plugin: str = "tortie", **extra) -> dict:
    conf = {"cniVersion": version, "name": NETWORK, "type": plugin, "agentSocket": socket_path}
    conf.update(extra)
    return conf


@dataclass
class Node:
    """A node namespace running the CNI server; exec plugins in it like a runtime does."""

    ns: str
    name: str
    socket: str
    bin_dir: str
    etcd_env: dict
    store: ResourceStore
    ipam: IPAM
    netns_factory: object
    proc: subprocess.Popen | None = None
    log_path: str = ""
    pods: list = field(default_factory=list)
    relay: NsRelay | None = None

    def start_server(self) -> None:
        env = {**os.environ, **self.etcd_env, "TORTIE_LOG_FORMAT": "json"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "tortie.agent.cni_server",
             "--socket", self.socket, "--node", self.name],
            env=env, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
        )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            self.stop_server()
            raise RuntimeError(f"CNI server did not start: {line!r}; log {self.log_path}:\n"
                               + open(self.log_path).read()[-3000:])

    def stop_server(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, 10)
        self.proc.stdout.close()
        self._log.close()
        self.proc = None

    def pod_ns(self) -> str:
        name = self.netns_factory.new("pod")
        self.pods.append(name)
        return name

    def exec_plugin(self, command: str, config: dict | bytes | None, *, cid: str = "", netns: str = "",
                    ifname: str = "eth0", args: str | None = None, plugin: str = "tortie",
                    env: dict | None = None, omit: tuple[str, ...] = ()) -> Call:
        """Exec a plugin from the bin dir inside the node namespace, as a runtime does."""
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
             "CNI_NETNS": f"/run/netns/{netns}" if netns and not netns.startswith("/") else netns,
             "CNI_IFNAME": ifname, "CNI_PATH": self.bin_dir}
        if args is not None:
            e["CNI_ARGS"] = args
        e.update(env or {})
        for k in omit:
            e.pop(k, None)
        e = {k: v for k, v in e.items() if v != "" or k in ("CNI_NETNS",)}
        data = config if isinstance(config, bytes) else json.dumps(config or {}).encode()
        r = subprocess.run(["ip", "netns", "exec", self.ns, os.path.join(self.bin_dir, plugin)],
                           input=data, env=e, capture_output=True, timeout=60)
        return Call(r.returncode, r.stdout.decode(), r.stderr.decode())

    def config(self, version: str = "1.0.0", **extra) -> dict:
        return net_config(version, socket_path=self.socket, **extra)

    def veths(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.ns, "-o", "link", "show"], capture_output=True, text=True).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.split(":")[1].strip().startswith("tor")]

    def host_routes(self) -> str:
        return subprocess.run(["ip", "-n", self.ns, "route", "show", "proto", "77"],
                              capture_output=True, text=True).stdout

    def allocations(self) -> list[str]:
        return [h.ip for b in self.ipam.blocks() for h in b.held()]

    def weps(self) -> list[dict]:
        return self.store.list("WorkloadEndpoint")


def tcp_reachable(src_ns: str, dst_ip: str, dst_ns: str, port: int = 8080, timeout: float = 3.0, *,
                  dst_port: int | None = None, bind_ip: str | None = None) -> bool:
    """A real TCP connect from src_ns to dst_ip:dst_port, answered by a listener in dst_ns
    on bind_ip:port (defaults: the same address and port; they differ through a DNAT)."""
    dst_port = dst_port or port
    bind_ip = bind_ip or dst_ip
    listener = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c",
         f"import socket,sys; s=socket.socket(socket.AF_INET6 if ':' in '{bind_ip}' else socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
         f"s.bind(('{bind_ip}', {port})); s.listen(); print('up', flush=True); s.settimeout({timeout});"
         "c,_=s.accept(); c.sendall(b'hi'); c.close()"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    try:
        assert listener.stdout.readline().startswith(b"up")
        r = subprocess.run(
            ["ip", "netns", "exec", src_ns, sys.executable, "-c",
             f"import socket; s=socket.create_connection(('{dst_ip}', {dst_port}), timeout={timeout});"
             "assert s.recv(2) == b'hi'"],
            capture_output=True, timeout=timeout + 5,
        )
        return r.returncode == 0
    finally:
        if listener.poll() is None:
            os.killpg(listener.pid, signal.SIGKILL)
        listener.wait()
        listener.stdout.close()


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


class NsRelay:
    """127.0.0.1:<port> inside a network namespace, relayed to a TCP address outside it.

    Lets a process inside a node namespace reach the tests' shared etcd on the root
    namespace's loopback without giving the node namespace any route or link: the
    listening socket is opened by a thread that entered the namespace (setns is per
    thread; a socket keeps the namespace it was made in), every other socket here
    lives where the test process lives.
    """

    def __init__(self, ns: str, target: tuple[str, int]) -> None:
        self.target = target
        self._stop = False
        box: dict = {}

        def enter() -> None:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, 0x40000000) != 0:
                    box["err"] = OSError(ctypes.get_errno(), "setns")
                    return
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                s.listen(64)
                box["sock"] = s
            finally:
                os.close(fd)

        t = threading.Thread(target=enter)
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        self.listener: socket.socket = box["sock"]
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
