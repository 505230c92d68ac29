"""Removing a node from the datastore, the way calicoctl does: its workload endpoints go,
their addresses are released, then its blocks (now empty) and affinities.

Shared by `tortiectl delete node` and the Kubernetes controller.
"""

from __future__ import annotations

from tortie.datastore.ipam import IPAM
from tortie.datastore.ipam_blocks import wep_handle
from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound


def release_node(store: ResourceStore, ipam: IPAM, node: str) -> dict:
    """Everything of `node` except its Node resource; returns what was freed."""
    blocks = sorted(b.cidr for b in ipam.all_blocks() if b.node == node)
    released: list[str] = []
    weps = 0
    for wep in store.list("workloadendpoint"):
        spec = wep.get("spec", {})
        if spec.get("node") != node:
            continue
        handle = wep_handle(spec)
        if handle:
            released += ipam.release_handle(handle)
        try:
            store.delete("workloadendpoint", wep["metadata"]["name"], wep["metadata"]["namespace"])
            weps += 1
        except NotFound:
            pass  # deleted meanwhile by its own CNI DEL
    # Blocks whose last address went above are already gone; the rest lose the affinity.
    ipam.release_node(node)
    return {"workload_endpoints": weps, "addresses": released, "blocks": blocks}
