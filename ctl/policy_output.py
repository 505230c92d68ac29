"""`tortiectl get` of policies: the table rows of Calico's kinds, and `-o wide`'s ACTIVE-ON
column (on how many endpoints of each node a policy is active, from the status documents
the agents publish: `policies` {policy key: endpoints} in `status/bgp/<node>`)."""

from __future__ import annotations

from tortie.ctl import statusdocs
from tortie.policy.tiers import policy_key

POLICY_KINDS = ("networkpolicy", "networkpolicy.tortie.io", "globalnetworkpolicy")


def _order(spec: dict) -> str:
    return "-" if spec.get("order") is None else f"{spec['order']:g}"


def calico_policy(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    return (res["metadata"]["name"], s.get("tier", "default"), _order(s), s.get("selector", "all()"),
            ",".join(s.get("types", ())))


def tier(res: dict) -> tuple[str, ...]:
    return (res["metadata"]["name"], _order(res.get("spec") or {}))


def host_endpoint(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    labels = ",".join(f"{k}={v}" for k, v in sorted((res["metadata"].get("labels") or {}).items())) or "<none>"
    return (res["metadata"]["name"], s["node"], s["interfaceName"], ",".join(s.get("expectedIPs") or ()) or "-",
            labels)


def active_on(res: dict) -> str:
    usage = (res.get("status") or {}).get("activeOn") or {}
    return ",".join(f"{node}={n}" for node, n in sorted(usage.items())) or "-"


class _Key:
    """Just what `policy_key` reads of a policy, from its resource."""

    def __init__(self, res: dict) -> None:
        meta = res["metadata"]
        self.name, self.namespace = meta["name"], meta.get("namespace", "")
        if res["apiVersion"] == "tortie.io/v1":
            self.GLOBAL = res["kind"] == "GlobalNetworkPolicy"
            self.KIND = res["kind"]


def with_usage(client, prefix: str, items: list[dict], stale_after: float) -> list[dict]:
    """The policies with status.activeOn = {node: endpoints} (display only); the documents
    of agents that stopped publishing are left out."""
    by_key: dict[str, dict[str, int]] = {}
    for node, doc in statusdocs.live(client, prefix, stale_after):
        for key, n in (doc.get("policies") or {}).items():
            by_key.setdefault(key, {})[node] = n
    out = []
    for r in items:
        usage = by_key.get(policy_key(_Key(r)))
        out.append({**r, "status": {**(r.get("status") or {}), "activeOn": usage}} if usage else r)
    return out
