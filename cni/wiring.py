"""The pod's network plumbing, Calico style, over a small rtnetlink client of our own.

Per pod: a veth pair created in the node namespace with its peer born inside the pod
namespace (moving an interface between namespaces afterwards is slow); in the pod the
address as /32 (/128), `169.254.1.1` as a link-scope gateway and the default route via
it (IPv6: via the host veth's fixed link-local address); on the host side proxy ARP
answers for the gateway and `<pod ip>/32 dev <host veth> scope link` reaches the pod.

Why not pyroute2 here: an ADD is on the critical path of every pod start. A pod-side
socket has to be opened inside the pod's namespace; pyroute2 forks for that (~7 ms) and
its sync facade re-creates sockets per thread. We open a plain netlink socket from a
short-lived thread that entered the pod namespace (setns is per thread, and the socket
keeps its namespace after the thread is gone), then send the pod's whole setup as one
batch: ADD is about six netlink round trips and no subprocess.

The calling process must live in the node namespace (sysctls under /proc/sys/net act
on the namespace of the writing thread).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tortie.errors import DataplaneError

GATEWAY_V4 = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # link-local of HOST_MAC (EUI-64)
HOST_PREFIX = "tor"

# rtnetlink constants (linux/rtnetlink.h, if_link.h, netlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x300, 0x200, 0x400, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, NDA_DST, NDA_LLADDR, NUD_PERMANENT = 28, 1, 2, 0x80
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 5, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_F_NODAD = 1, 2, 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RT_TABLE_MAIN, RTN_UNICAST = 254, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTPROT_STATIC = 4
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
NETLINK_TIMEOUT = 10.0

_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NLHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_libc = ctypes.CDLL(None, use_errno=True)


def host_veth_name(container_id: str, ifname: str = "eth0") -> str:
    """`tor` + 11 hex of a hash of the attachment: stable, 14 characters (IFNAMSIZ is 16)."""
    key = container_id if ifname == "eth0" else f"{container_id}.{ifname}"
    return HOST_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:11]


def pod_mac(container_id: str, ifname: str = "eth0") -> str:
    """A stable, locally administered unicast MAC for the pod side: known before the
    veth exists (so the endpoint can be written in parallel) and the same on a repeated ADD."""
    raw = bytearray(hashlib.sha1(f"{container_id}/{ifname}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return _mac(bytes(raw))


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _parse_attrs(data: bytes, at: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while at + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, at)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[at + 4:at + n]
        at += (n + 3) & ~3
    return out


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class NetlinkError(DataplaneError):
    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.errno = code


class Netlink:
    """A blocking NETLINK_ROUTE socket: batched requests with acks, and dumps."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    @classmethod
    def here(cls) -> Netlink:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(NETLINK_TIMEOUT)  # a lost ack must not hang a CNI call forever
        s.bind((0, 0))
        return cls(s)

    @classmethod
    def in_netns(cls, path: str) -> Netlink:
        """A socket inside the namespace at `path`, opened from a throwaway thread."""
        box: dict = {}

        def enter() -> None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                box["err"] = exc
                return
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    box["err"] = OSError(code, os.strerror(code), path)
                    return
                box["nl"] = cls.here()  # this thread now lives in the pod ns and then ends
            except OSError as exc:
                box["err"] = exc
            finally:
                os.close(fd)

        t = threading.Thread(target=enter, name="tortie-setns")
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["nl"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _frame(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, _NLHDR.pack(_NLHDR.size + len(body), kind, flags | NLM_F_REQUEST, self.seq, 0) + body

    def batch(self, msgs: Sequence[tuple[int, int, bytes, str]],
              ignore: Sequence[int] = ()) -> list[int]:
        """Send (type, flags, body, what) messages in one write; wait for every ack.

        Returns the errno of each (0 = ok, or one in `ignore`); raises on the first other.
        """
        seqs = {}
        frames = []
        for kind, flags, body, what in msgs:
            seq, frame = self._frame(kind, flags | NLM_F_ACK, body)
            seqs[seq] = what
            frames.append(frame)
        self.sock.send(b"".join(frames))
        results: dict[int, int] = {}
        failure: NetlinkError | None = None
        while len(results) < len(seqs):
            data = self.sock.recv(65536)
            at = 0
            while at + _NLHDR.size <= len(data):
                n, kind, _flags, seq, _pid = _NLHDR.unpack_from(data, at)
                if kind == NLMSG_ERROR and seq in seqs:
                    code = -struct.unpack_from("=i", data, at + _NLHDR.size)[0]
                    results[seq] = code
                    if code and code not in ignore and failure is None:
                        failure = NetlinkError(code, seqs[seq])
                at += (n + 3) & ~3
        if failure:
            raise failure
        return [results[s] for s in sorted(seqs)]

    def request(self, kind: int, flags: int, body: bytes, what: str, ignore: Sequence[int] = ()) -> int:
        return self.batch([(kind, flags, body, what)], ignore)[0]

    def query(self, kind: int, body: bytes, what: str, dump: bool) -> Iterator[tuple[int, bytes]]:
        """Messages (type, payload) answering a get (one) or a dump (many)."""
        seq, frame = self._frame(kind, NLM_F_DUMP if dump else 0, body)
        self.sock.send(frame)
        while True:
            data = self.sock.recv(1 << 17)
            at = 0
            while at + _NLHDR.size <= len(data):
                n, mtype, flags, mseq, _pid = _NLHDR.unpack_from(data, at)
                payload = data[at + _NLHDR.size:at + n]
                at += (n + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, what)
                    return
                yield mtype, payload
                if not flags & NLM_F_MULTI:
                    return

    # ---- typed helpers --------------------------------------------------------------

    def link(self, ifname: str) -> tuple[int, int, str, int] | None:
        """(index, flags, mac, index of its veth peer in the peer's namespace or 0) of a
        link by name, or None."""
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(ifname))
        try:
            for _t, payload in self.query(RTM_GETLINK, body, f"get link {ifname}", dump=False):
                _fam, _type, index, flags, _chg = _IFINFO.unpack_from(payload)
                attrs = _parse_attrs(payload, _IFINFO.size)
                peer = struct.unpack("=i", attrs[IFLA_LINK])[0] if IFLA_LINK in attrs else 0
                return index, flags, _mac(attrs.get(IFLA_ADDRESS, b"")), peer
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def addresses(self, index: int) -> set[str]:
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            body = _IFADDR.pack(family, 0, 0, 0, 0)
            for _t, payload in self.query(RTM_GETADDR, body, "dump addresses", dump=True):
                fam, plen, _f, _scope, idx = _IFADDR.unpack_from(payload)
                if idx != index or fam != family:
                    continue
                attrs = _parse_attrs(payload, _IFADDR.size)
                raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
                if raw:
                    out.add(f"{socket.inet_ntop(fam, raw)}/{plen}")
        return out

    def routes(self, family: int) -> list[dict]:
        out = []
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for _t, payload in self.query(RTM_GETROUTE, body, "dump routes", dump=True):
            fam, dst_len, _s, _tos, table, proto, scope, rtype, _fl = _RTMSG.unpack_from(payload)
            attrs = _parse_attrs(payload, _RTMSG.size)
            table = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table
            dst = socket.inet_ntop(fam, attrs[RTA_DST]) if RTA_DST in attrs else (
                "0.0.0.0" if fam == socket.AF_INET else "::")
            out.append({
                "dst": f"{dst}/{dst_len}", "table": table, "proto": proto, "scope": scope,
                "type": rtype,
                "oif": struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0,
                "gateway": socket.inet_ntop(fam, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else "",
            })
        return out


def _route_msg(dst: str, oif: int, *, gateway: str = "", scope: int, proto: int) -> bytes:
    net = ipaddress.ip_network(dst)
    fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(fam, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST, 0)
    if net.prefixlen:
        body += _attr(RTA_DST, net.network_address.packed)
    if gateway:
        body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    return body + _attr(RTA_OIF, struct.pack("=i", oif)) + _attr(RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN))


def _pod_messages(index: int, addresses: Sequence[str]) -> list[tuple[int, int, bytes, str]]:
    """The pod side in order: addresses, link up, gateway route(s), default route(s)."""
    msgs: list[tuple[int, int, bytes, str]] = []
    families = sorted({ipaddress.ip_interface(a).version for a in addresses})
    for address in addresses:
        ip = ipaddress.ip_interface(address).ip
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        body = _IFADDR.pack(fam, ip.max_prefixlen, IFA_F_NODAD if ip.version == 6 else 0,
                            RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, ip.packed) + _attr(IFA_ADDRESS, ip.packed)
        msgs.append((RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body, f"pod address {ip}"))
    msgs.append((RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP), "pod link up"))
    for version in families:
        # A permanent neighbour for the gateway: the pod never has to ARP/ND for it, so
        # it works even where the node's proxy ARP would not answer (no route to it).
        gw = GATEWAY_V4 if version == 4 else GATEWAY_V6
        fam = socket.AF_INET if version == 4 else socket.AF_INET6
        body = _NDMSG.pack(fam, index, NUD_PERMANENT, 0, RTN_UNICAST)
        body += _attr(NDA_DST, ipaddress.ip_address(gw).packed)
        body += _attr(NDA_LLADDR, bytes.fromhex(HOST_MAC.replace(":", "")))
        msgs.append((RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, f"pod neighbour {gw}"))
        if version == 4:
            msgs.append((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
                         _route_msg(f"{GATEWAY_V4}/32", index, scope=RT_SCOPE_LINK, proto=RTPROT_STATIC),
                         "pod gateway route"))
        gw = GATEWAY_V4 if version == 4 else GATEWAY_V6
        default = "0.0.0.0/0" if version == 4 else "::/0"
        msgs.append((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
                     _route_msg(default, index, gateway=gw, scope=RT_SCOPE_UNIVERSE, proto=RTPROT_STATIC),
                     f"pod default route via {gw}"))
    return msgs


NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)


def is_netns(path: str) -> bool:
    """Whether path is a network namespace (a bind mount or /proc/<pid>/ns/net)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def enable_forwarding(ipv6: bool = True) -> None:
    """ip_forward in this (node) namespace. Never call it from the root namespace."""
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if ipv6 and os.path.exists("/proc/sys/net/ipv6/conf/all/forwarding"):
        _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


@dataclass(frozen=True)
class PodLink:
    host_ifname: str
    host_index: int
    pod_ifname: str
    pod_index: int
    pod_mac: str
    host_mac: str = HOST_MAC


def _host_sysctls(host_ifname: str, ipv6: bool) -> None:
    # Proxy ARP answers the pod's ARP for 169.254.1.1; proxy_delay 0 or the kernel
    # delays those answers by up to 0.8 s.
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{host_ifname}/proxy_arp", "1")
    _write_sysctl(f"/proc/sys/net/ipv4/neigh/{host_ifname}/proxy_delay", "0")
    if ipv6:
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_ifname}/accept_dad", "0")


def setup_pod(netns: str, pod_ifname: str, host_ifname: str, addresses: Sequence[str], *,
              mtu: int = 0, mac: str = "") -> PodLink:
    """Create and address the veth pair, and wire the pod's side (addresses, gateway and
    default routes). The host route to the pod is the route manager's, not written here.

    Raises NetlinkError (EEXIST when the names are taken: the caller tears down first).
    """
    ipv6 = any(ipaddress.ip_interface(a).version == 6 for a in addresses)
    nsfd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Netlink.here() as host, Netlink.in_netns(netns) as pod:
            # Both ends are created down (the kernel refuses an up peer: ENOTCONN) and brought
            # up below: the pod end in its batch, the host end after accept_dad is off.
            peer = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(pod_ifname))
            peer += _attr(IFLA_NET_NS_FD, struct.pack("=I", nsfd))
            if mac:
                peer += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
            if mtu:
                peer += _attr(IFLA_MTU, struct.pack("=I", mtu))
            info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
            body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(host_ifname))
            body += _attr(IFLA_ADDRESS, bytes.fromhex(HOST_MAC.replace(":", "")))
            body += _attr(IFLA_LINKINFO, info)
            if mtu:
                body += _attr(IFLA_MTU, struct.pack("=I", mtu))
            host.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {host_ifname}")
            try:
                hlink = host.link(host_ifname)
                plink = pod.link(pod_ifname)
                if hlink is None or plink is None:
                    raise DataplaneError(f"veth {host_ifname}/{pod_ifname} vanished after create")
                _host_sysctls(host_ifname, ipv6)
                host.request(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, hlink[0], IFF_UP, IFF_UP), "host veth up")
                pod.batch(_pod_messages(plink[0], addresses))
            except BaseException:
                delete_link(host_ifname)
                raise
            return PodLink(host_ifname, hlink[0], pod_ifname, plink[0], plink[2], hlink[2])
    finally:
        os.close(nsfd)


def delete_link(host_ifname: str) -> bool:
    """Delete the host veth (its peer goes with it). False if it was not there."""
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(host_ifname))
    with Netlink.here() as nl:
        code = nl.request(RTM_DELLINK, 0, body, f"delete {host_ifname}", ignore=(errno.ENODEV,))
    return code == 0


def _pair(netns: str, pod_ifname: str, host_ifname: str, addresses: bool):
    """(host link, pod link, the pod link's addresses): None for what is not there."""
    with Netlink.here() as host:
        hlink = host.link(host_ifname)
    if hlink is None:
        return None, None, set()
    try:
        pod = Netlink.in_netns(netns)
    except OSError:
        return hlink, None, set()
    with pod:
        plink = pod.link(pod_ifname)
        addrs = pod.addresses(plink[0]) if plink is not None and addresses else set()
    return hlink, plink, {a for a in addrs if not a.startswith("fe80:")}


def inspect_pod(netns: str, pod_ifname: str, host_ifname: str) -> tuple[PodLink, set[str]] | None:
    """The existing wiring and the pod interface's addresses, or None if incomplete."""
    hlink, plink, addrs = _pair(netns, pod_ifname, host_ifname, addresses=True)
    if hlink is None or plink is None:
        return None
    return PodLink(host_ifname, hlink[0], pod_ifname, plink[0], plink[2], hlink[2]), addrs


def wired_elsewhere(netns: str, pod_ifname: str, host_ifname: str) -> bool:
    """Whether the container's host veth exists with its peer outside `netns` (not
    `pod_ifname` there, pointing back at it): its interface lives in another namespace."""
    hlink, plink, _ = _pair(netns, pod_ifname, host_ifname, addresses=False)
    return hlink is not None and (plink is None or (plink[0], plink[3]) != (hlink[3], hlink[0]))


def check_pod(netns: str, pod_ifname: str, host_ifname: str, addresses: Sequence[str], *,
              route_proto: int) -> list[str]:
    """Problems with a pod's wiring (empty when all is in place)."""
    problems: list[str] = []
    with Netlink.here() as host:
        hlink = host.link(host_ifname)
        if hlink is None:
            return [f"host interface {host_ifname} is missing"]
        if not hlink[1] & IFF_UP:
            problems.append(f"host interface {host_ifname} is down")
        for family in {ipaddress.ip_interface(a).version for a in addresses}:
            have = {(r["dst"], r["oif"]) for r in host.routes(socket.AF_INET if family == 4 else socket.AF_INET6)
                    if r["table"] == RT_TABLE_MAIN}
            for a in addresses:
                ip = ipaddress.ip_interface(a).ip
                if ip.version == family and (f"{ip}/{ip.max_prefixlen}", hlink[0]) not in have:
                    problems.append(f"host route {ip}/{ip.max_prefixlen} dev {host_ifname} is missing")
    try:
        pod = Netlink.in_netns(netns)
    except OSError as exc:
        return [*problems, f"network namespace {netns}: {exc.strerror}"]
    with pod:
        plink = pod.link(pod_ifname)
        if plink is None:
            return [*problems, f"interface {pod_ifname} is missing in {netns}"]
        if not plink[1] & IFF_UP:
            problems.append(f"interface {pod_ifname} is down")
        have_addrs = pod.addresses(plink[0])
        for a in addresses:
            ip = ipaddress.ip_interface(a).ip
            if f"{ip}/{ip.max_prefixlen}" not in have_addrs:
                problems.append(f"address {ip}/{ip.max_prefixlen} is missing on {pod_ifname}")
        for family in {ipaddress.ip_interface(a).version for a in addresses}:
            routes = [r for r in pod.routes(socket.AF_INET if family == 4 else socket.AF_INET6)
                      if r["table"] == RT_TABLE_MAIN and r["oif"] == plink[0]]
            gw = GATEWAY_V4 if family == 4 else GATEWAY_V6
            default = "0.0.0.0/0" if family == 4 else "::/0"
            if family == 4 and not any(r["dst"] == f"{GATEWAY_V4}/32" and r["scope"] == RT_SCOPE_LINK
                                       for r in routes):
                problems.append(f"route {GATEWAY_V4} scope link dev {pod_ifname} is missing")
            if not any(r["dst"] == default and r["gateway"] == gw for r in routes):
                problems.append(f"default route via {gw} dev {pod_ifname} is missing")
    return problems
