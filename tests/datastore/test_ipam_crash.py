"""SIGKILL at random points never double-allocates; leaks are found and freed.

Each round starts two allocator processes (CNI-like: allocate then write the
WorkloadEndpoint; release then delete it) and kills both with SIGKILL at a random
moment. Tiny blocks make block claims frequent, so kills also land
inside claims (blocks of two addresses). Afterwards: no address was held by two handles at once, everything a
process logged as held is still held by its handle, the leaks `check` reports are
allocations without a WorkloadEndpoint (at most one per killed process), abandoned
claims are reported, and releasing the report leaves `check` clean.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import re
import signal
import time

import pytest
from ipam_helpers import by_handle, crash_child, make_node, make_pool, overlaps

from tortie.ctl.main import main
from tortie.datastore.ipam import IPAM
from tortie.datastore.resources import ResourceStore

ROUNDS = 12


def _wait_ready(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if "ready" in f.read():
                    return
        time.sleep(0.01)
    raise AssertionError(f"child never got ready ({path})")


@pytest.mark.slow
def test_sigkill_never_double_allocates(etcd, etcd_server, tmp_path):
    store = ResourceStore(etcd)
    ipam = IPAM(etcd)
    make_pool(store, "v4", "10.60.0.0/21", blockSize=31)
    make_pool(store, "v6", "fd00:60::/116", blockSize=126)
    for node in ("n0", "n1", "n2"):
        make_node(store, node)
    rng = random.Random()
    ctx = multiprocessing.get_context("spawn")
    logs, killed = [], 0
    for rnd in range(ROUNDS):
        nodes = rng.sample(["n0", "n1", "n2"], 2) if rnd % 2 else ["n0", "n0"]
        procs = []
        for i, node in enumerate(nodes):
            path = str(tmp_path / f"r{rnd}-{i}.log")
            logs.append(path)
            p = ctx.Process(target=crash_child, args=(etcd_server.endpoint, etcd.config.prefix, node, path,
                                                      rng.randrange(1 << 30)))
            p.start()
            procs.append((p, path))
        try:
            for _, path in procs:
                _wait_ready(path)
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            for p, _ in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                    killed += 1
                p.join(10)
        assert all(p.exitcode == -signal.SIGKILL for p, _ in procs), [p.exitcode for p, _ in procs]

    events, believed = [], {}
    for path in logs:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if not parts or parts[0] == "ready" or (parts[0] == "hold" and len(parts) < 4):
                    continue  # a line cut short by the kill
                if parts[0] == "hold":
                    believed[parts[2]] = set(parts[3:])
                    events += [("hold", float(parts[1]), ip, parts[2]) for ip in parts[3:]]
                elif parts[0] == "unhold":
                    for ip in believed.pop(parts[2], ()):
                        events.append(("unhold", float(parts[1]), ip, parts[2]))
    assert len(events) > 50, "the children allocated too little for the test to mean anything"
    assert overlaps(events) == []

    actual = by_handle(etcd)
    for handle, ips in believed.items():
        assert actual.get(handle) == ips, handle  # what a process was given is still its own
    wep_handles = ipam.wep_handles()
    report = ipam.check(pending_grace=0)
    assert report["handle_mismatches"] == []
    leaked = {x["handle"] for x in report["leaked_allocations"]}
    assert leaked == set(actual) - wep_handles
    assert all(x["reasons"] == ["no-workloadendpoint"] for x in report["leaked_allocations"])
    assert len(leaked) <= killed
    assert len(report["stale_pending"]) <= killed
    assert report["orphan_blocks"] == [] and report["orphan_affinities"] == []

    # the operator's way: tortiectl ipam check -o FILE; tortiectl ipam release --from-report FILE
    flags = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd.config.prefix, "ipam"]
    path = str(tmp_path / "report.json")
    assert main([*flags, "check", "--pending-grace", "0", "-o", path], out=io.StringIO()) == 0
    out = io.StringIO()
    assert main([*flags, "release", "--from-report", path], out=out) == 0
    released = {m[1] for m in re.finditer(r"^released ([0-9a-f.:]+)$", out.getvalue(), re.M)}
    assert released == {ip for h in leaked for ip in actual[h]}
    after = ipam.check(pending_grace=0)
    assert after["clean"], after
    assert set(by_handle(etcd)) == set(actual) - leaked
