"""Fixtures for BGP tests: speakers and BIRD routers, each in its own namespace.

A speaker runs as `python tests/bgp/speaker_host.py` inside its namespace (ExaBGP must live
there); `SpeakerProc` drives it over JSON lines. Everything is stopped by the PID we
started, and the namespaces go with the shared `netns` fixture.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import pytest

from tortie.lab.nsutil import stop_group

SPEAKER_HOST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speaker_host.py")


def wait_for(check: Callable[[], object], timeout: float = 20.0, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def veth(netns, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
    """A veth pair between two namespaces, addresses as CIDRs on each end."""
    a, b = f"v{os.urandom(3).hex()}", f"v{os.urandom(3).hex()}"
    subprocess.run(["ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b],
                   check=True)
    for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)


def lan(hub: str, hub_addr: str, members: list[tuple[str, str]], extra: dict[str, str] | None = None) -> None:
    """One L2 segment: a bridge in `hub` (addressed), and a veth from each member onto it;
    `extra` gives a member namespace a second (e.g. IPv6) address."""
    subprocess.run(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", hub, "addr", "add", hub_addr, "dev", "br0"], check=True)
    subprocess.run(["ip", "-n", hub, "link", "set", "br0", "up"], check=True)
    for ns, addr in members:
        a, b = f"v{os.urandom(3).hex()}", f"v{os.urandom(3).hex()}"
        subprocess.run(["ip", "link", "add", a, "netns", hub, "type", "veth", "peer", "name", b, "netns", ns],
                       check=True)
        subprocess.run(["ip", "-n", hub, "link", "set", a, "master", "br0", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", b], check=True)
        if extra and ns in extra:
            subprocess.run(["ip", "-n", ns, "addr", "add", extra[ns], "dev", b, "nodad"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", b, "up"], check=True)


class SpeakerProc:
    """A BGPSpeaker in `ns`, driven over stdin/stdout."""

    def __init__(self, ns: str, state_dir: str) -> None:
        self.ns, self.state_dir = ns, state_dir
        self.events: queue.Queue[dict] = queue.Queue()
        self.routes: dict[str, list[str]] | None = None
        self.route_history: list[tuple[float, dict]] = []
        self.egress: dict[str, dict[str, str]] = {}  # the speaker's egress view, as last handed over
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, SPEAKER_HOST],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(os.path.join(state_dir, "host.err"), "ab"),
            text=True, start_new_session=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._expect("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            doc = json.loads(line)
            if doc.get("event") == "routes":
                self.routes = doc["routes"]
                self.route_history.append((doc["t"], doc["routes"]))
            elif doc.get("event") == "egress":
                self.egress = doc["view"]
            else:
                self.events.put(doc)

    def _expect(self, event: str, timeout: float = 30.0) -> dict:
        while True:
            doc = self.events.get(timeout=timeout)
            if doc.get("event") == event:
                return doc

    def _call(self, doc: dict, timeout: float = 60.0) -> dict:
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()
        return self._expect("status" if doc["op"] == "status" else "ok", timeout)

    def start(self, **kwargs) -> None:
        kwargs.setdefault("state_dir", self.state_dir)
        kwargs.setdefault("settle_time", 3.0)
        self._call({"op": "start", **kwargs})

    def peers(self, peers: list[dict]) -> None:
        self._call({"op": "peers", "peers": peers})

    def import_pools(self, cidrs: list[str]) -> None:
        self._call({"op": "import_pools", "cidrs": cidrs})

    def egress_imports(self, imports: dict[str, list[str]]) -> None:
        self._call({"op": "egress_imports", "imports": imports})

    def exports(self, prefixes: list[str], communities: list[str] = (), policies: list[dict] = ()) -> dict:
        return self._call({"op": "exports", "prefixes": prefixes, "communities": list(communities),
                           "policies": list(policies)})

    def status(self) -> dict:
        return self._call({"op": "status"})

    def peer(self, address: str) -> dict:
        return next(p for p in self.status()["peers"] if p["peer"] == address)

    def wait_state(self, address: str, state: str = "established", timeout: float = 20.0) -> dict:
        return wait_for(lambda: (p := self.peer(address))["state"] == state and p, timeout,
                        what=f"{address} {state}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call({"op": "stop"}, timeout=15)
            except (queue.Empty, BrokenPipeError, OSError):
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Bird:
    """A BIRD2 router in `ns`; `config` is the body after the common header."""

    def __init__(self, ns: str, workdir: str, router_id: str, body: str) -> None:
        self.ns, self.dir = ns, workdir
        self.conf = os.path.join(workdir, "bird.conf")
        self.sock = os.path.join(workdir, "bird.ctl")
        with open(self.conf, "w") as f:
            f.write(f'router id {router_id};\nlog "{workdir}/bird.log" all;\n'
                    "protocol device {}\n"
                    "protocol kernel { ipv4 { import none; export all; }; learn off; }\n" + body)
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-c", self.conf, "-s", self.sock, "-f"],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "bird.err"), "ab"),
                                     start_new_session=True)
        wait_for(lambda: os.path.exists(self.sock), 10, what="bird control socket")
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise AssertionError("bird exited: " + open(os.path.join(workdir, "bird.err")).read())

    def birdc(self, *args: str) -> str:
        return subprocess.run(["birdc", "-s", self.sock, *args], capture_output=True, text=True).stdout

    def kernel_routes(self) -> set[str]:
        out = subprocess.run(["ip", "-n", self.ns, "route", "show", "proto", "bird"],
                             capture_output=True, text=True).stdout
        routes = set()
        for line in out.splitlines():
            words = line.split()
            if words and words[0] in ("blackhole", "unreachable", "prohibit"):
                words = words[1:]
            if words:
                routes.add(words[0] if "/" in words[0] else words[0] + ("/128" if ":" in words[0] else "/32"))
        return routes

    def protocol(self, name: str) -> list[str]:
        for line in self.birdc("show", "protocols").splitlines():
            if line.split()[:1] == [name]:
                return line.split()
        return []

    def established(self, name: str) -> bool:
        return "Established" in self.protocol(name)

    def stop(self) -> None:
        stop_group(self.proc, 5)


def bird_bgp(name: str, local: str, local_as: int, peer: str, peer_as: int, *, password: str | None = None,
             passive: bool = False, extra: str = "") -> str:
    pw = f'    password "{password}";\n' if password else ""
    return (f"protocol bgp {name} {{\n    local {local} as {local_as};\n    neighbor {peer} as {peer_as};\n"
            f"    direct;\n    hold time 9;\n    graceful restart on;\n    connect retry time 1;\n    error wait time 1, 5;\n"
            f"{pw}{'    passive on;' if passive else ''}\n"
            "    ipv4 { import all; export where source = RTS_STATIC; next hop self; gateway direct; };\n"
            f"{extra}}}\n")


@pytest.fixture
def workdir():
    if os.environ.get("TORTIE_TEST_KEEP"):  # keep logs for a post-mortem
        yield tempfile.mkdtemp(prefix="tortie-bgp-")
        return
    with tempfile.TemporaryDirectory(prefix="tortie-bgp-") as d:
        yield d


@pytest.fixture
def lab(netns, workdir):
    """Start speakers and BIRDs; everything is stopped at teardown, even on failure."""
    started: list = []

    class Lab:
        def speaker(self, ns: str, name: str) -> SpeakerProc:
            d = os.path.join(workdir, name)
            os.makedirs(d, exist_ok=True)
            sp = SpeakerProc(ns, d)
            started.append(sp)
            return sp

        def bird(self, ns: str, name: str, router_id: str, body: str) -> Bird:
            d = os.path.join(workdir, name)
            os.makedirs(d, exist_ok=True)
            b = Bird(ns, d, router_id, body)
            started.append(b)
            return b

    try:
        yield Lab()
    finally:
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception:
                pass
