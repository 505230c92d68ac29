"""IPAM values: allocation blocks and handle records (their keys: `datastore.keys`). Pure, no I/O.

A block is a power-of-two slice of a pool that one node claims as a whole (its
affinity). It holds, per address, either None (free) or an index into its list of
attributes (handle, namespace, pod, node), so the handful of pods that share a block
share few attribute entries. A handle record counts what one handle holds in each
block, so release by handle reads only those blocks. Both are rewritten together, in
one etcd transaction guarded by both revisions, so they never disagree.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

from tortie.errors import ValidationError

DEFAULT_NETWORK = "k8s-pod-network"  # the network of a handle `<network>.<containerID>`
PENDING = "pending"
CONFIRMED = "confirmed"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(ip).strip())
    except ValueError:
        raise ValidationError(f"{ip!r} is not an IP address", field="ip") from None


def block_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, pool_cidr: str, block_size: int) -> str:
    """The CIDR of the block of a pool that contains ip."""
    net = ipaddress.ip_network(pool_cidr)
    size = max(block_size, net.prefixlen)
    return str(ipaddress.ip_network(f"{ip}/{size}", strict=False))


def candidate_blocks(pool_cidr: str, block_size: int, start: int) -> tuple[int, Callable[[int], str]]:
    """(number of blocks in the pool, i -> CIDR of the i-th block counted from start)."""
    net = ipaddress.ip_network(pool_cidr)
    size = max(block_size, net.prefixlen)
    count = 1 << (size - net.prefixlen)
    step = 1 << (net.max_prefixlen - size)
    base = int(net.network_address)
    cls = type(net.network_address)

    def nth(i: int) -> str:
        return f"{cls(base + ((start + i) % count) * step)}/{size}"

    return count, nth


@dataclass(frozen=True)
class Attr:
    """Who holds an address: the handle, and the pod and node it was allocated for."""

    handle: str
    namespace: str = ""
    pod: str = ""
    node: str = ""

    def to_dict(self) -> dict:
        return {"handle": self.handle, "namespace": self.namespace, "pod": self.pod, "node": self.node}

    @classmethod
    def from_dict(cls, d: dict) -> Attr:
        return cls(d.get("handle", ""), d.get("namespace", ""), d.get("pod", ""), d.get("node", ""))


@dataclass(frozen=True)
class Held:
    """One allocated address of a block."""

    ip: str
    block: str
    attr: Attr


@dataclass(frozen=True)
class Block:
    cidr: str
    pool: str
    affinity: str | None  # "host:<node>", or None once the node is gone
    state: str  # PENDING while being claimed: never allocated from, never advertised
    allocations: tuple[int | None, ...]
    attributes: tuple[Attr, ...] = ()
    seq: int = 0
    claimed_at: float = 0.0

    @classmethod
    def new(cls, cidr: str, pool: str, node: str, now: float) -> Block:
        size = ipaddress.ip_network(cidr).num_addresses
        return cls(cidr, pool, f"host:{node}", PENDING, (None,) * size, (), 0, now)

    # --- views -----------------------------------------------------------------------

    @cached_property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def node(self) -> str | None:
        if self.affinity and self.affinity.startswith("host:"):
            return self.affinity[5:]
        return None

    @property
    def confirmed(self) -> bool:
        return self.state == CONFIRMED

    @property
    def total(self) -> int:
        return len(self.allocations)

    @cached_property
    def in_use(self) -> int:
        return len(self.allocations) - self.allocations.count(None)

    @property
    def free(self) -> int:
        return self.total - self.in_use

    def ip_at(self, index: int) -> str:
        return str(self.network.network_address + index)

    def index_of(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
        if ip.version != self.network.version or ip not in self.network:
            return None
        return int(ip) - int(self.network.network_address)

    def held(self) -> list[Held]:
        return [Held(self.ip_at(i), self.cidr, self.attributes[a])
                for i, a in enumerate(self.allocations) if a is not None]

    def attr_at(self, index: int) -> Attr | None:
        a = self.allocations[index]
        return None if a is None else self.attributes[a]

    # --- changes (each returns a new block) --------------------------------------------

    def confirm(self) -> Block:
        return replace(self, state=CONFIRMED, seq=self.seq + 1)

    def without_affinity(self) -> Block:
        return replace(self, affinity=None, seq=self.seq + 1)

    def assign(self, indexes: Iterable[int], attr: Attr) -> Block:
        """Mark these (free) addresses as held by attr."""
        attrs = list(self.attributes)
        try:
            slot = attrs.index(attr)
        except ValueError:
            attrs.append(attr)
            slot = len(attrs) - 1
        allocs = list(self.allocations)
        for i in indexes:
            if allocs[i] is not None:
                raise ValueError(f"{self.ip_at(i)} is already allocated")
            allocs[i] = slot
        return replace(self, allocations=tuple(allocs), attributes=tuple(attrs), seq=self.seq + 1)

    def allocate(self, count: int, attr: Attr) -> tuple[Block, list[str]]:
        """Take up to count free addresses, lowest first."""
        free: list[int] = []
        i = 0
        try:
            while len(free) < count:  # tuple.index runs in C: blocks hold up to 4096 addresses
                i = self.allocations.index(None, i)
                free.append(i)
                i += 1
        except ValueError:
            pass
        return self.assign(free, attr), [self.ip_at(i) for i in free]

    def release(self, pred: Callable[[int, Attr], bool]) -> tuple[Block, list[Held]]:
        """Free every address for which pred(index, attr) holds; unused attributes are dropped."""
        freed: list[Held] = []
        allocs = list(self.allocations)
        for i, a in enumerate(allocs):
            if a is not None and pred(i, self.attributes[a]):
                freed.append(Held(self.ip_at(i), self.cidr, self.attributes[a]))
                allocs[i] = None
        if not freed:
            return self, []
        used = sorted({a for a in allocs if a is not None})
        renumber = {old: new for new, old in enumerate(used)}
        allocs = [None if a is None else renumber[a] for a in allocs]
        attrs = tuple(self.attributes[old] for old in used)
        return replace(self, allocations=tuple(allocs), attributes=attrs, seq=self.seq + 1), freed

    # --- wire format -------------------------------------------------------------------

    def to_json(self) -> bytes:
        return json.dumps({
            "cidr": self.cidr, "pool": self.pool, "affinity": self.affinity, "state": self.state,
            "allocations": list(self.allocations), "attributes": [a.to_dict() for a in self.attributes],
            "seq": self.seq, "claimedAt": self.claimed_at,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Block:
        d = json.loads(raw)
        return cls(d["cidr"], d.get("pool", ""), d.get("affinity"), d.get("state", CONFIRMED),
                   tuple(d["allocations"]), tuple(Attr.from_dict(a) for a in d.get("attributes", ())),
                   int(d.get("seq", 0)), float(d.get("claimedAt", 0.0)))


@dataclass(frozen=True)
class HandleRecord:
    """What one handle holds: block CIDR -> number of addresses."""

    handle: str
    blocks: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(self.blocks.values())

    def changed(self, cidr: str, delta: int) -> HandleRecord:
        blocks = dict(self.blocks)
        n = blocks.get(cidr, 0) + delta
        if n > 0:
            blocks[cidr] = n
        else:
            blocks.pop(cidr, None)
        return HandleRecord(self.handle, blocks)

    def to_json(self) -> bytes:
        return json.dumps({"handle": self.handle, "blocks": self.blocks}, separators=(",", ":"),
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> HandleRecord:
        d = json.loads(raw)
        return cls(d["handle"], {k: int(v) for k, v in d.get("blocks", {}).items()})


def affinity_value(state: str) -> bytes:
    return json.dumps({"state": state}).encode()


@dataclass(frozen=True)
class BlockInfo:
    cidr: str
    pool: str
    node: str | None
    confirmed: bool
    allocated: int
    total: int


@dataclass(frozen=True)
class Config:
    strict_affinity: bool = False
    max_blocks_per_host: int = 0  # 0: no limit
    auto_allocate_blocks: bool = True  # False: only blocks claimed otherwise (assign_ip) and borrowing


def net_key(cidr: str) -> tuple[int, int, int]:
    """Sort key: family, then address, then prefix length."""
    net = ipaddress.ip_network(cidr)
    return net.version, int(net.network_address), net.prefixlen


def usage_report(pools: Iterable, blocks: list[Block]) -> dict:
    """Per pool (`res.IPPool`, in the order given) and per block: total, in_use, free
    (numbers); what `IPAM.usage()` returns."""
    out = []
    for pool in pools:
        mine = [b for b in blocks if b.pool == pool.name]
        total = ipaddress.ip_network(pool.cidr).num_addresses
        in_use = sum(b.in_use for b in mine)
        out.append({"name": pool.name, "cidr": pool.cidr, "blockSize": pool.block_size,
                    "disabled": pool.disabled, "total": total, "in_use": in_use,
                    "free": total - in_use, "blocks": len(mine)})
    return {
        "pools": out,
        "blocks": [{"cidr": b.cidr, "pool": b.pool, "node": b.node, "state": b.state,
                    "total": b.total, "in_use": b.in_use, "free": b.free}
                   for b in sorted(blocks, key=lambda b: net_key(b.cidr))],
    }


def wep_handle(spec: dict) -> str | None:
    """The IPAM handle of a WorkloadEndpoint spec: its `ipamHandle` (written by the CNI
    server, whatever the network's name), else -- for an endpoint written without one --
    `<default network>.<containerID>`; None when it names neither."""
    if spec.get("ipamHandle"):
        return str(spec["ipamHandle"])
    return f"{DEFAULT_NETWORK}.{spec['containerID']}" if spec.get("containerID") else None


TUNNEL_HANDLE = "vxlan-tunnel-addr-"  # + node: a node's VTEP address (Calico's handle name)


def tunnel_handle(node: str) -> str:
    return TUNNEL_HANDLE + node


def tunnel_node(handle: str) -> str | None:
    """The node whose VTEP address this handle holds (None: not a tunnel handle)."""
    return handle[len(TUNNEL_HANDLE):] if handle.startswith(TUNNEL_HANDLE) else None


def check_name(value: str, what: str) -> None:
    if not value or not isinstance(value, str) or "/" in value or value.strip() != value:
        raise ValidationError(f"{value!r} is not a valid {what} (non-empty, no '/', no spaces)", field=what)
