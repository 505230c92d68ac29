"""The VXLAN manager: the node's VXLAN devices, their FDB and neighbour entries.

Fed `VxlanUpdate` (agent.calc_vxlan: the devices and remote VTEPs, whole), it keeps two
`DeltaTracker`s, devices by name and entries by (device, kind, key), and writes only the
difference:

  device   created with learning off and no remote (every peer is an FDB entry), its MAC,
           MTU and tunnel address, up; a device whose VNI, local address or port is not
           the desired one is deleted and made again (the kernel cannot change them), its
           MTU, MAC, address or state are fixed in place;
  entries  all in one netlink batch (raw messages, one sendmsg), as routes are: FDB (VTEP
           MAC -> node address) and permanent neighbours (tunnel address -> MAC).

The routes through the device are the route manager's (class "vxlan"); a route whose
device is not there yet waits for it there. Apply the VXLAN manager first (the driver does).

Drift: `VxlanMonitor` (its own netlink socket on the link and neighbour groups, watched by
the driver) tells the manager when someone deletes an entry of ours or touches a device
of ours; the next apply puts it back. A full resync reads the devices and dumps their
entries again. Not thread-safe: the driver's thread calls everything.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from tortie.dataplane import DeltaTracker
from tortie.errors import DataplaneError
from tortie.log import get_logger

from . import neigh
from . import netlink as nl
from .vxlan_model import Device, VxlanUpdate

log = get_logger("vxlan")

OWNED = ("vxlan.tortie", "vxlan-v6.tortie")  # device names that are tortie's alone
_IFF_UP = 0x1
IFA_F_NODAD = 0x02


def _device_state(dev) -> tuple:
    """What a device must be: (the device, up, learning)."""
    return (dev, True, False)


class VxlanManager:
    name = "vxlan"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.sock = nl.NetlinkSocket(netns)
        self._ipr = None  # pyroute2, for the few device operations (made on first use)
        self.devices: DeltaTracker[str, tuple] = DeltaTracker()
        self.entries: DeltaTracker[tuple[str, str, str], str] = DeltaTracker()
        self.index: dict[str, int] = {}  # our devices' ifindexes, as last seen
        self.errors: dict[str, str] = {}  # what the kernel refused, by device or entry
        self._resync = True
        self._have_update = False
        # Called (on this thread) after a device was repaired or made again: the kernel may
        # have dropped the routes through it without a notification (the agent: the route
        # manager's request_resync).
        self.on_repair = None

    # -- the manager protocol -------------------------------------------------------------
    def on_update(self, msg: object) -> None:
        if not isinstance(msg, VxlanUpdate):
            return
        self._have_update = True
        self.devices.replace_desired({d.name: _device_state(d) for d in msg.devices})
        by_family = {d.family: d.name for d in msg.devices}
        want: dict[tuple[str, str, str], str] = {}
        for family, vtep in msg.vteps:
            dev = by_family.get(family)
            if dev is None:
                continue
            want[(dev, "fdb", vtep.mac)] = vtep.underlay
            want[(dev, "neigh", vtep.tunnel)] = vtep.mac
        self.entries.replace_desired(want)

    @property
    def dirty(self) -> bool:
        return self._have_update and (self._resync or self.devices.has_work or self.entries.has_work)

    def resync(self) -> None:
        self._resync = True

    def close(self) -> None:
        self.sock.close()
        if self._ipr is not None:
            self._ipr.close()

    def apply(self) -> None:
        if not self._have_update:
            return  # before the first plan, nothing is known to be unwanted
        if self.errors:  # the driver's retry after a failure: read the kernel, try all again
            self._resync = True
        if self._resync:
            self.errors = {}
            self._read_kernel()
        self._apply_devices()
        self._apply_entries()
        self.devices.compact()
        self.entries.compact()
        if self.errors:
            raise DataplaneError("; ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())))

    # -- reading the kernel -----------------------------------------------------------------
    @property
    def ipr(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        return self._ipr

    def _read_device(self, name: str) -> tuple | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self.ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV
                self.index.pop(name, None)
                return None
            raise
        self.index[name] = msg["index"]
        info = msg.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan" or data is None:
            return (None, False, True)  # a device of another kind under our name: replaced
        local = data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6") or ""
        family = 6 if ":" in local else 4
        addrs = sorted(a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(index=msg["index"])
                       if not ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_link_local)
        dev = Device(name, family, data.get_attr("IFLA_VXLAN_ID"), local, msg.get("address"), msg.get("mtu"),
                     addrs[0] if len(addrs) == 1 else ",".join(addrs), data.get_attr("IFLA_VXLAN_PORT"))
        return (dev, bool(msg["flags"] & _IFF_UP), bool(data.get_attr("IFLA_VXLAN_LEARNING")))

    def _read_kernel(self) -> None:
        devices = {}
        for name in OWNED:
            found = self._read_device(name)
            if found is not None:
                devices[name] = found
        self.devices.replace_actual(devices)
        entries: dict[tuple[str, str, str], str] = {}
        for name, index in self.index.items():
            for family in (neigh.AF_BRIDGE, socket.AF_INET, socket.AF_INET6):
                for buf in self.sock.dump(neigh.RTM_GETNEIGH, neigh.dump_request(family, index)):
                    for _t, ifindex, key, value, permanent in neigh.parse(buf):
                        if ifindex == index and permanent:
                            entries[(name, *key)] = value
        self.entries.replace_actual(entries)
        self._resync = False

    # -- writing ----------------------------------------------------------------------------
    def _apply_devices(self) -> None:
        for name in list(self.devices.pending_deletions):
            self._delete_device(name)
        for name, want in list(self.devices.pending_updates.items()):
            if name in self.devices.held:
                continue
            have = self.devices.actual.get(name)
            try:
                if have is None or not _same_kind(have[0], want[0]):
                    if have is not None:
                        self._delete_device(name)
                    self._create(want[0])
                else:
                    self._fix(have, want[0])
            except Exception as exc:  # the kernel's word, reported per device
                code = getattr(exc, "code", None)
                self.errors[name] = f"{nl.errno_name(code)} ({exc.args[-1]})" if isinstance(code, int) else str(exc)
                log.error("vxlan device not set up", device=name, error=self.errors[name])
                self.devices.hold(name, self.errors[name])
                continue
            self.errors.pop(name, None)
            self.devices.mark_written(name)

    def _delete_device(self, name: str) -> None:
        index = self.index.pop(name, None)
        if index is not None:
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                self.ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != 19:
                    raise
        self.devices.delete_actual(name)
        self._forget_entries(name)
        log.info("vxlan device removed", device=name)

    def _forget_entries(self, name: str) -> None:
        for key in [k for k in self.entries.actual if k[0] == name]:
            self.entries.delete_actual(key)

    def _create(self, dev) -> None:
        local = {"vxlan_local6" if dev.family == 6 else "vxlan_local": dev.local}
        self.ipr.link("add", ifname=dev.name, kind="vxlan", vxlan_id=dev.vni, vxlan_port=dev.port,
                      vxlan_learning=0, address=dev.mac, mtu=dev.mtu, **local)
        index = self.ipr.link_lookup(ifname=dev.name)[0]
        self.index[dev.name] = index
        self._add_address(index, dev)
        self.ipr.link("set", index=index, state="up")
        self._forget_entries(dev.name)
        if self.on_repair is not None:
            self.on_repair()
        log.info("vxlan device created", device=dev.name, vni=dev.vni, local=dev.local, mac=dev.mac,
                 mtu=dev.mtu, address=dev.address)

    def _add_address(self, index: int, dev) -> None:
        # IPv6: no duplicate address detection (the address is the pool's, handed out once):
        # a tentative address would hold up the node's own traffic through the tunnel.
        extra = {} if dev.family == 4 else {"flags": IFA_F_NODAD}
        self.ipr.addr("add", index=index, address=dev.address, prefixlen=32 if dev.family == 4 else 128, **extra)

    def _fix(self, have: tuple, dev) -> None:
        old, up, learning = have
        index = self.index[dev.name]
        if learning:
            raise DataplaneError("learning is on")  # not changeable in place: made again below
        # Only what differs: setting the MAC flushes the device's neighbours (even ours).
        change = {k: v for k, v, same in (("address", dev.mac, old.mac == dev.mac), ("mtu", dev.mtu, old.mtu == dev.mtu),
                                          ("state", "up", up)) if not same}
        if change:
            self.ipr.link("set", index=index, **change)
        if "address" in change:
            self._forget_entries(dev.name)
        if old.address != dev.address:
            # The new address first: a device left without IPv4 address loses every route
            # through it, and the kernel tells no one.
            if dev.address not in old.address.split(","):
                self._add_address(index, dev)
            for a in old.address.split(","):
                if a and a != dev.address:
                    self.ipr.addr("del", index=index, address=a,
                                  prefixlen=next(x["prefixlen"] for x in self.ipr.get_addr(index=index)
                                                 if x.get_attr("IFA_ADDRESS") == a))
        if not change and old.address == dev.address:
            return
        if self.on_repair is not None:  # routes through it may have gone silently: read them again
            self.on_repair()
        log.info("vxlan device repaired", device=dev.name, changed=sorted(change),
                 address=dev.address if old.address != dev.address else None, was=old)

    def _apply_entries(self) -> None:
        t = self.entries
        ops: list[tuple[int, tuple[str, str, str], str]] = []
        for key in t.pending_deletions:
            if key not in t.held and key[0] in self.index:
                ops.append((neigh.RTM_DELNEIGH, key, t.actual[key]))
        for key, value in t.pending_updates.items():
            if key in t.held:
                continue
            if key[0] not in self.index or key[0] in self.devices.pending_updates:
                t.hold(key, "waiting for the device")
                continue
            ops.append((neigh.RTM_NEWNEIGH, key, value))
        if not ops:
            return
        first = self.sock.next_seq(len(ops))
        msgs = [neigh.encode(mtype, first + i, self.index[key[0]], (key[1], key[2]), value)
                for i, (mtype, key, value) in enumerate(ops)]
        failed = self.sock.transact(msgs)
        for i, (mtype, key, value) in enumerate(ops):
            err = failed.get(first + i)
            where = f"{key[0]} {key[1]} {key[2]}"
            if err is not None and not (mtype == neigh.RTM_DELNEIGH and err[0] == 2):  # ENOENT: gone
                self.errors[where] = f"{nl.errno_name(err[0])} {err[1]}".strip()
                t.hold(key, self.errors[where])
                continue
            self.errors.pop(where, None)
            if mtype == neigh.RTM_DELNEIGH:
                t.mark_deleted(key)
            else:
                t.mark_written(key, value)

    # -- notifications (VxlanMonitor) ---------------------------------------------------------
    def on_link(self, index: int, name: str | None, present: bool, seen: tuple | None = None) -> None:
        """A link changed: one of ours deleted (its entries went with it) or changed (read
        again in the next apply, unless `seen` (up, mtu, mac) is what we hold: the echo of
        our own write)."""
        ours = name in OWNED or index in self.index.values()
        if not ours:
            return
        if not present:
            gone = name if name in OWNED else next(n for n, i in self.index.items() if i == index)
            self.index.pop(gone, None)
            self.devices.delete_actual(gone)
            self._forget_entries(gone)
            return
        have = self.devices.actual.get(name)
        if have is None or have[0] is None or seen != (have[1], have[0].mtu, have[0].mac) \
                or self.index.get(name) != index:
            log.debug("vxlan link changed", seen=seen, have=have)
            self._resync = True

    def on_address(self, index: int) -> None:
        """An address came or went on a link: ours is read again."""
        if index in self.index.values():
            self._resync = True

    def on_neigh(self, deleted: bool, ifindex: int, key: neigh.Key, value: str, permanent: bool) -> None:
        name = next((n for n, i in self.index.items() if i == ifindex), None)
        if name is None:
            return
        k = (name, *key)
        if deleted or not permanent:
            self.entries.delete_actual(k)
        else:
            self.entries.set_actual(k, value)


def _same_kind(have, want) -> bool:
    """What the kernel cannot change on a VXLAN device: VNI, local address, port, family."""
    return have is not None and (have.vni, have.local, have.port, have.family) == \
        (want.vni, want.local, want.port, want.family)


RTM_NEWADDR, RTM_DELADDR = 20, 21
RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR = 5, 9
IFLA_ADDRESS, IFLA_MTU = 1, 4
_U32 = struct.Struct("=I")


def _mtu_mac(buf: bytes, off: int, length: int) -> tuple[int | None, str | None]:
    """IFLA_MTU and IFLA_ADDRESS of one RTM_NEWLINK message."""
    mtu = mac = None
    for atype, at, n in nl.iter_attrs(buf, off + 32, off + length):
        if atype == IFLA_MTU and n == 4:
            mtu = _U32.unpack_from(buf, at)[0]
        elif atype == IFLA_ADDRESS and n == 6:
            mac = neigh.mac_text(buf[at:at + n])
    return mtu, mac


class VxlanMonitor:
    """Link and neighbour notifications for the VXLAN manager (drift repair)."""

    def __init__(self, mgr: VxlanManager, netns: str | None = None) -> None:
        self.mgr = mgr
        self.sock = nl.NetlinkSocket(netns, groups=(nl.RTNLGRP_LINK, neigh.RTNLGRP_NEIGH,
                                                    RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> bool:
        try:
            bufs = self.sock.recv_nowait()
        except OverflowError:
            log.warning("netlink notifications lost, resyncing")
            self.mgr.resync()
            return True
        for buf in bufs:
            for off, length, mtype in nl.iter_messages(buf):
                if mtype in (nl.RTM_NEWLINK, nl.RTM_DELLINK):
                    index, name = nl.parse_link(buf, off, length)
                    seen = (bool(nl.link_flags(buf, off) & _IFF_UP), *_mtu_mac(buf, off, length))
                    self.mgr.on_link(index, name, mtype == nl.RTM_NEWLINK, seen)
                elif mtype in (RTM_NEWADDR, RTM_DELADDR):
                    self.mgr.on_address(_U32.unpack_from(buf, off + 20)[0])
            for mtype, ifindex, key, value, permanent in neigh.parse(buf):
                self.mgr.on_neigh(mtype == neigh.RTM_DELNEIGH, ifindex, key, value, permanent)
        return self.mgr.dirty


