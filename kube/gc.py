"""IPAM garbage collection driven by what Kubernetes says exists.

Two kinds of garbage:

- A node deleted from Kubernetes: its blocks and affinities are released at once
  (`IPAM.release_node`; blocks still holding addresses lose their affinity and keep
  the addresses until their pods are reaped) and its tortie Node resource is deleted.
  Blocks found affine to a node that neither Kubernetes nor the datastore knows (deleted
  while the controller was down) are released by the periodic check.
- An allocation whose pod is gone: `IPAM.check` lists allocations with no
  WorkloadEndpoint (or on a node that is gone); one that names a pod Kubernetes no
  longer has is a leak candidate. It is released only when it is still a candidate
  `grace` seconds after it was first seen, because the controller's view of pods lags
  the API server: a pod just created may get its address from the CNI plugin before
  the controller hears of it. Allocations that name no pod (not made for a Kubernetes
  pod) are left alone. Release goes through `IPAM.release_from_report`, which frees an
  address only if the same handle still holds it.
- A WorkloadEndpoint whose pod is gone (its node died before CNI DEL ran): after the
  same grace period the controller deletes it; its addresses are then leaks as above.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tortie.datastore.ipam import IPAM
from tortie.log import get_logger

log = get_logger("controller")

Leak = tuple[str, str]  # (handle, ip): one allocation
K = TypeVar("K", bound=Hashable)


def past_grace(candidates: Iterable[K], first_seen: Mapping[K, float], now: float,
               grace: float) -> tuple[list[K], dict[K, float]]:
    """Pure: (the candidates that have been candidates for `grace` seconds, the first-seen
    times of the others). A key that is no longer a candidate is forgotten, so one that
    comes back starts its grace period over."""
    due, seen = [], {}
    for key in candidates:
        since = first_seen.get(key, now)
        if now - since >= grace:
            due.append(key)
        else:
            seen[key] = since
    return due, seen


@dataclass(frozen=True)
class Selection:
    release: list[dict]  # report items to release now
    first_seen: dict[Leak, float]  # candidates still waiting out the grace period, and when seen


def select_leaks(report: Mapping, live_pods: Collection[tuple[str, str]], first_seen: Mapping[Leak, float],
                 now: float, grace: float) -> Selection:
    """Pure: which of a check report's leaked allocations to release now: those naming a
    pod (namespace, name) not in live_pods for `grace` seconds (see past_grace)."""
    items = {(i["handle"], i["ip"]): i for i in report.get("leaked_allocations", ())
             if i.get("pod") and ((i.get("namespace") or "default"), i["pod"]) not in live_pods}
    due, seen = past_grace(items, first_seen, now, grace)
    return Selection([items[k] for k in due], seen)


class IPAMGarbageCollector:
    """Keeps the first-seen times across rounds; `collect` runs one round."""

    def __init__(self, ipam: IPAM, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ipam = ipam
        self.grace = grace
        self.clock = clock
        self.first_seen: dict[Leak, float] = {}
        self.endpoints_first_seen: dict[str, float] = {}
        self.released_total = 0

    def forget(self) -> None:
        """Start every grace period over (the rounds were not watching in between)."""
        self.first_seen, self.endpoints_first_seen = {}, {}

    def stale_endpoints(self, orphans: Iterable[str]) -> list[str]:
        """Of the endpoints (keys) whose pod Kubernetes does not have, those that have
        been so for the grace period: the controller deletes them, and their addresses
        become leaks the next rounds release (a node that died never ran CNI DEL)."""
        due, self.endpoints_first_seen = past_grace(orphans, self.endpoints_first_seen, self.clock(), self.grace)
        return due

    def collect(self, live_pods: Collection[tuple[str, str]], live_nodes: Collection[str] | None = None) -> list[str]:
        """One round: check, release the candidates past their grace; the IPs released.
        With live_nodes, blocks still affine to a node Kubernetes does not have are
        released too (a node deleted while the controller was down)."""
        report = self.ipam.check()
        if live_nodes is not None:
            for node in sorted({b["node"] for b in report.get("orphan_blocks", ())} - set(live_nodes)):
                log.info("releasing the blocks of a node Kubernetes does not have", node=node)
                self.release_node(node)
        sel = select_leaks(report, live_pods, self.first_seen, self.clock(), self.grace)
        self.first_seen = sel.first_seen
        released: list[str] = []
        if sel.release:
            out = self.ipam.release_from_report({"leaked_allocations": sel.release})
            released = out["released_ips"]
            self.released_total += len(released)
            log.info("leaked pod addresses released", ips=released,
                     pods=sorted({f"{i.get('namespace')}/{i['pod']}" for i in sel.release}))
        if sel.first_seen:
            log.info("leak candidates waiting out the grace period", count=len(sel.first_seen),
                     grace_s=self.grace)
        return released

    def release_node(self, node: str) -> dict:
        """A node Kubernetes deleted: free its blocks and affinities."""
        return self.ipam.release_node(node)


__all__ = ["IPAMGarbageCollector", "Selection", "past_grace", "select_leaks"]
