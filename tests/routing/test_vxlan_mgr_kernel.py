"""The VXLAN manager against the real kernel: two namespaces joined by a veth, each a VTEP
of the other; device, FDB and neighbour entries as planned, traffic through the tunnel,
and drift repaired from the monitor's notifications."""

from __future__ import annotations

import json
import subprocess

import pytest

from tortie.errors import DataplaneError
from tortie.routing.model import Route
from tortie.routing.route_mgr import RouteManager
from tortie.routing.vxlan_mgr import VxlanManager, VxlanMonitor
from tortie.routing.vxlan_model import VTEP, Device, VxlanUpdate

pytestmark = pytest.mark.timeout(60)

MAC = {"a": "02:00:00:00:00:0a", "b": "02:00:00:00:00:0b"}
UNDER = {"a": "10.50.0.1", "b": "10.50.0.2"}
TUN = {"a": "10.66.0.1", "b": "10.66.1.1"}
BLOCK = {"a": "10.66.0.0/24", "b": "10.66.1.0/24"}


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True, text=True)


def plan(me: str, other: str, *, vni: int = 4096, mtu: int = 1450, mac: str | None = None) -> VxlanUpdate:
    dev = Device("vxlan.tortie", 4, vni, UNDER[me], mac or MAC[me], mtu, TUN[me])
    return VxlanUpdate((dev,), ((4, VTEP(other, TUN[other], MAC[other], UNDER[other])),))


def device(ns: str) -> dict | None:
    out = ip(ns, "-d", "-j", "link", "show", "dev", "vxlan.tortie", check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def fdb(ns: str) -> list[tuple[str, str]]:
    out = subprocess.run(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "vxlan.tortie"],
                         capture_output=True, text=True, check=True)
    return sorted((e["mac"], e.get("dst", "")) for e in json.loads(out.stdout or "[]") if "permanent" in e.get("state", "")
                  or "permanent" in e.get("flags", []) or e.get("dst"))


def neighbours(ns: str) -> list[tuple[str, str]]:
    out = ip(ns, "-j", "neigh", "show", "dev", "vxlan.tortie")
    return sorted((e["dst"], e.get("lladdr", "")) for e in json.loads(out.stdout or "[]")
                  if "PERMANENT" in e.get("state", []))


@pytest.fixture
def pair(netns):
    a, b = netns.new("vxa"), netns.new("vxb")
    ip(a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
    for ns, who in ((a, "a"), (b, "b")):
        ip(ns, "addr", "add", f"{UNDER[who]}/24", "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
    mgrs = {"a": VxlanManager(a), "b": VxlanManager(b)}
    yield {"a": a, "b": b}, mgrs
    for m in mgrs.values():
        m.close()


def test_device_entries_and_traffic_through_the_tunnel(pair):
    ns, mgrs = pair
    for me, other in (("a", "b"), ("b", "a")):
        mgrs[me].on_update(plan(me, other))
        assert mgrs[me].dirty
        mgrs[me].apply()
        assert not mgrs[me].dirty  # all written: nothing left
        routes = RouteManager(netns=ns[me])
        routes.set_routes("vxlan", [Route(BLOCK[other], dev="vxlan.tortie", gateways=(TUN[other],), onlink=True)])
        assert not routes.apply().errors
        routes.close()
    d = device(ns["a"])
    info = d["linkinfo"]["info_data"]
    assert (info["id"], info["local"], info["port"], info["learning"]) == (4096, UNDER["a"], 4789, False)
    assert (d["address"], d["mtu"]) == (MAC["a"], 1450) and "UP" in d["flags"]
    assert fdb(ns["a"]) == [(MAC["b"], UNDER["b"])]
    assert neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]
    # A datagram from a's tunnel address reaches b's, encapsulated (b's device counts it).
    server = subprocess.Popen(["ip", "netns", "exec", ns["b"], "python3", "-c",
                               "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                               f"s.bind(('{TUN['b']}', 7000)); s.settimeout(10); d, a = s.recvfrom(2000);"
                               "s.sendto(d, a)"])
    try:
        reply = subprocess.run(["ip", "netns", "exec", ns["a"], "python3", "-c",
                                "import socket,time\n"
                                "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.2)\n"
                                f"s.bind(('{TUN['a']}', 0))\n"
                                "for _ in range(40):\n"
                                f"    s.sendto(b'x'*1400, ('{TUN['b']}', 7000))\n"
                                "    try: print(len(s.recv(2000))); break\n"
                                "    except OSError: time.sleep(0.05)\n"],
                               capture_output=True, text=True, timeout=20)
        assert reply.stdout.strip() == "1400"
    finally:
        server.kill()
        server.wait()
    stats = json.loads(ip(ns["b"], "-s", "-j", "link", "show", "dev", "vxlan.tortie").stdout)[0]
    assert stats["stats64"]["rx"]["packets"] >= 1


def test_hand_deleted_entries_and_device_come_back(pair):
    ns, mgrs = pair
    a = mgrs["a"]
    a.on_update(plan("a", "b"))
    a.apply()
    mon = VxlanMonitor(a, ns["a"])
    try:
        assert mon.drain() is False  # our own writes' echoes: nothing to do
        subprocess.run(["bridge", "-n", ns["a"], "fdb", "del", MAC["b"], "dev", "vxlan.tortie", "dst", UNDER["b"]],
                       check=True)
        ip(ns["a"], "neigh", "del", TUN["b"], "dev", "vxlan.tortie")
        assert mon.drain() is True
        a.apply()
        assert fdb(ns["a"]) == [(MAC["b"], UNDER["b"])]
        assert neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]
        # A stray permanent entry on our device is not ours to keep.
        ip(ns["a"], "neigh", "add", "10.66.9.9", "lladdr", "02:00:00:00:00:99", "dev", "vxlan.tortie", "nud", "permanent")
        assert mon.drain() is True
        a.apply()
        assert neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]
        ip(ns["a"], "link", "del", "vxlan.tortie")
        assert mon.drain() is True
        a.apply()
        assert device(ns["a"]) is not None
        assert fdb(ns["a"]) == [(MAC["b"], UNDER["b"])]
        assert neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]
        ip(ns["a"], "link", "set", "vxlan.tortie", "mtu", "1300")
        assert mon.drain() is True
        a.apply()
        assert device(ns["a"])["mtu"] == 1450
        assert mon.drain() is False  # the echo of the repair: nothing more to do
        assert not a.dirty
    finally:
        mon.close()


def test_changes_in_place_and_by_recreating(pair):
    ns, mgrs = pair
    a = mgrs["a"]
    a.on_update(plan("a", "b"))
    a.apply()
    index = device(ns["a"])["ifindex"]
    a.on_update(plan("a", "b", mtu=1400, mac="02:00:00:00:00:aa"))
    a.apply()
    d = device(ns["a"])
    assert (d["ifindex"], d["mtu"], d["address"]) == (index, 1400, "02:00:00:00:00:aa")  # fixed in place
    a.on_update(plan("a", "b", vni=77))
    a.apply()
    d = device(ns["a"])
    assert d["linkinfo"]["info_data"]["id"] == 77 and d["ifindex"] != index  # made again
    assert neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]  # and its entries with it
    a.on_update(VxlanUpdate((), ()))
    a.apply()
    assert device(ns["a"]) is None


def test_a_new_manager_adopts_what_is_there(pair):
    ns, mgrs = pair
    mgrs["a"].on_update(plan("a", "b"))
    mgrs["a"].apply()
    index = device(ns["a"])["ifindex"]
    fresh = VxlanManager(ns["a"])
    try:
        fresh.on_update(plan("a", "b"))
        fresh.apply()
        assert device(ns["a"])["ifindex"] == index
        assert not fresh.devices.pending_updates and not fresh.entries.pending_updates
    finally:
        fresh.close()



def test_a_refused_device_is_reported_and_retried(pair):
    ns, mgrs = pair
    a = mgrs["a"]
    # Another device already holds VNI 4096 on this address and port: the kernel says no.
    ip(ns["a"], "link", "add", "vxother", "type", "vxlan", "id", "4096", "local", UNDER["a"], "dstport", "4789")
    a.on_update(plan("a", "b"))
    with pytest.raises(DataplaneError, match=r"vxlan\.tortie: EEXIST"):
        a.apply()
    assert device(ns["a"]) is None and not a.dirty  # held: the driver retries after its delay
    with pytest.raises(DataplaneError):  # the retry, while the other device is there
        a.apply()
    ip(ns["a"], "link", "del", "vxother")
    a.apply()  # the next retry
    assert device(ns["a"]) is not None and neighbours(ns["a"]) == [(TUN["b"], MAC["b"])]


def test_ipv6_over_vxlan(netns):
    """An IPv6 underlay, IPv6 tunnel addresses, an IPv6 pod route through the tunnel."""
    under, tun, block = {"a": "fd00:50::1", "b": "fd00:50::2"}, {"a": "fd00:66::1", "b": "fd00:66:1::1"}, \
        {"a": "fd00:66::/64", "b": "fd00:66:1::/64"}
    ns = {"a": netns.new("vx6a"), "b": netns.new("vx6b")}
    ip(ns["a"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns["b"])
    mgrs = {}
    try:
        for me, other in (("a", "b"), ("b", "a")):
            ip(ns[me], "-6", "addr", "add", f"{under[me]}/64", "dev", "eth0", "nodad")
            ip(ns[me], "link", "set", "eth0", "up")
            mgrs[me] = VxlanManager(ns[me])
            dev = Device("vxlan-v6.tortie", 6, 4096, under[me], MAC[me], 1430, tun[me])
            mgrs[me].on_update(VxlanUpdate((dev,), ((6, VTEP(other, tun[other], MAC[other], under[other])),)))
            mgrs[me].apply()
            routes = RouteManager(netns=ns[me])
            routes.set_routes("vxlan", [Route(block[other], dev="vxlan-v6.tortie", gateways=(tun[other],), onlink=True)])
            assert not routes.apply().errors
            routes.close()
        d = json.loads(ip(ns["a"], "-d", "-j", "link", "show", "dev", "vxlan-v6.tortie").stdout)[0]
        assert (d["linkinfo"]["info_data"]["local6"], d["mtu"]) == (under["a"], 1430)
        out = json.loads(ip(ns["a"], "-6", "-j", "neigh", "show", "dev", "vxlan-v6.tortie").stdout)
        assert [(e["dst"], e["lladdr"]) for e in out if "PERMANENT" in e["state"]] == [(tun["b"], MAC["b"])]
        reply = subprocess.run(["ip", "netns", "exec", ns["a"], "python3", "-c",
                                "import socket,subprocess,sys,time\n"
                                f"srv = subprocess.Popen(['ip','netns','exec','{ns['b']}','python3','-c',"
                                "\"import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
                                f"s.bind(('{tun['b']}', 7000)); s.settimeout(10); d,a=s.recvfrom(2000); s.sendto(d,a)\"])\n"
                                "s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(0.2)\n"
                                f"s.bind(('{tun['a']}', 0))\n"
                                "for _ in range(40):\n"
                                f"    s.sendto(b'x'*1300, ('{tun['b']}', 7000))\n"
                                "    try: print(len(s.recv(2000))); break\n"
                                "    except OSError: time.sleep(0.05)\n"
                                "srv.kill()\n"], capture_output=True, text=True, timeout=30)
        assert reply.stdout.strip() == "1300", reply.stderr
        fresh = VxlanManager(ns["a"])  # a restarted agent adopts the IPv6 device as it is
        mgrs["fresh"] = fresh
        fresh.on_update(VxlanUpdate((Device("vxlan-v6.tortie", 6, 4096, under["a"], MAC["a"], 1430, tun["a"]),),
                                    ((6, VTEP("b", tun["b"], MAC["b"], under["b"])),)))
        fresh.apply()
        assert not fresh.devices.pending_updates and not fresh.entries.pending_updates
    finally:
        for m in mgrs.values():
            m.close()
