"""The nftables adapter: libnftables in-process, tables kept by element- and rule-level
transactions, and a monitor that tells our own commits from anyone else's.

    Nft(netns=None)          one libnftables context (its netlink socket lives in `netns`,
                             made there once; usable from any thread afterwards)
      .run(script)           one atomic transaction; DataplaneError when nft refuses it
      .list_table(fam, name) the table as parsed JSON objects, or None when it is absent
    NftTable(family, name)   desired vs actual of one table tortie owns: objects (sets,
                             maps, counters), chains (their rules), set/map elements; each a
                             `tortie.dataplane.DeltaTracker`
      .resync()              forget what we believe; the next apply lists the table once
    apply_tables(nft, tables)  every table's difference as ONE transaction (`add/delete
                             element`, `flush chain` + its rules, `add/delete chain|set|counter`)
    TablesManager            the managers' shared half (`tortie.dataplane.Manager`)
    NftMonitor(netns=None)   NETLINK_NETFILTER, group NFNLGRP_NFTABLES: `drain()` is True
                             when a commit (NFT_MSG_NEWGEN) came from another process

How a rule is recognised again without parsing nft's JSON expressions: every rule we write
carries `comment "<tag>"`, a short hash of its text. A chain as listed is the tuple of its
rules' comments; a chain edited by hand (a rule added, removed, replaced, the chain
flushed) no longer matches and is rewritten alone: `flush chain` + its rules. Objects and
elements are compared by name and value. Only a changed set type or base-chain hook (which
nft cannot alter in place) makes the next apply replace the whole table.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tortie.dataplane import DeltaTracker
from tortie.errors import DataplaneError
from tortie.log import get_logger

log = get_logger("nftables")

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3
NLMSG_HDR = struct.Struct("=IHHII")
NFGENMSG_LEN = 4
NLA_HDR = struct.Struct("=HH")


def _load_nftables() -> Any:
    try:
        from nftables import Nftables  # Debian's python3-nftables; see `make venv`
    except ImportError as exc:
        raise DataplaneError("python3-nftables is not installed (make install)") from exc
    return Nftables


# How our own commits are told apart (NftMonitor). The kernel names a commit's netlink
# port in the NEWGEN header and its task's pid (the init namespace's number) in
# NFTA_GEN_PROC_PID. The port is the sure sign, also inside a container's pid namespace;
# thread ids are the fallback when the port cannot be read. A thread may be gone before
# its notification is read (a worker of asyncio.to_thread): its id is remembered.
_OWN_PORTS: set[int] = set()
_COMMITTERS: set[int] = set()


def _socket_inodes() -> dict[int, int]:
    """This process's open sockets: fd -> inode."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                out[int(fd)] = int(link[8:-1])
    return out


def _netfilter_ports(inodes: Iterable[int]) -> set[int]:
    """The netlink ports of these NETLINK_NETFILTER sockets (the calling thread's netns)."""
    wanted = set(inodes)
    ports = set()
    with contextlib.suppress(OSError), open("/proc/thread-self/net/netlink") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 10 and cols[1] == str(NETLINK_NETFILTER) and int(cols[9]) in wanted:
                ports.add(int(cols[2]))
    return ports


class Nft:
    """libnftables in this process: no fork per transaction, no text round trip to a child."""

    def __init__(self, netns: str | None = None) -> None:
        nftables_cls = _load_nftables()
        ctx = contextlib.nullcontext()
        if netns is not None:
            from tortie.lab.nsutil import in_netns

            ctx = in_netns(netns)  # the context's netlink socket is opened here, in netns
        before = _socket_inodes()
        with ctx:
            self._ctx = nftables_cls()
            self._ctx.cmd("list tables")  # the socket's first send binds its port
            mine = [ino for fd, ino in _socket_inodes().items() if before.get(fd) != ino]
            self.ports = _netfilter_ports(mine)
        _OWN_PORTS.update(self.ports)
        self._lock = threading.Lock()

    def run(self, script: str) -> str:
        """One atomic transaction (a batch of commands, one per line)."""
        _COMMITTERS.add(threading.get_native_id())
        with self._lock:
            rc, out, err = self._ctx.cmd(script)
        if rc != 0:
            raise DataplaneError(f"nft rejected the transaction: {err.strip()}")
        return out

    def list_table(self, family: str, name: str, what: str = "table") -> list[dict] | None:
        """The objects nft lists for the table (`{"chain": {...}}`, `{"rule": ...}`, ...);
        `what` "counters": only its named counters (`list counters table ...`)."""
        with self._lock:
            self._ctx.set_json_output(True)
            try:
                rc, out, err = self._ctx.cmd(f"list {what} {'table ' if what != 'table' else ''}{family} {name}")
            finally:
                self._ctx.set_json_output(False)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise DataplaneError(f"nft cannot list {family} {name}: {err.strip()}")
        return json.loads(out)["nftables"]


# --- desired and actual of one table -----------------------------------------------------


@lru_cache(maxsize=65536)
def rule_tag(rule: str) -> str:
    """The comment a rule is written with: recognises it in a listing."""
    return hashlib.blake2s(rule.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Base:
    """A base chain's hook: `type filter hook forward priority -1; policy accept;`."""

    type: str
    hook: str
    prio: int
    policy: str = "accept"

    def spec(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.prio}; policy {self.policy};"


@dataclass(frozen=True, slots=True)
class Chain:
    rules: tuple[str, ...]  # desired: rule texts; actual: their tags as listed
    base: Base | None = None

    def tagged(self) -> Chain:
        return Chain(tuple(rule_tag(r) for r in self.rules), self.base)


@dataclass(frozen=True, slots=True)
class Obj:
    """A set (`kind` "set"), map ("map", `data` the value type) or counter ("counter")."""

    kind: str
    type: str = ""
    data: str = ""
    flags: tuple[str, ...] = ()
    timeout: int = 0  # seconds: elements added by the packet path expire (a dynamic set)

    def spec(self) -> str:
        if self.kind == "counter":
            return ""
        typ = f"type {self.type} : {self.data};" if self.kind == "map" else f"type {self.type};"
        flags = f" flags {', '.join(self.flags)};" if self.flags else ""
        timeout = f" timeout {self.timeout}s;" if self.timeout else ""
        return f"{{ {typ}{flags}{timeout} }}"

    def element(self, key: str, value: str | None) -> str:
        """How nft writes an element (`value` None: the key alone, for a delete)."""
        k = f'"{key}"' if self.type == "ifname" else key
        return f"{k} : {value}" if self.kind == "map" and value is not None else k


def _chain_equal(want: Chain, have: Chain) -> bool:
    return want.tagged() == have


def _canon_elem(obj: Obj, raw: Any) -> str:
    """An element as nft's JSON lists it, in the form we write it."""
    if isinstance(raw, dict) and "prefix" in raw:
        return str(ipaddress.ip_network(f"{raw['prefix']['addr']}/{raw['prefix']['len']}"))
    if isinstance(raw, dict) and "range" in raw:
        return "-".join(str(x) for x in raw["range"])
    if isinstance(raw, dict) and "elem" in raw:
        return _canon_elem(obj, raw["elem"]["val"])
    if isinstance(raw, dict) and "concat" in raw:  # `10.0.0.1 . tcp . 80`
        return " . ".join(_canon_part(x) for x in raw["concat"])
    if obj.type.endswith("_addr") and "interval" in obj.flags:
        return str(ipaddress.ip_network(raw))
    if obj.type.endswith("_addr"):
        return str(ipaddress.ip_address(raw))
    return str(raw)


def _canon_part(raw: Any) -> str:
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(raw))
    return str(raw)


def _canon_verdict(raw: Any) -> str:
    if isinstance(raw, dict):
        (verb, arg), = raw.items()
        return f"{verb} {arg['target']}" if isinstance(arg, dict) else verb
    return str(raw)


class NftTable:
    """One table tortie owns whole: what we want in it, what it holds, the difference."""

    def __init__(self, family: str, name: str) -> None:
        self.family, self.name = family, name
        self.ref = f"{family} {name}"
        self.want = False  # whether the table should exist at all
        self.present: bool | None = None  # in the kernel; None: unknown, list it first
        self.objects: DeltaTracker[str, Obj] = DeltaTracker()
        self.chains: DeltaTracker[str, Chain] = DeltaTracker(_chain_equal)
        self.elements: DeltaTracker[tuple[str, str], str] = DeltaTracker()
        self._members: dict[str, dict[str, str]] = {}  # set_elements' sets: name -> elements


    # -- desired -------------------------------------------------------------------------
    def set_elements(self, set_name: str, values: dict[str, str]) -> None:
        """All elements of one set or map at once ({key: value}; "" for a set). Only what
        differs from the last call for that set is touched (a set's elements are kept by
        this method alone)."""
        current = self._members.pop(set_name, {})
        for k in current.keys() - values.keys():
            self.elements.delete_desired((set_name, k))
        for k, v in values.items():
            if current.get(k) != v:
                self.elements.set_desired((set_name, k), v)
        if values:
            self._members[set_name] = dict(values)

    @property
    def dirty(self) -> bool:
        if self.present is None:
            return True
        if not self.want:
            return self.present
        return not (self.present and self.objects.in_sync and self.chains.in_sync and self.elements.in_sync)

    def resync(self) -> None:
        self.present = None

    # -- actual --------------------------------------------------------------------------
    def load(self, listing: list[dict] | None) -> None:
        """The table as nft listed it (JSON objects) becomes the actual side."""
        self.present = listing is not None
        objects: dict[str, Obj] = {}
        chains: dict[str, Chain] = {}
        rules: dict[str, list[str]] = {}
        elements: dict[tuple[str, str], str] = {}
        for item in listing or ():
            (kind, o), = item.items()
            if kind == "chain":
                base = Base(o["type"], o["hook"], o["prio"], o.get("policy", "accept")) if "hook" in o else None
                chains[o["name"]] = Chain((), base)
                rules.setdefault(o["name"], [])
            elif kind == "rule":
                rules.setdefault(o["chain"], []).append(o.get("comment", ""))
            elif kind in ("set", "map", "counter") and not o["name"].startswith("__"):
                typ, flags = o.get("type", ""), o.get("flags", ())
                obj = Obj(kind, typ if isinstance(typ, str) else " . ".join(typ), o.get("map", ""),
                          (flags,) if isinstance(flags, str) else tuple(flags), o.get("timeout", 0))
                objects[o["name"]] = obj
                want = self.objects.desired.get(o["name"])
                # a dynamic set's elements are the packet path's (affinity), never ours to diff
                if kind != "counter" and want is not None and want == obj and "dynamic" not in obj.flags:
                    for raw in o.get("elem", ()):
                        if kind == "map":
                            k, v = _canon_elem(obj, raw[0]), _canon_verdict(raw[1])
                        else:
                            k, v = _canon_elem(obj, raw), ""
                        elements[(o["name"], k)] = v
        for name, tags in rules.items():
            if name in chains:
                chains[name] = Chain(tuple(tags), chains[name].base)
        self.objects.replace_actual(objects)
        self.chains.replace_actual(chains)
        self.elements.replace_actual(elements)

    def _forget_actual(self) -> None:
        for tracker in (self.objects, self.chains, self.elements):
            tracker.replace_actual({})

    # -- the transaction -----------------------------------------------------------------
    def script(self) -> str:
        """The commands that make the kernel's table what we want, in an order nft accepts:
        declarations before use, references gone before what they reference."""
        t = self.ref
        if not self.want:
            return f"delete table {t}\n" if self.present else ""
        out: list[str] = []
        objs, chains, elems = self.objects, self.chains, self.elements
        # A set's type or a base chain's hook cannot change in place: the table is rebuilt.
        if self.present and (any(k in objs.actual for k in objs.pending_updates)
                             or any(k in chains.actual and chains.actual[k].base != v.base
                                    for k, v in chains.pending_updates.items())):
            log.warning("table cannot be repaired in place; replacing it whole", table=t)
            out.append(f"delete table {t}")
            self.present = False
            self._forget_actual()
        if not self.present:
            out.append(f"add table {t}")
        for name, obj in objs.pending_updates.items():
            out.append(f"add {obj.kind} {t} {name} {obj.spec()}".rstrip())
        for name, chain in chains.pending_updates.items():
            if name not in chains.actual:
                out.append(f"add chain {t} {name}" + (f" {{ {chain.base.spec()} }}" if chain.base else ""))
        for name, chain in chains.pending_updates.items():
            if name in chains.actual:
                out.append(f"flush chain {t} {name}")
            out += (f'add rule {t} {name} {r} comment "{rule_tag(r)}"' for r in chain.rules)
        stale = [k for k in elems.pending_deletions if k[0] in objs.desired]  # else the set goes whole
        stale += [k for k in elems.pending_updates if k in elems.actual]
        out += self._elements("delete", stale, lambda k: None)
        out += self._elements("add", list(elems.pending_updates), lambda k: elems.desired[k])
        gone = list(chains.pending_deletions)
        out += (f"flush chain {t} {n}" for n in gone if chains.actual[n].rules)
        out += (f"delete chain {t} {n}" for n in gone)
        out += (f"delete {objs.actual[n].kind} {t} {n}" for n in objs.pending_deletions)
        return "".join(line + "\n" for line in out)

    def _elements(self, verb: str, keys: Iterable[tuple[str, str]],
                  value: Callable[[tuple[str, str]], str | None]) -> list[str]:
        by_set: dict[str, list[str]] = {}
        for key in sorted(keys):
            obj = self.objects.desired[key[0]]
            by_set.setdefault(key[0], []).append(obj.element(key[1], value(key)))
        return [f"{verb} element {self.ref} {s} {{ {', '.join(items)} }}" for s, items in by_set.items()]

    def _mark_written(self) -> None:
        if not self.want:
            self.present = False
            self._forget_actual()
            return
        self.present = True
        for tracker in (self.objects, self.elements):
            for key in list(tracker.pending_updates):
                tracker.mark_written(key)
            for key in list(tracker.pending_deletions):
                tracker.mark_deleted(key)
        for key, chain in list(self.chains.pending_updates.items()):
            self.chains.mark_written(key, chain.tagged())
        for key in list(self.chains.pending_deletions):
            self.chains.mark_deleted(key)


def apply_tables(nft: Nft, tables: Iterable[NftTable]) -> bool:
    """Every table's difference in ONE transaction; whether anything was written.

    A rejected transaction changes nothing (nft's all-or-nothing); what we believe about
    the kernel is then re-read on the next apply, so a retry repairs from the truth.
    """
    tables = list(tables)
    for table in tables:
        if table.present is None:
            table.load(nft.list_table(table.family, table.name))
    dirty = [t for t in tables if t.dirty]
    if not dirty:
        return False
    script = "".join(t.script() for t in dirty)
    try:
        nft.run(script)
    except DataplaneError:
        for table in tables:
            table.present = None
        raise
    for table in dirty:
        table._mark_written()
    return True


class TablesManager:
    """What the nftables managers share (`tortie.dataplane.Manager`): their tables, written
    in one transaction per apply, through a libnftables context opened on first use."""

    name = "nftables"

    def __init__(self, tables: Iterable[NftTable], nft: Nft | None = None, netns: str | None = None) -> None:
        self.tables = list(tables)
        self.netns = netns
        self._nft = nft
        self.transactions = 0  # written so far (a resync that finds nothing to repair writes none)

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft(self.netns)
        return self._nft

    @property
    def dirty(self) -> bool:
        return any(t.dirty for t in self.tables)

    def apply(self) -> None:
        """One transaction with what changed; DataplaneError when nft refused it (retry-safe)."""
        if apply_tables(self.nft, self.tables):
            self.transactions += 1
            self.applied()

    def applied(self) -> None:
        """Called after a transaction was written (for a log line)."""

    def resync(self) -> None:
        for table in self.tables:
            table.resync()


# --- the monitor --------------------------------------------------------------------------


def _own_commit(port: int, pid: int) -> bool:
    """Whether a commit came from one of our Nft contexts (by port) or threads (by id)."""
    return (port in _OWN_PORTS or pid == os.getpid() or pid in _COMMITTERS
            or os.path.exists(f"/proc/self/task/{pid}"))


def nfnl_messages(data: bytes, mtype: int) -> list[tuple[int, dict[int, bytes]]]:
    """(netlink port, attributes by type) of every nfnetlink message of `mtype` in one read."""
    out = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, port = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size:
            break
        if kind == mtype:
            attrs: dict[int, bytes] = {}
            a = off + NLMSG_HDR.size + NFGENMSG_LEN
            end = off + length
            while a + NLA_HDR.size <= end:
                alen, atype = NLA_HDR.unpack_from(data, a)
                if alen < NLA_HDR.size:
                    break
                attrs[atype & 0x3FFF] = data[a + NLA_HDR.size:a + alen]
                a += (alen + 3) & ~3
            out.append((port, attrs))
        off += (length + 3) & ~3
    return out


def parse_newgen(data: bytes) -> list[tuple[int, int, str, int]]:
    """(generation id, committing pid, process name, netlink port) of every NFT_MSG_NEWGEN."""
    out = []
    for port, attrs in nfnl_messages(data, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN):
        gen = struct.unpack(">I", attrs[NFTA_GEN_ID])[0] if NFTA_GEN_ID in attrs else 0
        pid = struct.unpack(">I", attrs[NFTA_GEN_PROC_PID])[0] if NFTA_GEN_PROC_PID in attrs else 0
        name = attrs.get(NFTA_GEN_PROC_NAME, b"").rstrip(b"\0").decode(errors="replace")
        out.append((gen, pid, name, port))
    return out


class NftMonitor:
    """Every nftables commit in a namespace, ours told apart from anyone else's.

    The kernel ends each committed transaction with NFT_MSG_NEWGEN naming the committing
    socket's port and task; ours (an `Nft` of this process, or any of our threads) are
    ignored, so our own writes never cost a listing. A lost notification (ENOBUFS) counts
    as foreign.
    """

    def __init__(self, netns: str | None = None) -> None:
        def make() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)

        if netns is None:
            self.sock = make()
        else:
            from tortie.lab.nsutil import in_netns

            with in_netns(netns):
                self.sock = make()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self.foreign: list[tuple[int, int, str, int]] = []  # the last drain's foreign commits
        self.commits: list[tuple[int, int, str, int]] = []  # all the last drain saw

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read everything queued; True if someone else changed the ruleset."""
        self.foreign = []
        self.commits = []
        lost = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: notifications were dropped; assume the worst
                log.warning("nftables notifications lost", error=str(exc))
                lost = True
                continue
            if not data:
                break
            commits = parse_newgen(data)
            self.commits += commits
            self.foreign += [c for c in commits if not _own_commit(c[3], c[1])]
        if self.foreign:
            log.info("foreign nftables change", commits=[f"{n}[{p}] gen {g}" for g, p, n, _ in self.foreign])
        return lost or bool(self.foreign)

    def close(self) -> None:
        self.sock.close()
