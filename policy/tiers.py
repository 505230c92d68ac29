"""Where each policy stands in Calico's evaluation order, and which policies select a pod.

Kubernetes NetworkPolicies and tortie.io/v1 NetworkPolicies / GlobalNetworkPolicies are
evaluated together, per direction: tiers by order (no order: last; ties by name; the tier
`default` at 1,000,000 unless a Tier resource says otherwise), within a tier policies by
order (Kubernetes ones at 1000), then by key. `ordered()` returns a pod's policy keys in
that order and the sizes of its tier groups; no groups (`()`) when only Kubernetes
policies select it: then the one tier needs no Pass handling (the ruleset as before).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tortie.datastore.calico_policy import DEFAULT_TIER, DEFAULT_TIER_ORDER, K8S_ORDER


def is_calico(p: object) -> bool:
    return getattr(p, "GLOBAL", None) is not None


def policy_key(p) -> str:
    """"<namespace>/<name>" for a Kubernetes policy; "<namespace>/NetworkPolicy:<name>" and
    "*/GlobalNetworkPolicy:<name>" for Calico's (Kubernetes names cannot hold ':')."""
    if is_calico(p):
        return f"{p.namespace or '*'}/{p.KIND}:{p.name}"
    return f"{p.namespace}/{p.name}"


def selects(p, labels: Mapping[str, str], namespace: str, namespace_labels: Mapping[str, str]) -> bool:
    if is_calico(p):
        return p.selects(labels, namespace, namespace_labels)
    return p.selects(labels, namespace)


def tier_order(tier: str, tiers: Mapping[str, object]) -> tuple:
    t = tiers.get(tier)
    order = getattr(t, "order", None)
    if order is None and tier == DEFAULT_TIER:
        order = DEFAULT_TIER_ORDER
    return (order is None, order or 0.0, tier)


def place(p, tiers: Mapping[str, object]) -> tuple:
    """The sort key of a policy: (its tier's order, its order, its key)."""
    tier = p.tier if is_calico(p) else DEFAULT_TIER
    order = p.order if is_calico(p) else K8S_ORDER
    return (*tier_order(tier, tiers), order is None, order or 0.0, policy_key(p))


def ordered(selecting: Iterable, tiers: Mapping[str, object]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The keys of the selecting policies in evaluation order, and the tier group sizes."""
    items = sorted(((place(p, tiers), p) for p in selecting), key=lambda x: x[0])
    keys = tuple(policy_key(p) for _, p in items)
    if not any(is_calico(p) for _, p in items):
        return keys, ()
    groups: list[int] = []
    last = None
    for where, _ in items:
        if where[2] != last:
            groups.append(0)
            last = where[2]
        groups[-1] += 1
    return keys, tuple(groups)
