"""Property test: random allocate/release interleavings from concurrent OS processes.

Five spawned processes act as four nodes, allocating, asking for specific addresses
and releasing by handle or by address (two of them share node n0, so one node's
blocks are also contended). Hypothesis draws each process's plan, the IPAM config
and the pool shapes; small pools force block claims, exhaustion and borrowing. After
each run: no address was ever held by two handles at once (from the processes'
timed logs), etcd holds exactly what the processes believe they hold, every handle
finds its addresses, the handle records match the blocks, and once everything is
released `check` is clean and no block is left.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ipam_helpers import by_handle, make_node, make_pool, overlaps, run_plan

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore

NODES = ("n0", "n1", "n2", "n3", "n0")  # process i acts as NODES[i]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers():
    with multiprocessing.get_context("spawn").Pool(len(NODES)) as pool:
        pool.map(time.sleep, [0] * len(NODES))  # warm up: every worker has started
        yield pool


ops = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 4), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("release_handle"), st.integers(0, 4), st.just(0), st.just(0)),
    st.tuples(st.just("release_ip"), st.integers(0, 4), st.just(0), st.just(0)),
    st.tuples(st.just("assign"), st.integers(0, 4),
              st.one_of(st.integers(0, 31).map(lambda i: f"10.50.0.{i}"),
                        st.integers(0, 31).map(lambda i: f"fd00:50::{i:x}")), st.just(0)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    plans=st.lists(st.lists(ops, min_size=5, max_size=40), min_size=len(NODES), max_size=len(NODES)),
    strict=st.booleans(),
    max_blocks=st.sampled_from([0, 1, 2]),
    v4_block=st.sampled_from([29, 30]),
)
def test_concurrent_allocate_release(etcd_server, workers, plans, strict, max_blocks, v4_block):
    prefix = f"/prop-{uuid.uuid4().hex[:10]}/"
    client = EtcdClient(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix))
    try:
        store = ResourceStore(client)
        ipam = IPAM(client)
        make_pool(store, "v4", "10.50.0.0/27", blockSize=v4_block)
        make_pool(store, "v6", "fd00:50::/123", blockSize=125)
        for node in set(NODES):
            make_node(store, node)
        ipam.configure(strict_affinity=strict, max_blocks_per_host=max_blocks)

        start = time.time() + 0.2
        args = [(etcd_server.endpoint, prefix, node, f"w{i}", plan, start)
                for i, (node, plan) in enumerate(zip(NODES, plans, strict=True))]
        results = workers.starmap(run_plan, args, chunksize=1)

        errors = [e for r in results for e in r["errors"]]
        assert errors == []
        assert overlaps([e for r in results for e in r["events"]]) == []
        believed = {h: set(ips) for r in results for h, ips in r["live"].items()}
        actual = by_handle(client)
        assert actual == believed
        for handle, ips in believed.items():
            assert set(ipam.ips_by_handle(handle)) == ips
        report = ipam.check(wep_handles=set(believed), pending_grace=0)
        assert report["clean"], report
        # every node's confirmed blocks are its own, and none is left pending
        assert all(b.confirmed for b in ipam.all_blocks())

        for handle in believed:
            ipam.release_handle(handle)
        assert by_handle(client) == {}
        assert ipam.check(wep_handles=set(), pending_grace=0)["clean"]
        assert ipam.all_blocks() == []
    finally:
        client.delete_prefix(prefix)
        client.close()
