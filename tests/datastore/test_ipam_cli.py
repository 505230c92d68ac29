"""`tortiectl ipam ...` against real etcd: show, check, release, configure, and errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from ipam_helpers import held, make_node, make_pool, make_wep

from tortie.ctl.main import main
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore


class Run:
    def __init__(self, config) -> None:
        self.flags = ["--etcd-endpoints", ",".join(config.endpoints), "--etcd-prefix", config.prefix]

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = main([*self.flags, "ipam", *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> str:
        rc, out, err = self(*argv)
        assert rc == 0, err
        return out


@pytest.fixture
def run(etcd_config):
    return Run(etcd_config)


@pytest.fixture
def setup(etcd):
    store = ResourceStore(etcd)
    make_pool(store, "v4", "10.70.0.0/24", blockSize=28)
    make_pool(store, "v6", "fd00:70::/64")
    make_node(store, "n1")
    ipam = IPAM(etcd)
    make_wep(store, "n1", "c1")
    ipam.auto_assign("k8s-pod-network.c1", "n1", num_v4=3, num_v6=1)
    ipam.auto_assign("k8s-pod-network.c2", "n1", num_v4=1)  # no endpoint: a leak
    return ipam


def snapshot(etcd) -> dict:
    kvs, _ = etcd.get_prefix(etcd.config.prefix)
    return {kv.key: kv.value for kv in kvs}


def test_show_json_counts_are_numbers(run, setup):
    doc = json.loads(run.ok("show", "-o", "json"))
    assert "blocks" not in doc
    v4, v6 = doc["pools"]
    assert (v4["name"], v4["total"], v4["in_use"], v4["free"], v4["blocks"]) == ("v4", 256, 4, 252, 1)
    assert (v6["total"], v6["in_use"], v6["free"]) == (2 ** 64, 1, 2 ** 64 - 1)
    doc = json.loads(run.ok("show", "--show-blocks", "-o", "json"))
    assert [(b["total"], b["in_use"], b["free"], b["node"], b["state"]) for b in doc["blocks"]] == [
        (16, 4, 12, "n1", "confirmed"), (64, 1, 63, "n1", "confirmed")]
    text = run.ok("show", "--show-blocks")
    assert "POOL" in text and "10.70.0.0/24" in text and "BLOCK" in text and "n1" in text


def test_check_report_and_release_from_it(run, setup, etcd, tmp_path):
    path = tmp_path / "report.json"
    out = run.ok("check", "-o", str(path))
    assert "leaked address" in out and "k8s-pod-network.c2" in out
    report = json.loads(path.read_text())
    assert [x["handle"] for x in report["leaked_allocations"]] == ["k8s-pod-network.c2"]
    out = run.ok("release", "--from-report", str(path))
    assert out.startswith("released 10.70.0.")
    assert set(held(etcd).values()) == {"k8s-pod-network.c1"}
    assert "No leaks found." in run.ok("check")
    assert "Nothing to release" in run.ok("release", "--from-report", str(path))


def test_release_ip(run, setup, etcd):
    ip = setup.ips_by_handle("k8s-pod-network.c2")[0]
    assert run.ok("release", "--ip", ip) == f"released {ip}\n"
    assert ip not in held(etcd)


def test_configure(run, etcd):
    assert run.ok("configure", "--strict-affinity", "true", "--max-blocks-per-host", "4") == \
        "strictAffinity: true, maxBlocksPerHost: 4\n"
    cfg = IPAM(etcd).config()
    assert cfg.strict_affinity and cfg.max_blocks_per_host == 4
    run.ok("configure", "--max-blocks-per-host", "0")
    assert IPAM(etcd).config().strict_affinity is True


@pytest.mark.parametrize("argv, rc", [
    (("release", "--ip", "10.70.0.200"), 3),  # not allocated
    (("release", "--ip", "10.70.0.1", "--ip", "10.70.0.200"), 3),  # one of them is not: nothing released
    (("release", "--ip", "bogus"), 2),
    (("release", "--from-report", "/nonexistent/report.json"), 2),
    (("configure",), 2),
    (("configure", "--strict-affinity", "maybe"), 2),
    (("configure", "--strict-affinity", "true", "--max-blocks-per-host", "-3"), 2),
    (("configure", "--max-blocks-per-host", "many"), 2),
    (("check", "--pending-grace", "-1"), 2),
    (("check", "--pending-grace", "soon"), 2),
    (("check", "-o", "/nonexistent/dir/report.json"), 2),
])
def test_errors_are_one_line_and_change_nothing(run, setup, etcd, argv, rc):
    before = snapshot(etcd)
    code, _, err = run(*argv)
    assert code == rc
    assert len(err.strip().splitlines()) == 1 and err.startswith("tortiectl: ") and "Traceback" not in err
    assert snapshot(etcd) == before


@pytest.mark.parametrize("content", ["not json", '{"some": "thing"}', '{"leaked_allocations": [{"ip": 1}]}',
                                     '{"leaked_allocations": [{"ip": "x", "block": "b", "handle": "h"}]}'])
def test_bad_report_files(run, setup, etcd, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    before = snapshot(etcd)
    code, _, err = run("release", "--from-report", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(etcd) == before


def test_real_executable_unreachable_etcd():
    exe = os.path.join(os.path.dirname(sys.executable), "tortiectl")
    r = subprocess.run([exe, "--etcd-endpoints", "http://127.0.0.1:9", "--timeout", "1", "ipam", "show"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 6
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
