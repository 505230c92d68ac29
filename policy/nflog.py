"""Calico's `action: Log`, seen: the packets nftables hands to an NFLOG group, one log line
each.

Why NFLOG and not the kernel log: nftables' plain `log` writes to the kernel log only from
the machine's own network namespace unless the root-namespace sysctl
`net.netfilter.nf_log_all_netns` is set, and a node (a lab node, a container) must not
touch that. `log group N` hands the packet to a netlink listener in the same namespace
instead: this reader, inside the agent, which writes one structured line per packet
(`policy log`, the rule's prefix naming the policy, direction and rule, addresses,
protocol, interfaces).

    NflogReader(group)   NETLINK_NETFILTER socket bound to the group (copy 128 bytes, no batching)
      .fileno()          for the event loop's add_reader
      .drain()           every queued packet as a `LogRecord`, non-blocking
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from tortie.log import get_logger
from tortie.policy.nftables import nfnl_messages

log = get_logger("policy-log")

GROUP = 7  # the NFLOG group the filter table's Log rules use
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV, NFULA_PAYLOAD, NFULA_PREFIX = 4, 5, 9, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


@dataclass(frozen=True)
class LogRecord:
    prefix: str
    src: str
    dst: str
    protocol: str
    indev: int | None
    outdev: int | None


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _parse_packet(payload: bytes) -> tuple[str, str, str]:
    if payload[:1] and payload[0] >> 4 == 4 and len(payload) >= 20:
        return (str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20])),
                _PROTOS.get(payload[9], str(payload[9])))
    if payload[:1] and payload[0] >> 4 == 6 and len(payload) >= 40:
        return (str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40])),
                _PROTOS.get(payload[6], str(payload[6])))
    return "", "", ""


def parse(data: bytes) -> list[LogRecord]:
    """Every NFULNL_MSG_PACKET in one netlink read."""
    out = []
    for _port, attrs in nfnl_messages(data, NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
        src, dst, proto = _parse_packet(attrs.get(NFULA_PAYLOAD, b""))
        dev = {k: struct.unpack(">I", attrs[k])[0] for k in (NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV)
               if len(attrs.get(k, b"")) == 4}
        out.append(LogRecord(attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace").strip(),
                             src, dst, proto, dev.get(NFULA_IFINDEX_INDEV), dev.get(NFULA_IFINDEX_OUTDEV)))
    return out


class NflogReader:
    """The listener of one NFLOG group in this thread's network namespace."""

    def __init__(self, group: int = GROUP) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
        self._config(_attr(NFULA_CFG_MODE, struct.pack(">IBB", 128, NFULNL_COPY_PACKET, 0)))
        # each packet at once (the kernel's default batches 100 or waits 1 s)
        self._config(_attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1)))
        self.sock.setblocking(False)

    def _config(self, attrs: bytes) -> None:
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(self.group)) + attrs
        msg = _HDR.pack(_HDR.size + len(body), NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG,
                        NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
        self.sock.send(msg)
        reply = self.sock.recv(4096)
        _, mtype, _, _, _ = _HDR.unpack_from(reply)
        if mtype == NLMSG_ERROR:
            err = struct.unpack_from("=i", reply, _HDR.size)[0]
            if err:
                raise OSError(-err, f"NFLOG group {self.group}: configuration refused")

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> list[LogRecord]:
        out: list[LogRecord] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:  # ENOBUFS: a burst overran the buffer; say so, go on
                log.warning("policy log packets lost", error=str(exc))
                continue
            out += parse(data)

    def log_all(self) -> int:
        """Drain and write one line per packet; how many."""
        records = self.drain()
        for r in records:
            log.info("policy log", rule=r.prefix, src=r.src, dst=r.dst, protocol=r.protocol,
                     indev=r.indev, outdev=r.outdev)
        return len(records)

    def close(self) -> None:
        self.sock.close()
