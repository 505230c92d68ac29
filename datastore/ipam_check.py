"""IPAM leak check and repair: `IPAM.check()` and `IPAM.release_from_report()`.

The report is plain JSON (so `tortiectl ipam check -o FILE` can save it and
`ipam release --from-report FILE` can act on it later). Release re-reads everything
and frees only what is still exactly as reported, so acting on an old report never
frees an address that has since been handed to someone else: an address is freed only
if, in the transaction that frees it, its handle still holds it and no WorkloadEndpoint
names that handle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tortie.datastore import keys
from tortie.datastore.etcd import KV, Txn
from tortie.datastore.ipam_blocks import PENDING, Block, HandleRecord, tunnel_node, wep_handle
from tortie.log import get_logger

if TYPE_CHECKING:
    from tortie.datastore.ipam import IPAM

log = get_logger("ipam")

REPORT_LISTS = ("leaked_allocations", "orphan_blocks", "orphan_affinities", "stale_pending",
                "handle_mismatches")


def build_report(kvs: Iterable[KV], prefix: str, weps: set[str], nodes: set[str], pending_grace: float,
                 revision: int) -> dict:
    blocks: list[Block] = []
    affinities: list[tuple[str, str]] = []
    handles: dict[str, HandleRecord] = {}
    for kv in kvs:
        rel = kv.key[len(prefix):]
        if rel.startswith(keys.IPAM_BLOCKS):
            blocks.append(Block.from_json(kv.value))
        elif rel.startswith(keys.IPAM_AFFINITY):
            affinity = keys.parse_affinity(rel)
            if affinity is not None:
                affinities.append(affinity)
        elif rel.startswith(keys.IPAM_HANDLES):
            rec = HandleRecord.from_json(kv.value)
            handles[rec.handle] = rec

    now = time.time()
    leaked, orphan_blocks, stale = [], [], []
    actual: dict[str, dict[str, int]] = {}
    for block in blocks:
        for held in block.held():
            per = actual.setdefault(held.attr.handle, {})
            per[block.cidr] = per.get(block.cidr, 0) + 1
            reasons = []
            # A node's VTEP address has no endpoint: it lives as long as its node.
            if held.attr.handle not in weps and tunnel_node(held.attr.handle) != held.attr.node:
                reasons.append("no-workloadendpoint")
            if held.attr.node not in nodes:
                reasons.append("node-gone")
            if reasons:
                leaked.append({"ip": held.ip, "block": block.cidr, "handle": held.attr.handle,
                               "node": held.attr.node, "namespace": held.attr.namespace,
                               "pod": held.attr.pod, "reasons": reasons})
        if block.node is not None and block.node not in nodes:
            orphan_blocks.append({"block": block.cidr, "node": block.node, "in_use": block.in_use})
        if block.state == PENDING and now - block.claimed_at >= pending_grace:
            stale.append({"block": block.cidr, "node": block.node, "claimed_at": block.claimed_at,
                          "age_s": round(now - block.claimed_at, 1)})

    affine = {(b.node, b.cidr) for b in blocks if b.node}
    orphan_affinities = []
    for node, cidr in affinities:
        if node not in nodes:
            orphan_affinities.append({"node": node, "block": cidr, "reason": "node-gone"})
        elif (node, cidr) not in affine:
            orphan_affinities.append({"node": node, "block": cidr, "reason": "no-block"})

    mismatches = []
    for handle in sorted(set(actual) | set(handles)):
        recorded = handles[handle].blocks if handle in handles else {}
        if recorded != actual.get(handle, {}):
            mismatches.append({"handle": handle, "recorded": recorded, "actual": actual.get(handle, {})})

    report = {
        "revision": revision,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "leaked_allocations": sorted(leaked, key=lambda x: (x["block"], x["ip"])),
        "orphan_blocks": orphan_blocks,
        "orphan_affinities": orphan_affinities,
        "stale_pending": stale,
        "handle_mismatches": mismatches,
        "summary": {"blocks": len(blocks), "handles": len(handles),
                    "allocations": sum(b.in_use for b in blocks)},
    }
    report["clean"] = not any(report[k] for k in REPORT_LISTS)
    return report


def wep_handles(kvs: Iterable[KV]) -> set[str]:
    """The IPAM handle of every WorkloadEndpoint among `kvs` (`ipam_blocks.wep_handle`)."""
    out = set()
    for kv in kvs:
        try:
            handle = wep_handle(json.loads(kv.value).get("spec") or {})
        except (ValueError, AttributeError):
            continue
        if handle:
            out.add(handle)
    return out


def release_report(ipam: IPAM, report: dict) -> dict:
    """Free the leaks a report lists, each only if it is still as reported."""
    from tortie.datastore.ipam_blocks import parse_ip

    released: list[str] = []
    by_block: dict[str, dict[int, str]] = {}
    live = ipam.nodes()
    for item in report.get("leaked_allocations", ()):
        ip = parse_ip(item["ip"])
        kv = ipam.client.get(ipam._bkey(item["block"]))
        if kv is None:
            continue
        index = Block.from_json(kv.value).index_of(ip)
        if index is not None:
            by_block.setdefault(item["block"], {})[index] = item["handle"]
    for cidr, wanted in by_block.items():
        # Only if the reported handle still holds the address and no WorkloadEndpoint names
        # it (one may have appeared since the check: a pod being set up), both checked in
        # the transaction that frees it.
        freed = ipam._release_where(cidr, lambda i, a, w=wanted: w.get(i) == a.handle, spare_endpoints=True)
        released += [h.ip for h in freed]

    gone = {x["node"] for x in report.get("orphan_blocks", ())}
    gone |= {x["node"] for x in report.get("orphan_affinities", ()) if x.get("reason") == "node-gone"}
    released_nodes = []
    for node in sorted(gone - live):
        ipam.release_node(node)
        released_nodes.append(node)

    removed_affinities = []
    for item in report.get("orphan_affinities", ()):
        if item.get("reason") != "no-block":
            continue
        akey = ipam._akey(item["node"], item["block"])
        kv = ipam.client.get(ipam._bkey(item["block"]))
        if kv is None or Block.from_json(kv.value).node != item["node"]:
            ipam.client.delete(akey)
            removed_affinities.append(item)

    removed_pending = []
    for item in report.get("stale_pending", ()):
        kv = ipam.client.get(ipam._bkey(item["block"]))
        if kv is None:
            continue
        block = Block.from_json(kv.value)
        if block.state != PENDING or block.claimed_at != item["claimed_at"] or block.in_use:
            continue
        txn = Txn().guard(kv.key, kv.mod_revision).delete(kv.key)
        if block.node:
            txn.delete(ipam._akey(block.node, block.cidr))
        if ipam.client.transaction(txn)[0]:
            removed_pending.append(block.cidr)
    out = {"released_ips": released, "released_nodes": released_nodes,
           "removed_affinities": removed_affinities, "removed_pending": removed_pending}
    log.info("released from report", **{k: len(v) for k, v in out.items()})
    return out
