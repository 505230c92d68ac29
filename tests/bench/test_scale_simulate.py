"""bench/scale/simulate.py at a tiny N, so the simulator cannot rot: a private etcd, five
stand-ins in two worker processes, every phase, and nothing left behind."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 5


@pytest.fixture(scope="module")
def result():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "scale", "simulate.py"), "--nodes", str(N),
                        "--workers", "2", "--concurrent", "4", "--idle", "1", "--json"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    (out,) = json.loads(r.stdout)
    return out


def test_etcd_sees_one_watch_stream_and_connection_per_standin(result):
    # the agent's syncer watches two prefixes on one stream: 2N watchers, N streams
    assert result["watch_streams"] == N
    assert result["watchers"] == 2 * N
    # each stand-in on a TCP connection of its own, plus the parent's and etcd's listeners
    # (counted before the claimers connect)
    assert N <= result["etcd_sockets"] <= N + 6


def test_every_claim_reaches_every_other_standin(result):
    c = result["claims"]
    assert c["claim_errors"] == 0 and c["solo_claims"] + c["claims"] == N
    assert c["fanout_deliveries"] == c["fanout_expected"] == N * (N - 1)
    assert c["fanout_short_at_end"] == 0
    assert 0 < c["fanout_min_ms"] <= c["fanout_p50_ms"] <= c["fanout_max_ms"]
    # the real IPAM: context reads, the block list, claim, confirm, allocation
    assert c["rpcs_per_claim"] >= 5
    assert result["standins"]["unknown"] == 0


def test_etcd_figures_and_limits(result):
    e = result["etcd"]
    assert e["rss_peak_mb"] > 1 and e["db_mb"] > 0 and e["quota_mb"] == 2147
    assert e["keys"] >= 3 * N  # a Node, a block and an affinity per stand-in (and a handle)
    # etcd's CPU from /proc ticks (10 ms): a phase of 5 stand-ins may take less than one tick
    cpu = [result[phase]["etcd_cpu_pct"] for phase in ("start", "idle", "claims")]
    assert all(c >= 0 for c in cpu) and any(c > 0 for c in cpu), cpu
    # mesh: each status document lists the N-1 other nodes
    assert result["standins"]["peers_median"] == result["standins"]["peers_max"] == N - 1
    assert result["limits"]["request_ok"] and result["limits"]["db_ok"]
    assert result["result"] == "PASS"


def test_nothing_left_behind(result):
    assert result["cleaned_up"]
    assert not os.path.exists(result["etcd_data_dir"])
