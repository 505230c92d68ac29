"""Network-namespace plumbing for the lab: `ip` commands and per-thread setns.

Everything here acts inside named namespaces; nothing touches the root namespace.
A socket stays in the namespace it was created in, so `socket_in()` switches only the
calling thread into a namespace for the `socket()` call and straight back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence

from tortie.errors import DataplaneError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started in its own session: SIGTERM to its group, SIGKILL after
    `timeout`. By the PID we hold, never by name; quiet if it is already gone."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        proc.wait()


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None, timeout: float | None = 60) -> subprocess.CompletedProcess:
    """Run a command, capturing output; raise DataplaneError with its stderr on failure."""
    r = subprocess.run(list(cmd), capture_output=True, text=True, input=input, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise DataplaneError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", "-n", netns, *args], check=check)


def ip_batch(netns: str, lines: Sequence[str]) -> None:
    """Several `ip` commands in one exec (`ip -batch`), stopping at the first failure."""
    if lines:
        run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def netns_list() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_add(name: str) -> None:
    """Create a namespace with loopback up."""
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def netns_pids(name: str) -> list[int]:
    r = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def netns_del(name: str) -> None:
    """Delete a namespace if it exists (its links go with it)."""
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)


def sysctl(netns: str, key: str, value: str) -> None:
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"])


def multipath_failover(netns: str, ifnames: Sequence[str]) -> None:
    """A host with an ECMP default route over several routers stops using a dead one, as a
    real dual-homed host must: the kernel skips a next hop whose neighbour entry failed
    (fib_multipath_use_neigh), which short neighbour timers make happen within seconds
    of the first unanswered packet. Only inside the lab's own namespaces."""
    keys = ["net.ipv4.fib_multipath_use_neigh=1"]
    for ifname in ifnames:
        keys += [f"net.ipv4.neigh.{ifname}.base_reachable_time_ms=2000",
                 f"net.ipv4.neigh.{ifname}.delay_first_probe_time=1"]
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", *keys])


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DataplaneError(f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into namespace `name` for the block, then back.

    Only for short synchronous work (creating sockets): other threads are unaffected,
    and threads started inside the block would inherit the namespace.
    """
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise DataplaneError(f"no network namespace {name!r}") from exc
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in namespace `netns` (usable from any thread afterwards)."""
    with in_netns(netns):
        return socket.socket(family, type)


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, str]:
    """GET http://host:port/path from inside netns: (status, body); (0, "") if nothing answers."""
    try:
        with socket_in(netns) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
    except OSError:
        return 0, ""
    head, _, body = buf.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), body.decode(errors="replace")
    except (IndexError, ValueError):
        return 0, ""
