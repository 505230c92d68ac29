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
import ipaddress
import multiprocessing
import os
import random
import re
import signal
import time

import pytest
from ipam_helpers import by_handle, crash_child, die_at, make_node, make_pool, overlaps

from tortie.ctl.main import main
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore
from tortie.errors import PoolExhausted

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


def _die(etcd_server, etcd, node: str, point: str) -> None:
    p = multiprocessing.get_context("spawn").Process(
        target=die_at, args=(etcd_server.endpoint, etcd.config.prefix, node, point))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def test_sigkill_at_chosen_points(etcd, etcd_server):
    store = ResourceStore(etcd)
    ipam = IPAM(etcd)
    make_pool(store, "v4", "10.61.0.0/28", blockSize=31)
    make_node(store, "n1")
    make_node(store, "n2")

    # killed between the two steps of a block claim: a pending block nobody uses
    _die(etcd_server, etcd, "n1", "claim")
    [pending] = ipam.all_blocks()
    assert pending.node == "n1" and not pending.confirmed and pending.allocated == 0
    for i in range(7):  # n2 fills the other seven blocks and cannot touch the pending one
        ipam.auto_assign(f"net.n2-{i}", "n2", num_v4=2)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.n2-more", "n2")
    report = ipam.check(wep_handles=set(by_handle(etcd)), pending_grace=0)
    assert [x["block"] for x in report["stale_pending"]] == [pending.cidr]
    assert ipam.check(wep_handles=set(by_handle(etcd)))["clean"]  # young: maybe still in progress
    # n1's next allocation finishes its own claim and uses it
    ip = ipam.auto_assign("net.n1", "n1")[0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(pending.cidr)
    for handle in list(by_handle(etcd)):
        ipam.release_handle(handle)
    assert ipam.all_blocks() == []

    # killed after its allocation was written: a leak that check reports and release frees
    _die(etcd_server, etcd, "n1", "allocated")
    report = ipam.check(pending_grace=0)
    assert [x["handle"] for x in report["leaked_allocations"]] == ["net.allocated"]
    assert report["handle_mismatches"] == [] and report["stale_pending"] == []
    ipam.release_from_report(report)
    assert ipam.check(pending_grace=0)["clean"] and by_handle(etcd) == {}

    # killed half way through releasing a handle that spans two blocks: the handle record
    # still names exactly what is left, and releasing again finishes the job
    _die(etcd_server, etcd, "n1", "release")
    left = by_handle(etcd)["net.release"]
    assert 0 < len(left) < 3
    report = ipam.check(pending_grace=0)
    assert report["handle_mismatches"] == []
    assert set(ipam.ips_by_handle("net.release")) == left
    assert set(ipam.release_handle("net.release")) == left
    assert ipam.check(pending_grace=0)["clean"] and ipam.all_blocks() == []
