"""IPAM against real etcd: pools, blocks, affinities, borrowing, handles, check/release."""

from __future__ import annotations

import ipaddress
import json
import threading
import time

import pytest
from ipam_helpers import by_handle, handle_for, held, make_node, make_pool, make_wep

from tortie.datastore.etcd import EtcdClient, Txn
from tortie.datastore.ipam import IPAM
from tortie.datastore.ipam_blocks import PENDING, Block, affinity_value
from tortie.datastore.keys import IPAM_AFFINITY as AFFINITY
from tortie.datastore.keys import IPAM_BLOCKS as BLOCKS
from tortie.datastore.keys import cidr_part
from tortie.datastore.store import ResourceStore
from tortie.errors import AlreadyExists, IPAMError, PoolExhausted, ValidationError


@pytest.fixture
def store(etcd):
    return ResourceStore(etcd)


@pytest.fixture
def ipam(etcd):
    return IPAM(etcd)


def in_net(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def test_v4_and_v6_from_default_block_sizes(ipam, store, etcd):
    make_pool(store, "v4", "10.20.0.0/16")
    make_pool(store, "v6", "fd00:20::/64")
    make_node(store, "n1")
    ips = ipam.auto_assign("net.c1", "n1", num_v4=2, num_v6=1, attrs={"namespace": "ns", "pod": "p"})
    assert len(ips) == 3
    v4 = [ip for ip in ips if ":" not in ip]
    v6 = [ip for ip in ips if ":" in ip]
    assert len(v4) == 2 and len(v6) == 1
    blocks = ipam.node_blocks("n1")
    assert sorted(ipaddress.ip_network(b.cidr).prefixlen for b in blocks) == [26, 122]
    assert all(b.confirmed and b.node == "n1" for b in blocks)
    assert {b.allocated for b in blocks} == {2, 1}
    assert sorted(ipam.ips_by_handle("net.c1")) == sorted(ips)
    assert held(etcd) == {ip: "net.c1" for ip in ips}
    raw = json.loads(etcd.get(etcd.config.prefix + BLOCKS + cidr_part(blocks[0].cidr)).value)
    assert raw["attributes"] == [{"handle": "net.c1", "namespace": "ns", "pod": "p", "node": "n1"}]


def test_release_handle_frees_everything_and_gives_back_empty_blocks(ipam, store, etcd):
    make_pool(store, "v4", "10.21.0.0/24", blockSize=28)
    make_pool(store, "v6", "fd00:21::/120", blockSize=124)
    a = ipam.auto_assign("net.a", "n1", num_v4=3, num_v6=2)
    b = ipam.auto_assign("net.b", "n1", num_v4=1)
    assert not set(a) & set(b)
    assert sorted(ipam.release_handle("net.a")) == sorted(a)
    assert ipam.ips_by_handle("net.a") == []
    assert ipam.release_handle("net.a") == []
    assert held(etcd) == {b[0]: "net.b"}
    # the v6 block became empty: it and its affinity are gone; the v4 block still holds b
    assert [x.cidr for x in ipam.node_blocks("n1")] == [str(ipaddress.ip_network(f"{b[0]}/28", strict=False))]
    affs, _ = etcd.get_prefix(etcd.config.prefix + AFFINITY)
    assert len(affs) == 1
    ipam.release_handle("net.b")
    assert ipam.all_blocks() == []
    assert etcd.get_prefix(etcd.config.prefix + "ipam/")[0] == []


def test_release_ips_frees_only_those(ipam, store, etcd):
    make_pool(store, "v4", "10.22.0.0/24", blockSize=28)
    a = ipam.auto_assign("net.a", "n1", num_v4=3)
    assert ipam.release_ips([a[1], "10.22.0.250", "192.0.2.1"]) == [a[1]]
    assert sorted(ipam.ips_by_handle("net.a")) == sorted([a[0], a[2]])
    assert ipam.release_ips([a[1]]) == []
    with pytest.raises(ValidationError):
        ipam.release_ips(["not-an-ip"])


def test_handles_persist_across_instances_and_cache_goes_stale_safely(etcd, store):
    make_pool(store, "v4", "10.23.0.0/24", blockSize=28)
    one, two = IPAM(etcd), IPAM(etcd)
    a = one.auto_assign("net.a", "n1", num_v4=2)
    b = two.auto_assign("net.a", "n1", num_v4=1)  # same handle and node from another process
    assert two.release_handle("net.a") and held(etcd) == {}
    c = one.auto_assign("net.c", "n1")  # one's cached block and handle are stale now
    assert len(set(a + b)) == 3 and held(etcd) == {c[0]: "net.c"}


def test_disabled_pool_gives_no_new_addresses(etcd, store, ipam):
    make_pool(store, "v4", "10.24.0.0/24", blockSize=28)
    ipam.auto_assign("net.a", "n1")
    pool = store.get("IPPool", "v4")
    pool["spec"]["disabled"] = True
    store.apply(pool)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.b", "n1")  # even from the block this instance has cached
    with pytest.raises(ValidationError):
        ipam.assign_ip("10.24.0.200", "net.c", "n1")
    assert by_handle(etcd).keys() == {"net.a"}
    make_pool(store, "v4b", "10.25.0.0/24", blockSize=28)
    assert in_net(ipam.auto_assign("net.b", "n1")[0], "10.25.0.0/24")


def test_node_selector_picks_pools(etcd, store, ipam):
    make_pool(store, "zone-a", "10.26.0.0/24", blockSize=28, nodeSelector="zone == 'a'")
    make_pool(store, "zone-b", "10.27.0.0/24", blockSize=28, nodeSelector="zone in {'b', 'c'}")
    make_node(store, "na", {"zone": "a"})
    make_node(store, "nb", {"zone": "c"})
    make_node(store, "nx", {"other": "x"})
    assert in_net(ipam.auto_assign("net.a", "na")[0], "10.26.0.0/24")
    assert in_net(ipam.auto_assign("net.b", "nb")[0], "10.27.0.0/24")
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.x", "nx")
    # an explicitly requested pool overrides its nodeSelector (as in Calico)
    assert in_net(ipam.auto_assign("net.x", "nx", pools=["zone-b"])[0], "10.27.0.0/24")
    # relabelling the node moves it to the other pool, through this instance's cache
    make_node(store, "na", {"zone": "b"})
    assert in_net(ipam.auto_assign("net.a2", "na")[0], "10.27.0.0/24")


def test_requested_pool_by_cidr_and_family(ipam, store):
    make_pool(store, "p1", "10.28.0.0/24", blockSize=28)
    make_pool(store, "p2", "10.29.0.0/24", blockSize=28)
    assert in_net(ipam.auto_assign("net.a", "n1", pools=["10.29.0.0/24"])[0], "10.29.0.0/24")
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.b", "n1", num_v4=0, num_v6=1)  # no IPv6 pool


def test_max_blocks_per_host_then_borrow_then_strict(etcd, store, ipam):
    make_pool(store, "v4", "10.30.0.0/29", blockSize=30)  # two blocks of four
    ipam.configure(max_blocks_per_host=1)
    a = ipam.auto_assign("net.a", "n1", num_v4=4)
    b = ipam.auto_assign("net.b", "n2", num_v4=1)
    own_n1 = ipam.node_blocks("n1")[0].cidr
    own_n2 = ipam.node_blocks("n2")[0].cidr
    assert all(in_net(ip, own_n1) for ip in a) and in_net(b[0], own_n2)
    # n1 may claim no second block: it borrows from n2's block
    c = ipam.auto_assign("net.c", "n1", num_v4=2)
    assert all(in_net(ip, own_n2) for ip in c)
    assert sorted(ipam.borrowed_ips("n1")) == sorted(c)
    assert ipam.borrowed_ips("n2") == []
    assert len(ipam.node_blocks("n1")) == 1
    ipam.release_handle("net.c")
    ipam.configure(strict_affinity=True)
    with pytest.raises(PoolExhausted, match="strictAffinity"):
        ipam.auto_assign("net.d", "n1")
    assert "net.d" not in by_handle(etcd)
    with pytest.raises(IPAMError, match="strictAffinity"):
        ipam.assign_ip(str(ipaddress.ip_network(own_n2)[3]), "net.d", "n1")


def test_pool_exhausted_rolls_back_the_other_family(etcd, store, ipam):
    make_pool(store, "v4", "10.31.0.0/30", blockSize=30)
    make_pool(store, "v6", "fd00:31::/126", blockSize=126)
    ipam.auto_assign("net.a", "n1", num_v4=0, num_v6=4)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.b", "n1", num_v4=1, num_v6=1)
    assert ipam.ips_by_handle("net.b") == []
    assert set(by_handle(etcd)) == {"net.a"}


def test_assign_specific_ip(etcd, store, ipam):
    make_pool(store, "v4", "10.32.0.0/24", blockSize=28)
    make_pool(store, "v6", "fd00:32::/120", blockSize=124)
    assert ipam.assign_ip("10.32.0.77", "net.a", "n1", {"pod": "p"}) == "10.32.0.77"
    assert ipam.assign_ip("fd00:32::0005", "net.a", "n1") == "fd00:32::5"
    assert [b.cidr for b in ipam.node_blocks("n1")] == ["10.32.0.64/28", "fd00:32::/124"]
    with pytest.raises(AlreadyExists):
        ipam.assign_ip("10.32.0.77", "net.b", "n2")
    with pytest.raises(ValidationError):
        ipam.assign_ip("10.33.0.1", "net.b", "n1")
    with pytest.raises(ValidationError):
        ipam.assign_ip("nonsense", "net.b", "n1")
    # another node may take an address in n1's block (a borrow) unless strict
    assert ipam.assign_ip("10.32.0.78", "net.b", "n2") == "10.32.0.78"
    assert ipam.borrowed_ips("n2") == ["10.32.0.78"]
    # auto-assign on n1 skips what is taken
    got = ipam.auto_assign("net.c", "n1", pools=["v4"])
    assert got[0] not in ("10.32.0.77", "10.32.0.78")
    assert sorted(ipam.ips_by_handle("net.a")) == ["10.32.0.77", "fd00:32::5"]


def test_bad_arguments(ipam, store):
    make_pool(store, "v4", "10.34.0.0/24")
    for handle in ("", "a/b", " x"):
        with pytest.raises(ValidationError):
            ipam.auto_assign(handle, "n1")
    with pytest.raises(ValidationError):
        ipam.auto_assign("net.a", "")
    with pytest.raises(ValidationError):
        ipam.configure(max_blocks_per_host=-1)


def test_pending_claim_is_never_used_and_is_adopted_or_reported(etcd, store, ipam):
    make_pool(store, "v4", "10.35.0.0/29", blockSize=30)
    make_node(store, "n1")
    make_node(store, "n2")
    p = etcd.config.prefix
    # a claim of n1 that died after its first step, a moment ago
    stale = Block.new("10.35.0.0/30", "v4", "n1", now=time.time())
    etcd.transaction(Txn().put(p + BLOCKS + "10.35.0.0-30", stale.to_json())
                     .put(p + AFFINITY + "n1/10.35.0.0-30", affinity_value(PENDING)))
    assert ipam.node_blocks("n1")[0].confirmed is False
    # n2 takes the other block, and may not borrow from the pending one
    got = ipam.auto_assign("net.x", "n2", num_v4=4)
    assert all(in_net(ip, "10.35.0.4/30") for ip in got)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.y", "n2")
    report = ipam.check(wep_handles={"net.x"}, pending_grace=0)
    assert [x["block"] for x in report["stale_pending"]] == ["10.35.0.0/30"]
    assert not report["clean"]
    assert ipam.check(wep_handles={"net.x"})["clean"]  # within the grace period it is a claim in progress
    # n1's next claim adopts (confirms) its own pending block
    assert in_net(ipam.auto_assign("net.z", "n1")[0], "10.35.0.0/30")
    assert ipam.node_blocks("n1")[0].confirmed


def test_own_pending_claim_is_finished_even_at_the_block_limit(etcd, store, ipam):
    make_pool(store, "v4", "10.41.0.0/29", blockSize=30)
    ipam.configure(max_blocks_per_host=1)
    p = etcd.config.prefix
    stale = Block.new("10.41.0.4/30", "v4", "n1", now=0.0)
    etcd.transaction(Txn().put(p + BLOCKS + "10.41.0.4-30", stale.to_json())
                     .put(p + AFFINITY + "n1/10.41.0.4-30", affinity_value(PENDING)))
    assert in_net(ipam.auto_assign("net.a", "n1")[0], "10.41.0.4/30")
    assert [(b.cidr, b.confirmed) for b in ipam.node_blocks("n1")] == [("10.41.0.4/30", True)]


def test_no_auto_allocated_blocks(etcd, store, ipam):
    make_pool(store, "v4", "10.42.0.0/29", blockSize=30)
    etcd.put(etcd.config.prefix + "resources/ipamconfig/default", json.dumps(
        {"apiVersion": "tortie.io/v1", "kind": "IPAMConfig", "metadata": {"name": "default"},
         "spec": {"autoAllocateBlocks": False}}).encode())
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.a", "n1")
    ipam.assign_ip("10.42.0.1", "net.b", "n2")  # claims its block for n2
    assert in_net(ipam.auto_assign("net.a", "n1")[0], "10.42.0.0/30")  # borrowed
    assert ipam.borrowed_ips("n1") and len(ipam.all_blocks()) == 1


def test_stale_pending_released_from_report(etcd, store, ipam):
    make_pool(store, "v4", "10.36.0.0/29", blockSize=30)
    make_node(store, "n1")
    p = etcd.config.prefix
    stale = Block.new("10.36.0.4/30", "v4", "n1", now=0.0)
    etcd.transaction(Txn().put(p + BLOCKS + "10.36.0.4-30", stale.to_json())
                     .put(p + AFFINITY + "n1/10.36.0.4-30", affinity_value(PENDING)))
    out = ipam.release_from_report(ipam.check(wep_handles=set(), pending_grace=0))
    assert out["removed_pending"] == ["10.36.0.4/30"]
    assert ipam.all_blocks() == [] and ipam.check(wep_handles=set(), pending_grace=0)["clean"]


def test_release_node(etcd, store, ipam):
    make_pool(store, "v4", "10.37.0.0/28", blockSize=30)
    a = ipam.auto_assign("net.a", "n1", num_v4=5)  # one full block and one with one address
    used = {x.cidr for x in ipam.node_blocks("n1")}
    assert len(used) == 2
    # a third block claimed but not used yet (confirmed and empty)
    p = etcd.config.prefix
    free = next(c for c in ("10.37.0.0/30", "10.37.0.4/30", "10.37.0.8/30", "10.37.0.12/30") if c not in used)
    empty = Block.new(free, "v4", "n1", now=time.time()).confirm()
    etcd.transaction(Txn().put(p + BLOCKS + cidr_part(free), empty.to_json())
                     .put(p + AFFINITY + "n1/" + cidr_part(free), affinity_value("confirmed")))
    assert len(ipam.node_blocks("n1")) == 3
    out = ipam.release_node("n1")
    assert out["deleted_blocks"] == [free] and sorted(out["unaffined_blocks"]) == sorted(used)
    assert ipam.node_blocks("n1") == []
    assert etcd.get_prefix(p + AFFINITY)[0] == []
    assert all(x.node is None for x in ipam.all_blocks())
    assert sorted(held(etcd)) == sorted(a)
    # the unaffined blocks are given back once empty
    ipam.release_handle("net.a")
    assert ipam.all_blocks() == []


def test_check_and_release_leaks(etcd, store, ipam):
    make_pool(store, "v4", "10.38.0.0/24", blockSize=28)
    make_node(store, "n1")
    make_node(store, "gone")
    make_wep(store, "n1", "c1")
    ok = ipam.auto_assign(handle_for("c1"), "n1")
    leak = ipam.auto_assign(handle_for("c2"), "n1")  # no WorkloadEndpoint
    dead = ipam.auto_assign(handle_for("c3"), "gone")
    make_wep(store, "gone", "c3")
    store.delete("Node", "gone")
    report = ipam.check()
    assert not report["clean"]
    leaked = {x["ip"]: x for x in report["leaked_allocations"]}
    assert set(leaked) == {leak[0], dead[0]}
    assert leaked[leak[0]]["reasons"] == ["no-workloadendpoint"]
    assert leaked[dead[0]]["reasons"] == ["node-gone"]
    assert {x["node"] for x in report["orphan_blocks"]} == {"gone"}
    assert {x["node"] for x in report["orphan_affinities"]} == {"gone"}
    assert report["handle_mismatches"] == []
    json.dumps(report)  # it is saved as a file by the CLI
    out = ipam.release_from_report(report)
    # c3's endpoint still names its handle: kept until the endpoint goes (`delete node` does that)
    assert out["released_ips"] == leak and out["released_nodes"] == ["gone"]
    assert held(etcd) == {ok[0]: handle_for("c1"), dead[0]: handle_for("c3")}
    store.delete("WorkloadEndpoint", "pod-c3", "default")
    assert ipam.release_from_report(report)["released_ips"] == dead
    assert held(etcd) == {ok[0]: handle_for("c1")}
    assert ipam.check()["clean"]


def test_old_report_never_frees_a_reallocated_address(etcd, store, ipam):
    make_pool(store, "v4", "10.39.0.0/24", blockSize=28)
    make_node(store, "n1")
    leak = ipam.auto_assign("net.leak", "n1", num_v4=2)
    report = ipam.check()
    assert len(report["leaked_allocations"]) == 2
    ipam.release_ips([leak[0]])
    again = ipam.assign_ip(leak[0], handle_for("new"), "n1")
    make_wep(store, "n1", "new")
    out = ipam.release_from_report(report)
    assert out["released_ips"] == [leak[1]]
    assert held(etcd) == {again: handle_for("new")}


def test_report_item_whose_endpoint_appeared_since_is_kept(etcd, store, ipam):
    make_pool(store, "v4", "10.45.0.0/24", blockSize=28)
    make_node(store, "n1")
    ips = ipam.auto_assign(handle_for("slow"), "n1")  # CNI ADD: allocated, endpoint not written yet
    report = ipam.check()
    assert [x["ip"] for x in report["leaked_allocations"]] == ips
    make_wep(store, "n1", "slow")
    assert ipam.release_from_report(report)["released_ips"] == []
    assert held(etcd) == {ips[0]: handle_for("slow")}


class _EndpointWrittenBeforeCommit(EtcdClient):
    """The race of a CNI ADD with `ipam release`: the pod's endpoint is written after
    the release read everything, just before its transaction commits."""

    def __init__(self, config, write) -> None:
        super().__init__(config)
        self.write = write

    def transaction(self, txn):
        write, self.write = self.write, None
        if write is not None:
            write()
        return super().transaction(txn)


def test_endpoint_written_during_release_keeps_the_address(etcd, etcd_config, store):
    make_pool(store, "v4", "10.46.0.0/24", blockSize=28)
    make_node(store, "n1")
    ips = IPAM(etcd).auto_assign("blue-net.racer", "n1")
    report = IPAM(etcd).check()
    assert [x["ip"] for x in report["leaked_allocations"]] == ips

    def cni_add_writes_endpoint() -> None:
        store.create({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                      "metadata": {"name": "racer", "namespace": "default"},
                      "spec": {"node": "n1", "containerID": "racer", "ipamHandle": "blue-net.racer"}})

    with _EndpointWrittenBeforeCommit(etcd_config, cni_add_writes_endpoint) as client:
        assert IPAM(client).release_from_report(report)["released_ips"] == []
    assert held(etcd) == {ips[0]: "blue-net.racer"}


def test_wep_ipam_handle_field_and_usage(etcd, store, ipam):
    make_pool(store, "v4", "10.40.0.0/24", blockSize=28)
    make_pool(store, "v6", "fd00:40::/64")
    make_node(store, "n1")
    ipam.auto_assign("custom-handle", "n1", num_v4=3, num_v6=1)
    key = etcd.config.prefix + "resources/workloadendpoint/default/p1"
    etcd.put(key, json.dumps({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                              "metadata": {"name": "p1", "namespace": "default"},
                              "spec": {"node": "n1", "ipamHandle": "custom-handle"}}).encode())
    assert ipam.check()["clean"]
    use = ipam.usage()
    pools = {p["name"]: p for p in use["pools"]}
    assert (pools["v4"]["total"], pools["v4"]["in_use"], pools["v4"]["free"]) == (256, 3, 253)
    assert pools["v6"]["total"] == 2 ** 64 and pools["v6"]["in_use"] == 1
    assert [(b["total"], b["in_use"], b["free"]) for b in use["blocks"]] == [(16, 3, 13), (64, 1, 63)]


def test_configure_persists(etcd, ipam, store):
    assert ipam.config().strict_affinity is False
    ipam.configure(strict_affinity=True, max_blocks_per_host=3)
    cfg = IPAM(etcd).config()
    assert (cfg.strict_affinity, cfg.max_blocks_per_host) == (True, 3)
    ipam.configure(max_blocks_per_host=0)
    res = store.get("IPAMConfig", "default")["spec"]
    assert res["strictAffinity"] is True and res["maxBlocksPerHost"] == 0


def test_threads_and_instances_racing_on_one_node(etcd, store):
    make_pool(store, "v4", "10.43.0.0/26", blockSize=29)  # 64 addresses, 8 blocks
    instances = [IPAM(etcd), IPAM(etcd)]  # two processes' worth of caches, each shared by threads
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(8):
                handle = f"net.t{t}-{i}"
                got[handle] = instances[t % 2].auto_assign(handle, f"n{t % 3}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ips = [ip for v in got.values() for ip in v]
    assert len(ips) == 64 and len(set(ips)) == 64  # the pool exactly filled, nothing twice
    assert by_handle(etcd) == {h: set(v) for h, v in got.items()}
    with pytest.raises(PoolExhausted):
        instances[0].auto_assign("net.more", "n0")
    for n in ("n0", "n1", "n2"):
        make_node(store, n)
    assert IPAM(etcd).check(wep_handles=set(got), pending_grace=0)["clean"]


def test_blocks_left_by_an_earlier_pool_are_not_overlapped(etcd, store, ipam):
    make_pool(store, "old", "10.44.0.0/28", blockSize=29)
    kept = ipam.auto_assign("net.kept", "n1")  # one /29 stays after its pool goes
    store.delete("IPPool", "old")
    make_pool(store, "new", "10.44.0.0/28", blockSize=30)
    got = ipam.auto_assign("net.new", "n2", num_v4=4)
    old_block = ipaddress.ip_network(f"{kept[0]}/29", strict=False)
    assert not any(ipaddress.ip_address(ip) in old_block for ip in got)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("net.more", "n2", num_v4=5)
    # a specific address inside the old block comes from that block, not from a new overlapping one
    spare = next(str(ip) for ip in old_block if str(ip) != kept[0])
    assert ipam.assign_ip(spare, "net.spare", "n1") == spare
    assert sum(1 for b in ipam.all_blocks() if ipaddress.ip_network(b.cidr).overlaps(old_block)) == 1
