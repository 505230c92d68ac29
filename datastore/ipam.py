"""IP address management with Calico's semantics, on etcd.

Nodes claim whole blocks of a pool (an affinity) and hand out addresses from them;
when a node may claim no more blocks it borrows single addresses from other nodes'
blocks unless strictAffinity is set. Every allocation carries a handle
(`<network>.<containerID>`) so release by handle frees exactly what was taken.

Crash safety: every write is one etcd transaction, so a process killed between any
two etcd calls leaves a consistent store:

- allocate / release: one transaction rewrites the block and the handle record,
  guarded by both revisions (and, for allocation, by the pool, node and IPAMConfig
  revisions it decided on). An address is never handed out twice; the handle record
  always matches the blocks.
- claim: (1) block and affinity created `pending`, guarded "absent"; (2) both set
  `confirmed`. A pending block is never allocated from or advertised. A pending claim
  left by a dead process is adopted by the next claim of the same node, and reported
  by `check` (and removed by `release_from_report`) once older than a grace period.
- A killed allocator leaks at worst an allocation whose handle has no
  WorkloadEndpoint; `check` reports it and `release_from_report` frees it.

The fast path (a node allocating from a block it already holds) is one transaction
and no reads: the node's blocks, the handle record and the pool/node/config
revisions are cached, and a stale cache simply fails a guard and is re-read.
"""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tortie.datastore import keys, selector
from tortie.datastore import resources as res
from tortie.datastore.etcd import EtcdClient, Txn
from tortie.datastore.ipam_blocks import (
    CONFIRMED,
    DEFAULT_NETWORK,
    PENDING,
    Attr,
    Block,
    BlockInfo,
    Config,
    HandleRecord,
    Held,
    affinity_value,
    block_of,
    candidate_blocks,
    check_name,
    net_key,
    parse_ip,
    usage_report,
)
from tortie.datastore.ipam_check import build_report, release_report, wep_handles
from tortie.datastore.ipam_config import changed_config, read_config
from tortie.datastore.store import decode
from tortie.errors import (
    AlreadyExists,
    Conflict,
    IPAMError,
    PoolExhausted,
    TortieError,
    ValidationError,
)
from tortie.log import get_logger

log = get_logger("ipam")

PENDING_GRACE = 30.0  # seconds before a pending claim counts as abandoned
_ATTEMPTS = 100


@dataclass(frozen=True)
class _Ctx:
    """What an allocation for one node decides on, with the revisions that guard it."""

    pools: tuple[res.IPPool, ...]
    pool_revs: dict[str, int]
    config: Config
    config_rev: int
    labels: dict[str, str]
    node_rev: int


def _version(pool: res.IPPool) -> int:
    return ipaddress.ip_network(pool.cidr).version


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.0005 * (2 ** min(attempt, 7)), 0.05)))


class IPAM:
    """Address management for every node, against one etcd client. Thread-safe."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        p = self._prefix = client.config.prefix
        self._blocks = p + keys.IPAM_BLOCKS
        self._pools_prefix = p + res.kind_for("ippool").prefix()
        self._nodes_prefix = p + res.kind_for("node").prefix()
        self._weps_prefix = p + res.kind_for("workloadendpoint").prefix()
        self._config_key = p + res.key_for(res.kind_for("ipamconfig"), "default")
        self._lock = threading.RLock()
        self._ctx: dict[str, _Ctx] = {}
        self._own: dict[str, dict[str, tuple[Block, int]]] = {}  # node -> cidr -> (block, rev)
        self._hcache: dict[str, tuple[HandleRecord, int]] = {}

    # --- keys ---------------------------------------------------------------------------

    def _bkey(self, cidr: str) -> str:
        return self._prefix + keys.block_key(cidr)

    def _akey(self, node: str, cidr: str) -> str:
        return self._prefix + keys.affinity_key(node, cidr)

    def _hkey(self, handle: str) -> str:
        return self._prefix + keys.handle_key(handle)

    def _pool_key(self, name: str) -> str:
        return self._prefix + res.key_for(res.kind_for("ippool"), name)

    def _node_key(self, node: str) -> str:
        return self._prefix + res.key_for(res.kind_for("node"), node)

    # --- reads ----------------------------------------------------------------------------

    def _read_ctx(self, node: str) -> _Ctx:
        kvs, _ = self.client.get_prefix(self._pools_prefix)
        pools, revs = [], {}
        for kv in kvs:
            try:
                pool = res.IPPool.from_resource(decode(kv.value, kv.mod_revision))
            except (TortieError, ValueError, KeyError, TypeError) as exc:
                log.warning("invalid IPPool ignored", key=kv.key, error=str(exc))
                continue
            pools.append(pool)
            revs[pool.name] = kv.mod_revision
        pools.sort(key=lambda p: p.name)
        cfg_kv = self.client.get(self._config_key)
        config = read_config(cfg_kv)
        node_kv = self.client.get(self._node_key(node)) if node else None
        labels: dict[str, str] = {}
        if node_kv is not None:
            try:
                labels = dict(json.loads(node_kv.value)["metadata"].get("labels") or {})
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("unreadable Node resource", node=node)
        ctx = _Ctx(tuple(pools), revs, config, cfg_kv.mod_revision if cfg_kv else 0, labels,
                   node_kv.mod_revision if node_kv else 0)
        self._ctx[node] = ctx
        return ctx

    def _context(self, node: str) -> _Ctx:
        return self._ctx.get(node) or self._read_ctx(node)

    def _read_own(self, node: str) -> dict[str, tuple[Block, int]]:
        kvs, _ = self.client.get_prefix(self._prefix + keys.affinity_prefix(node))
        own: dict[str, tuple[Block, int]] = {}
        for kv in kvs:
            parsed = keys.parse_affinity(kv.key[len(self._prefix):])
            if parsed is None:
                continue
            cidr = parsed[1]
            bkv = self.client.get(self._bkey(cidr))
            if bkv is None:
                continue
            block = Block.from_json(bkv.value)
            if block.node == node:
                own[cidr] = (block, bkv.mod_revision)
        self._own[node] = own
        return own

    def _read_handle(self, handle: str) -> tuple[HandleRecord, int]:
        kv = self.client.get(self._hkey(handle))
        got = (HandleRecord.from_json(kv.value), kv.mod_revision) if kv else (HandleRecord(handle), 0)
        self._remember_handle(handle, got)
        return got

    def _remember_handle(self, handle: str, got: tuple[HandleRecord, int] | None) -> None:
        if got is None:
            self._hcache.pop(handle, None)
            return
        if len(self._hcache) > 4096:
            self._hcache.clear()
        self._hcache[handle] = got

    def _all_blocks(self) -> list[tuple[Block, int]]:
        kvs, _ = self.client.get_prefix(self._blocks)
        return [(Block.from_json(kv.value), kv.mod_revision) for kv in kvs]

    def _refresh(self, node: str, handle: str | None) -> _Ctx:
        ctx = self._read_ctx(node)
        self._read_own(node)
        if handle is not None:
            self._read_handle(handle)
        return ctx

    # --- pool choice -------------------------------------------------------------------------

    @staticmethod
    def _usable(ctx: _Ctx, version: int, requested: list[str] | None) -> list[res.IPPool]:
        """Enabled pools of this family for the node. A pool asked for by name or CIDR
        is used whatever its nodeSelector says (as in Calico); a disabled one never is."""
        out = []
        for pool in ctx.pools:
            if pool.disabled or not pool.for_workloads or _version(pool) != version:
                continue
            if requested is not None:
                if pool.name in requested or pool.cidr in requested:
                    out.append(pool)
            elif selector.parse(pool.node_selector).matches(ctx.labels):
                out.append(pool)
        return out

    def _guards(self, txn: Txn, ctx: _Ctx, node: str, pool: str, config: bool) -> Txn:
        txn.guard(self._pool_key(pool), ctx.pool_revs[pool]).guard(self._node_key(node), ctx.node_rev)
        if config:
            txn.guard(self._config_key, ctx.config_rev)
        return txn

    # --- allocation ------------------------------------------------------------------------------

    def auto_assign(self, handle: str, node: str, *, num_v4: int = 1, num_v6: int = 0,
                    pools: list[str] | dict[int, list[str] | None] | None = None,
                    attrs: dict | None = None) -> list[str]:
        """Allocate num_v4 IPv4 and num_v6 IPv6 addresses for handle on node. `pools`: a
        list for both families, or per IP version (Calico's ipv4_pools / ipv6_pools: a
        version without its list takes the node's pools of that version).

        All or nothing: if a family cannot be served, what this call took is given back
        and PoolExhausted is raised.
        """
        check_name(handle, "handle")
        check_name(node, "node")
        if num_v4 < 0 or num_v6 < 0:
            raise ValidationError("address counts must not be negative", field="num")
        attrs = attrs or {}
        attr = Attr(handle, str(attrs.get("namespace", "")), str(attrs.get("pod", "")), node)
        got: list[str] = []
        with self._lock:
            try:
                for version, n in ((4, num_v4), (6, num_v6)):
                    if n:
                        self._assign_family(attr, node, version, n,
                                            pools.get(version) if isinstance(pools, dict) else pools, got)
            except Exception:
                if got:
                    try:
                        self.release_ips(got)
                    except TortieError as exc:  # the handle still holds them: DEL frees them
                        log.warning("rollback failed", handle=handle, error=str(exc))
                raise
        log.debug("assigned", handle=handle, node=node, ips=got)
        return got

    def _assign_family(self, attr: Attr, node: str, version: int, n: int,
                       requested: list[str] | None, out: list[str]) -> None:
        """Append n addresses of this family to out (as they are taken, so that a
        failure part way rolls back what was taken)."""
        got: list[str] = []
        fresh = False  # read everything from etcd during this call
        for attempt in range(_ATTEMPTS):
            if len(got) == n:
                return
            ctx = self._context(node)
            usable = self._usable(ctx, version, requested)
            names = {p.name for p in usable}
            own = self._own.get(node)
            if own is None:
                own = self._read_own(node)
            mine = sorted((b for b in own.values() if b[0].confirmed and b[0].pool in names and b[0].free),
                          key=lambda b: b[0].network)
            if mine:
                block, rev = mine[0]
                ips = self._allocate_in(block, rev, n - len(got), attr, ctx, node, borrowing=False)
                if ips is None:
                    self._refresh(node, attr.handle)
                    fresh = True
                    _backoff(attempt)
                else:
                    got += ips
                    out += ips
                continue
            if not fresh:
                self._refresh(node, attr.handle)
                fresh = True
                continue
            if not usable:
                raise PoolExhausted(f"no enabled IPv{version} pool selects node {node}"
                                    + (f" among {requested}" if requested else ""))
            # our own claim that a dead process left half done: finish it (before the
            # limit check, since it already counts against maxBlocksPerHost)
            pending = [b for b in own.values() if b[0].state == PENDING and b[0].pool in names]
            if pending:
                if not self._confirm(*pending[0], node):
                    self._refresh(node, attr.handle)
                    _backoff(attempt)
                continue
            limit = ctx.config.max_blocks_per_host
            held = sum(1 for b, _ in own.values() if b.network.version == version)
            if ctx.config.auto_allocate_blocks and (not limit or held < limit):
                outcome = self._claim_any(node, ctx, usable)
                if outcome == "claimed":
                    continue
                if outcome == "conflict":
                    self._refresh(node, attr.handle)
                    _backoff(attempt)
                    continue
            if not ctx.config.strict_affinity:
                ips = self._borrow(attr, node, ctx, names, n - len(got))
                if ips is None:
                    self._refresh(node, attr.handle)
                    _backoff(attempt)
                    continue
                if ips:
                    got += ips
                    out += ips
                    continue
            why = "strictAffinity forbids borrowing" if ctx.config.strict_affinity else "no free address"
            raise PoolExhausted(f"IPv{version} pools {sorted(names)} exhausted for node {node}"
                                f" ({why}; {len(own)} blocks held, maxBlocksPerHost {limit or 'unlimited'})")
        raise Conflict(f"gave up allocating for {attr.handle} after {_ATTEMPTS} conflicting writes")

    def _allocate_in(self, block: Block, rev: int, count: int, attr: Attr, ctx: _Ctx, node: str,
                     borrowing: bool) -> list[str] | None:
        """One transaction: block and handle record together. None on a lost race."""
        hrec, hrev = self._hcache.get(attr.handle) or (HandleRecord(attr.handle), 0)
        new, ips = block.allocate(count, attr)
        hnew = hrec.changed(block.cidr, len(ips))
        txn = Txn().guard(self._bkey(block.cidr), rev).guard(self._hkey(attr.handle), hrev)
        self._guards(txn, ctx, node, block.pool, config=borrowing)
        txn.put(self._bkey(block.cidr), new.to_json()).put(self._hkey(attr.handle), hnew.to_json())
        ok, revision = self.client.transaction(txn)
        if not ok:
            self._remember_handle(attr.handle, None)
            return None
        if new.node is not None and new.node in self._own:
            self._own[new.node][new.cidr] = (new, revision)
        self._remember_handle(attr.handle, (hnew, revision))
        return ips

    def _borrow(self, attr: Attr, node: str, ctx: _Ctx, pools: set[str], count: int) -> list[str] | None:
        """Addresses from a confirmed block affine to another node (or to none).
        [] when there is none to borrow, None on a lost race."""
        cands = [(b, r) for b, r in self._all_blocks()
                 if b.confirmed and b.pool in pools and b.node != node and b.free]
        if not cands:
            return []
        block, rev = random.choice(cands)  # spread borrowers over blocks
        ips = self._allocate_in(block, rev, count, attr, ctx, node, borrowing=True)
        if ips:
            log.info("borrowed", handle=attr.handle, node=node, block=block.cidr, owner=block.node, ips=ips)
        return ips

    # --- block claims -----------------------------------------------------------------------------

    def _claim_any(self, node: str, ctx: _Ctx, pools: list[res.IPPool]) -> str:
        """Claim a block of the first usable pool with room: 'claimed', 'conflict' or 'none'."""
        blocks = self._all_blocks()
        taken = {b.cidr for b, _ in blocks}
        for pool in pools:
            count, nth = candidate_blocks(pool.cidr, pool.block_size, 0)
            start = random.randrange(count)
            net = ipaddress.ip_network(pool.cidr)
            inside = [b.network for b, _ in blocks if b.network.version == net.version and b.network.overlaps(net)]
            # blocks of another size (left from an earlier pool on this range) may cover
            # candidates under other names; without them, among len(inside)+1 distinct
            # candidates at least one is free
            odd = [n for n in inside if n.prefixlen != max(pool.block_size, net.prefixlen)]
            tries = min(count, len(inside) + 1 + (1 << 16 if odd else 0))
            for i in range(tries):
                cidr = nth(start + i)
                if cidr in taken or (odd and any(ipaddress.ip_network(cidr).overlaps(o) for o in odd)):
                    continue
                return "claimed" if self._claim(node, ctx, pool, cidr) else "conflict"
        return "none"

    def _claim(self, node: str, ctx: _Ctx, pool: res.IPPool, cidr: str) -> bool:
        block = Block.new(cidr, pool.name, node, time.time())
        txn = Txn().guard(self._bkey(cidr), 0).guard(self._akey(node, cidr), 0)
        self._guards(txn, ctx, node, pool.name, config=True)
        txn.put(self._bkey(cidr), block.to_json()).put(self._akey(node, cidr), affinity_value(PENDING))
        ok, revision = self.client.transaction(txn)
        if not ok:
            return False
        # A crash here leaves a pending claim: unused, unadvertised, adopted or reported later.
        return self._confirm(block, revision, node, affinity_rev=revision)

    def _confirm(self, block: Block, rev: int, node: str, affinity_rev: int | None = None) -> bool:
        akey = self._akey(node, block.cidr)
        if affinity_rev is None:
            kv = self.client.get(akey)
            affinity_rev = kv.mod_revision if kv else 0
        new = block.confirm()
        txn = Txn().guard(self._bkey(block.cidr), rev).guard(akey, affinity_rev)
        txn.put(self._bkey(block.cidr), new.to_json()).put(akey, affinity_value(CONFIRMED))
        ok, revision = self.client.transaction(txn)
        if ok:
            self._own.setdefault(node, {})[block.cidr] = (new, revision)
            log.info("block claimed", node=node, block=block.cidr, pool=block.pool)
        return ok

    # --- a specific address ------------------------------------------------------------------------

    def assign_ip(self, ip: str, handle: str, node: str, attrs: dict | None = None) -> str:
        """Allocate exactly ip to handle. AlreadyExists if taken, ValidationError if no
        enabled pool holds it; its block is claimed for node if nobody holds it yet."""
        check_name(handle, "handle")
        check_name(node, "node")
        addr = parse_ip(ip)
        attrs = attrs or {}
        attr = Attr(handle, str(attrs.get("namespace", "")), str(attrs.get("pod", "")), node)
        with self._lock:
            for attempt in range(_ATTEMPTS):
                ctx = self._read_ctx(node)
                pool = next((p for p in ctx.pools if addr in ipaddress.ip_network(p.cidr)), None)
                if pool is None:
                    raise ValidationError(f"{addr} is not in any IPPool", field="ip")
                if pool.disabled:
                    raise ValidationError(f"{addr} is in disabled IPPool {pool.name}", field="ip")
                if not pool.for_workloads:
                    raise ValidationError(f"{addr} is in IPPool {pool.name}, whose allowedUses exclude Workload",
                                          field="ip")
                cidr = block_of(addr, pool.cidr, pool.block_size)
                found = [(b, r) for b, r in self._all_blocks()
                         if b.network.version == addr.version and b.network.overlaps(ipaddress.ip_network(cidr))]
                holder_block = next(((b, r) for b, r in found if addr in b.network), None)
                if holder_block is None:
                    if found:  # a block of another size, left by an earlier pool, is in the way
                        raise IPAMError(f"block {cidr} for {addr} would overlap block {found[0][0].cidr}")
                    self._claim(node, ctx, pool, cidr)
                    continue
                block, rev = holder_block
                cidr = block.cidr
                if not block.confirmed:
                    if block.node != node:
                        raise IPAMError(f"block {cidr} of {addr} is being claimed by node {block.node}")
                    self._confirm(block, rev, node)
                    continue
                if block.node != node and ctx.config.strict_affinity:
                    raise IPAMError(f"{addr} is in block {cidr} of node {block.node}; "
                                    "strictAffinity forbids borrowing")
                index = block.index_of(addr)
                holder = block.attr_at(index)
                if holder is not None:
                    raise AlreadyExists(f"{addr} is already allocated (handle {holder.handle})")
                hrec, hrev = self._read_handle(handle)
                new = block.assign([index], attr)
                hnew = hrec.changed(cidr, 1)
                txn = Txn().guard(self._bkey(cidr), rev).guard(self._hkey(handle), hrev)
                self._guards(txn, ctx, node, pool.name, config=True)
                txn.put(self._bkey(cidr), new.to_json()).put(self._hkey(handle), hnew.to_json())
                ok, revision = self.client.transaction(txn)
                if ok:
                    self._remember_handle(handle, (hnew, revision))
                    if new.node in self._own:
                        self._own[new.node][cidr] = (new, revision)
                    return str(addr)
                _backoff(attempt)
        raise Conflict(f"gave up assigning {addr} after {_ATTEMPTS} conflicting writes")

    # --- release ---------------------------------------------------------------------------------

    def _release_where(self, cidr: str, pred: Callable[[int, Attr], bool], *,
                       spare_endpoints: bool = False) -> list[Held]:
        """Free what pred selects in one block, in one transaction with the handle records.
        A block left empty is given back: deleted together with its affinity.
        `spare_endpoints`: never free an address whose handle a WorkloadEndpoint names;
        the transaction is guarded by the endpoints as read, so one written meanwhile
        makes it read again (rather than free the address of a pod being set up)."""
        bkey = self._bkey(cidr)
        for attempt in range(_ATTEMPTS):
            kv = self.client.get(bkey)
            if kv is None:
                return []
            block = Block.from_json(kv.value)
            txn = Txn().guard(bkey, kv.mod_revision)
            if spare_endpoints:
                kvs, wep_rev = self.client.get_prefix(self._weps_prefix)
                txn.unchanged_since(self._weps_prefix, wep_rev)
                spared = wep_handles(kvs)
                new, freed = block.release(lambda i, a, p=pred, s=spared: a.handle not in s and p(i, a))
            else:
                new, freed = block.release(pred)
            if not freed:
                return []
            if new.in_use == 0 and new.confirmed:
                txn.delete(bkey)
                if new.node:
                    txn.delete(self._akey(new.node, cidr))
            else:
                txn.put(bkey, new.to_json())
            counts: dict[str, int] = {}
            for h in freed:
                counts[h.attr.handle] = counts.get(h.attr.handle, 0) + 1
            hnews: dict[str, HandleRecord] = {}
            for handle, n in counts.items():
                hkv = self.client.get(self._hkey(handle))
                hrec = HandleRecord.from_json(hkv.value) if hkv else HandleRecord(handle)
                txn.guard(self._hkey(handle), hkv.mod_revision if hkv else 0)
                hnews[handle] = hrec.changed(cidr, -n)
                if hnews[handle].empty:
                    if hkv:
                        txn.delete(self._hkey(handle))
                else:
                    txn.put(self._hkey(handle), hnews[handle].to_json())
            ok, revision = self.client.transaction(txn)
            if ok:
                for handle, hnew in hnews.items():
                    self._remember_handle(handle, None if hnew.empty else (hnew, revision))
                if new.node and new.node in self._own:
                    if txn.deletes and bkey in txn.deletes:
                        self._own[new.node].pop(cidr, None)
                    else:
                        self._own[new.node][cidr] = (new, revision)
                return freed
            _backoff(attempt)
        raise Conflict(f"gave up releasing in block {cidr} after {_ATTEMPTS} conflicting writes")

    def release_handle(self, handle: str) -> list[str]:
        """Free every address the handle holds; the addresses freed (none if it holds none)."""
        check_name(handle, "handle")
        with self._lock:
            kv = self.client.get(self._hkey(handle))
            if kv is None:
                return []
            freed: list[str] = []
            for cidr in HandleRecord.from_json(kv.value).blocks:
                freed += [h.ip for h in self._release_where(cidr, lambda _i, a: a.handle == handle)]
            self._remember_handle(handle, None)
        log.debug("released handle", handle=handle, ips=freed)
        return freed

    def release_ips(self, ips: Iterable[str]) -> list[str]:
        """Free these addresses whoever holds them; the ones that were allocated."""
        addrs = [parse_ip(ip) for ip in ips]
        with self._lock:
            by_block: dict[str, set[int]] = {}
            for block, _ in self._all_blocks():
                for a in addrs:
                    i = block.index_of(a)
                    if i is not None:
                        by_block.setdefault(block.cidr, set()).add(i)
            freed: list[str] = []
            for cidr, wanted in by_block.items():
                freed += [h.ip for h in self._release_where(cidr, lambda i, _a, w=wanted: i in w)]
        return freed

    def ips_by_handle(self, handle: str) -> list[str]:
        kv = self.client.get(self._hkey(handle))
        # what was read is what a following allocation guards on (a stale one only retries)
        record = HandleRecord.from_json(kv.value) if kv else HandleRecord(handle)
        self._remember_handle(handle, (record, kv.mod_revision if kv else 0))
        if kv is None:
            return []
        out = []
        for cidr in record.blocks:
            bkv = self.client.get(self._bkey(cidr))
            if bkv:
                out += [h.ip for h in Block.from_json(bkv.value).held() if h.attr.handle == handle]
        return out

    # --- views for the agent and the CLI ----------------------------------------------------------

    @staticmethod
    def _info(block: Block) -> BlockInfo:
        return BlockInfo(block.cidr, block.pool, block.node, block.confirmed, block.in_use, block.total)

    def blocks(self) -> list[Block]:
        """Every block with its allocations, in address order."""
        return sorted((b for b, _ in self._all_blocks()), key=lambda b: net_key(b.cidr))

    def all_blocks(self) -> list[BlockInfo]:
        return sorted((self._info(b) for b, _ in self._all_blocks()), key=lambda i: net_key(i.cidr))

    def node_blocks(self, node: str) -> list[BlockInfo]:
        """The node's blocks; only the confirmed ones may be routed or advertised."""
        return [i for i in self.all_blocks() if i.node == node]

    def borrowed_ips(self, node: str) -> list[str]:
        """Addresses the node's pods hold in blocks affine to other nodes (exported as /32, /128)."""
        return [h.ip for b, _ in self._all_blocks() if b.node != node
                for h in b.held() if h.attr.node == node]

    def usage(self) -> dict:
        """Per pool and per block: total, in_use, free (numbers)."""
        return usage_report(self._read_ctx("").pools, [b for b, _ in self._all_blocks()])

    # --- nodes --------------------------------------------------------------------------------

    def release_node(self, node: str) -> dict:
        """A deleted node: its empty blocks are deleted, the others lose their affinity,
        and all its affinities go."""
        check_name(node, "node")
        deleted, orphaned = [], []
        with self._lock:
            for block, rev in self._all_blocks():
                if block.node != node:
                    continue
                for attempt in range(_ATTEMPTS):
                    txn = Txn().guard(self._bkey(block.cidr), rev).delete(self._akey(node, block.cidr))
                    if block.in_use == 0:
                        txn.delete(self._bkey(block.cidr))
                    else:
                        txn.put(self._bkey(block.cidr), block.without_affinity().to_json())
                    if self.client.transaction(txn)[0]:
                        (deleted if block.in_use == 0 else orphaned).append(block.cidr)
                        break
                    _backoff(attempt)
                    kv = self.client.get(self._bkey(block.cidr))
                    if kv is None:
                        break
                    block, rev = Block.from_json(kv.value), kv.mod_revision
                    if block.node != node:
                        break
            self.client.delete_prefix(self._prefix + keys.affinity_prefix(node))
            self._own.pop(node, None)
            self._ctx.pop(node, None)
        log.info("node released", node=node, deleted_blocks=deleted, unaffined_blocks=orphaned)
        return {"deleted_blocks": deleted, "unaffined_blocks": orphaned}

    # --- configuration ------------------------------------------------------------------------

    def config(self) -> Config:
        return self._read_ctx("").config

    def configure(self, strict_affinity: bool | None = None, max_blocks_per_host: int | None = None) -> Config:
        """Change the IPAMConfig `default` (created if missing); one CAS write."""
        if max_blocks_per_host is not None and (not isinstance(max_blocks_per_host, int)
                                                or max_blocks_per_host < 0):
            raise ValidationError("must be a whole number >= 0 (0: unlimited)", field="maxBlocksPerHost")
        with self._lock:
            self.client.update(self._config_key, lambda cur: changed_config(cur, strict_affinity, max_blocks_per_host))
            self._ctx.clear()
        cfg = self.config()
        log.info("ipam configured", strict_affinity=cfg.strict_affinity,
                 max_blocks_per_host=cfg.max_blocks_per_host)
        return cfg

    # --- leaks ---------------------------------------------------------------------------------

    def wep_handles(self) -> set[str]:
        """The IPAM handle of every WorkloadEndpoint (see `ipam_check.wep_handles`)."""
        return wep_handles(self.client.get_prefix(self._weps_prefix)[0])

    def nodes(self) -> set[str]:
        """The names of the Node resources."""
        kvs, _ = self.client.get_prefix(self._nodes_prefix)
        parsed = (res.parse_key(kv.key[len(self._prefix):]) for kv in kvs)
        return {name for _, _, name in filter(None, parsed)}

    def check(self, wep_handles: set[str] | None = None, pending_grace: float = PENDING_GRACE) -> dict:
        """Report leaks; nothing is changed. `release_from_report` frees what it lists."""
        with self._lock:
            kvs, revision = self.client.get_prefix(self._prefix + keys.IPAM)
            weps = self.wep_handles() if wep_handles is None else set(wep_handles)
            nodes = self.nodes()
        return build_report(kvs, self._prefix, weps, nodes, pending_grace, revision)

    def release_from_report(self, report: dict) -> dict:
        """Free what a `check` report lists, each only if it is still as reported."""
        with self._lock:
            return release_report(self, report)


__all__ = ["DEFAULT_NETWORK", "IPAM", "BlockInfo", "Config"]
