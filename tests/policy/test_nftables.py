"""The nftables adapter: the NEWGEN parser (pure), the monitor telling our commits from
foreign ones (real kernel, a test namespace), NftTable's transactions (pure, then real)."""

import struct
import threading
import time

from nfthelpers import list_table, nft

from tortie.dataplane import Manager
from tortie.policy.filter_mgr import FilterManager
from tortie.policy.nat_mgr import NatManager
from tortie.policy.nftables import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_NEWGEN,
    Base,
    Chain,
    Nft,
    NftMonitor,
    NftTable,
    Obj,
    parse_newgen,
    rule_tag,
)


def nla(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(mtype: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def newgen(gen: int, pid: int, name: bytes) -> bytes:
    return nlmsg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, b"\0\0\0\0" + nla(1, struct.pack(">I", gen))
                 + nla(2, struct.pack(">I", pid)) + nla(3, name + b"\0"))


def test_parse_newgen_skips_other_messages():
    other = nlmsg((NFNL_SUBSYS_NFTABLES << 8) | 0, b"\0\0\0\0" + nla(1, b"tortie-filter\0"))
    buf = other + newgen(7, 4242, b"nft") + other + newgen(8, 1, b"tortie-agent")
    assert parse_newgen(buf) == [(7, 4242, "nft", 0), (8, 1, "tortie-agent", 0)]
    assert parse_newgen(b"") == [] and parse_newgen(b"\0" * 8) == []


def test_managers_follow_the_protocol_and_ignore_other_messages():
    for mgr in (FilterManager(), NatManager()):
        assert isinstance(mgr, Manager)
        mgr.on_update(object())  # not theirs: ignored (no kernel touched before apply)
        assert mgr.dirty  # never applied: the first apply reads the kernel


def test_table_script_orders_declarations_before_use_and_references_before_deletion():
    t = NftTable("inet", "t")
    t.want = True
    t.present = False
    t.objects.set_desired("m", Obj("map", "ifname", "verdict"))
    t.objects.set_desired("c1", Obj("counter"))
    t.chains.set_desired("base", Chain(("oifname vmap @m",), Base("filter", "forward", 0)))
    t.chains.set_desired("p1", Chain(('counter name "c1" accept',)))
    t.set_elements("m", {"veth1": "jump p1"})
    lines = t.script().splitlines()
    assert lines[0] == "add table inet t"
    first = {w: next(i for i, line in enumerate(lines) if w in line)
             for w in ("add map", "add counter", "add chain inet t p1", "add rule inet t p1", "add element")}
    assert first["add map"] < first["add chain inet t p1"] < first["add rule inet t p1"] < first["add element"]
    assert first["add counter"] < first["add rule inet t p1"]
    assert f'comment "{rule_tag("oifname vmap @m")}"' in t.script()

    t._mark_written()
    assert not t.dirty and t.script() == ""
    t.set_elements("m", {})
    t.chains.delete_desired("p1")
    t.objects.delete_desired("c1")
    assert t.script().splitlines() == [
        'delete element inet t m { "veth1" }', "flush chain inet t p1", "delete chain inet t p1",
        "delete counter inet t c1"]


def test_own_commits_are_not_foreign_from_any_thread(netns):
    ns = netns.new("mon")
    mon = NftMonitor(netns=ns)
    try:
        n = Nft(ns)
        n.run("add table ip mine")
        worker = threading.Thread(target=n.run, args=("add chain ip mine c",))
        worker.start()
        worker.join()
        time.sleep(0.05)
        assert not mon.drain()
        assert len(mon.commits) == 2  # both commits were seen, from two of our threads
        # Each is known by the context's netlink port too (what holds when the agent runs in
        # a pid namespace of its own and the kernel's pid is not one we can see).
        assert n.ports and all(port in n.ports for _, _, _, port in mon.commits)
        assert nft(ns, "add", "table", "ip", "someone-else").returncode == 0
        time.sleep(0.05)
        assert mon.drain()
        assert [name for _, _, name, _ in mon.foreign] == ["nft"]
        assert not mon.drain()  # drained
    finally:
        mon.close()


def test_in_process_context_stays_in_its_namespace(netns):
    a, b = netns.new("a"), netns.new("b")
    Nft(a).run("add table inet only-in-a")
    assert list_table(a, "inet", "only-in-a") is not None
    assert list_table(b, "inet", "only-in-a") is None
    assert Nft(b).list_table("inet", "only-in-a") is None


def test_a_changed_set_type_replaces_the_table_whole_and_foreign_objects_go():
    t = NftTable("inet", "t")
    t.want = True
    t.objects.set_desired("m", Obj("map", "ifname", "verdict"))
    t.chains.set_desired("c", Chain(("accept",)))
    t.set_elements("m", {"veth1": "jump c"})
    listing = [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {"family": "inet", "table": "t", "name": "c"}},
        {"rule": {"family": "inet", "table": "t", "chain": "c", "comment": rule_tag("accept")}},
        {"map": {"family": "inet", "table": "t", "name": "m", "type": "ifname", "map": "verdict",
                 "elem": [["veth1", {"jump": {"target": "c"}}]]}},
        {"counter": {"family": "inet", "table": "t", "name": "foreign", "packets": 1, "bytes": 2}},
    ]
    t.load(listing)
    assert t.script() == "delete counter inet t foreign\n"  # the rest is as we want it
    listing[3]["map"]["map"] = "ipv4_addr"  # a map of another type under our name
    t.load(listing)
    lines = t.script().splitlines()
    assert lines[:2] == ["delete table inet t", "add table inet t"]
    assert 'add element inet t m { "veth1" : jump c }' in lines
