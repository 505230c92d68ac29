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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from tortie.datastore.ipam import IPAM
from tortie.log import get_logger

log = get_logger("controller")

Leak = tuple[str, str]  # (handle, ip): one allocation


@dataclass(frozen=True)
class Selection:
    release: list[dict]  # report items to release now
    first_seen: dict[Leak, float]  # candidates still waiting out the grace period, and when seen


def select_leaks(report: Mapping, live_pods: Collection[tuple[str, str]], first_seen: Mapping[Leak, float],
                 now: float, grace: float) -> Selection:
    """Pure: which of a check report's leaked allocations to release now.

    A candidate names a pod (namespace, name) that is not in live_pods; it is released
    once it has been a candidate for `grace` seconds. Candidates that are no longer
    candidates (the pod appeared, the allocation went) are forgotten."""
    release, seen = [], {}
    for item in report.get("leaked_allocations", ()):
        if not item.get("pod"):
            continue
        if (item.get("namespace") or "default", item["pod"]) in live_pods:
            continue
        leak = (item["handle"], item["ip"])
        since = first_seen.get(leak, now)
        if now - since >= grace:
            release.append(item)
        else:
            seen[leak] = since
    return Selection(release, seen)


class IPAMGarbageCollector:
    """Keeps the first-seen times across rounds; `collect` runs one round."""

    def __init__(self, ipam: IPAM, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ipam = ipam
        self.grace = grace
        self.clock = clock
        self.first_seen: dict[Leak, float] = {}
        self.released_total = 0

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


__all__ = ["IPAMGarbageCollector", "Selection", "select_leaks"]
