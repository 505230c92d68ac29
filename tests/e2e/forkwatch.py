"""Which processes a given process forks, seen by the kernel's process-events connector
(NETLINK_CONNECTOR / CN_IDX_PROC): every fork in the system is reported with the parent's
and the child's pid and tgid, so a short-lived child (a forked `nft`, `ip`) cannot slip
between two polls of /proc. Threads (child tgid == parent tgid) are not processes."""

from __future__ import annotations

import os
import socket
import struct
import threading

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_FORK = 0x1
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")
_CNMSG = struct.Struct("=IIIIHH")
_EVENT = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")


class ForkWatch:
    """`with ForkWatch(pid) as w: ...`, then `w.children`: (child pid, comm) of each process
    `pid` (any of its threads) forked meanwhile."""

    def __init__(self, tgid: int) -> None:
        self.tgid = tgid
        self.children: list[tuple[int, str]] = []
        self.events = 0
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        self._sock.bind((0, CN_IDX_PROC))
        self._sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _op(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)

    def __enter__(self) -> ForkWatch:
        self._op(PROC_CN_MCAST_LISTEN)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        try:
            self._op(PROC_CN_MCAST_IGNORE)
        finally:
            self._sock.close()

    def _read(self) -> None:
        off = _NLMSG.size + _CNMSG.size
        while not self._stop:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if len(data) < off + _EVENT.size:
                continue
            what = _EVENT.unpack_from(data, off)[0]
            self.events += 1
            if what != PROC_EVENT_FORK:
                continue
            _ppid, ptgid, cpid, ctgid = _FORK.unpack_from(data, off + _EVENT.size)
            if ptgid == self.tgid and ctgid != ptgid:
                try:
                    with open(f"/proc/{cpid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                self.children.append((cpid, comm))
