"""Helpers of the fault tests: probes every 100 ms, timed CNI calls, readiness, IPAM check."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid

from tortie.errors import DataplaneError
from tortie.lab import cniexec, nsutil, topology
from tortie.lab.state import Pod

ADD_ANSWER = 2.0  # seconds: a CNI ADD with etcd gone answers "try again later" within this
CONVERGE = 5.0  # seconds after etcd's return until everything works again


def outage_seconds(short: float) -> float:
    """The outage's length: short in CI, TORTIE_OUTAGE_SECONDS (60: the issue's) for the long form."""
    return float(os.environ.get("TORTIE_OUTAGE_SECONDS") or short)


class Prober(threading.Thread):
    """dst probed from src every 100 ms, TCP and UDP alternately, until stopped."""

    def __init__(self, lab, src: str, dst: str) -> None:
        super().__init__(daemon=True)
        self.lab, self.src, self.dst = lab, src, dst
        self.sent = 0
        self.failed: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            udp = self.sent % 2 == 1
            r = self.lab.probe(self.src, self.dst, 80, udp=udp, timeout=0.5)
            self.sent += 1
            if not r.ok:
                self.failed.append(f"{r.proto} {self.src}->{self.dst}: {r.error}")
            self.halt.wait(max(0.0, 0.1 - (time.monotonic() - t0)))


def readiness(lab, node: str) -> tuple[int, dict]:
    status, body = lab.http_get(node, 9099, "/readiness")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {}


def wait_until(pred, seconds: float, step: float = 0.05, since: float | None = None) -> float | None:
    """Seconds from `since` (default: now) until pred() held; None if not within `seconds`."""
    since = time.monotonic() if since is None else since
    while time.monotonic() - since < seconds:
        if pred():
            return time.monotonic() - since
        time.sleep(step)
    return None


def timed_add(lab, node: str) -> tuple[float, str]:
    """A CNI ADD (then DEL, as a runtime does after a failed ADD) of a new container in a
    new namespace on `node`: (seconds the ADD took, its error)."""
    st = lab.state()
    name = f"x{uuid.uuid4().hex[:6]}"
    pod = Pod("default", name, node, topology.pod_netns(lab.name, "default", name), uuid.uuid4().hex)
    nsutil.netns_add(pod.netns)
    try:
        t0 = time.monotonic()
        try:
            cniexec.run_plugin(st, lab.plan(), pod, "ADD", lab.cni_socket(node))
            error = ""
        except DataplaneError as exc:
            error = str(exc)
        took = time.monotonic() - t0
        cniexec.run_plugin(st, lab.plan(), pod, "DEL", lab.cni_socket(node))
    finally:
        nsutil.netns_del(pod.netns)
    return took, error


def ipam_check(lab) -> tuple[str, int]:
    out = lab.ctl("ipam", "check").stdout
    return out, int(re.search(r"(\d+) allocations", out).group(1))


def converged(lab, nodes, victim: str, new_pod: tuple[str, str], back: float) -> dict[str, float | None]:
    """Seconds from `back` (etcd answering again) until every node is ready, an ADD (of
    new_pod: node, namespace/name) works and the victim's endpoint and address are gone;
    None for what did not happen within CONVERGE."""
    figures = {"ready again": wait_until(lambda: all(readiness(lab, n)[0] == 200 for n in nodes),
                                         CONVERGE, since=back)}

    def add_works() -> bool:
        try:
            lab.pod_add(*new_pod)
            return True
        except DataplaneError:
            return False

    figures["ADD works"] = wait_until(add_works, CONVERGE, step=0.1, since=back)
    figures["victim released"] = wait_until(
        lambda: lab.wep(victim) is None and ipam_check(lab)[1] == len(lab.state().pods), CONVERGE,
        step=0.1, since=back)
    return figures
