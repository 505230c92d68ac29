"""NetworkPolicy, incrementally: which local pods each policy isolates, and what it allows.

The full answer is `policy.netpol.compute()` (pure, the reference). This keeps its result
current event by event and emits only what changed:

- a local pod's filter (the policies isolating it, per direction) depends on its own
  labels and the policies of its namespace: recomputed when the pod or a policy changes;
- a policy's resolution (its rules as address and port sets) depends on every pod its
  peers select and on namespace labels: recomputed when the policy changes, when a pod
  that one of its peers matches (before or after the change) changes, and when a
  namespace's labels change for policies with namespace selectors. A rule's named ports
  also depend on the ports of the pods they resolve against (ingress: the local pods the
  policy selects; egress: the pods its peers match): each pod event takes the old pod's
  triples out and puts the new one's in. Only policies some local pod uses are resolved.

Messages come out ordered so the nftables manager never sees a pod jump to a policy it
does not have yet: policies set, then pod filters, then policies dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from tortie.datastore import resources as res
from tortie.log import get_logger
from tortie.policy import netpol
from tortie.policy.messages import EndpointFilterUpdate, PolicyUpdate

log = get_logger("calc")

WepKey = tuple[str, str]


class _NamespaceLabels(dict):
    """namespace name -> labels (with the implicit name label), filled on first use."""

    def __init__(self, namespaces: dict[str, res.Namespace]) -> None:
        super().__init__()
        self._namespaces = namespaces

    def __missing__(self, name: str) -> dict[str, str]:
        labels = self[name] = netpol.namespace_labels(self._namespaces, name)
        return labels


def _peers(p: res.NetworkPolicy) -> Iterable[res.PolicyPeer]:
    for rule in (*p.ingress, *p.egress):
        yield from rule.peers
        yield from getattr(rule, "not_peers", ())


def _has_namespace_selector(p: res.NetworkPolicy) -> bool:
    return any(peer.namespace_selector is not None for peer in _peers(p))


def _count(counted: dict, items: Iterable, step: int) -> bool:
    """Add (step 1) or take (-1) one reference to each item; whether an item came or went."""
    changed = False
    for n in items:
        c = counted.get(n, 0) + step
        if c > 0:
            counted[n] = c
            changed |= c == 1 and step == 1
        else:
            counted.pop(n, None)
            changed = True
    return changed


class _Rule:
    """One rule of a used policy: its ports, its ipBlock networks, per pod peer the
    networks of the pods it matches (counted), and its named ports' (address, protocol,
    port) triples (counted), so a pod event updates only what that pod is part of."""

    __slots__ = ("allow", "direction", "index", "named", "node", "not_peers", "p", "pod_peers", "ports", "rule",
                 "static")

    def __init__(self, rule: res.PolicyRule, p: res.NetworkPolicy, direction: str, node: str,
                 weps, ns_labels, index: int = 0) -> None:
        self.rule, self.p, self.direction, self.node, self.index = rule, p, direction, node, index
        self.ports = netpol.rule_ports(rule)
        self.static = [netpol.net_range(n) for peer in rule.peers if peer.cidr is not None
                       for n in netpol.peer_block(peer)]
        self.pod_peers: list[tuple[res.PolicyPeer, dict]] = []
        for peer in rule.peers:
            if peer.cidr is not None:
                continue
            nets: dict[str, int] = {}  # the pods' CIDR strings (shared with the views)
            for w in weps:
                if peer.matches_pod(w.labels, w.namespace, ns_labels[w.namespace], p.namespace):
                    _count(nets, w.ip_networks, 1)
            self.pod_peers.append((peer, nets))
        # a Calico rule's notNets (fixed) and notSelector (its pods' networks, counted)
        self.not_peers: list[tuple[res.PolicyPeer, dict]] = []
        for peer in getattr(rule, "not_peers", ()):
            nets = {peer.cidr: 1} if peer.cidr is not None else {}
            if peer.cidr is None:
                for w in weps:
                    if peer.matches_pod(w.labels, w.namespace, ns_labels[w.namespace], p.namespace):
                        _count(nets, w.ip_networks, 1)
            self.not_peers.append((peer, nets))
        self.named: dict[netpol.Named, int] = {}
        if self.ports.names:
            for w in weps:
                _count(self.named, self._named_of(w, ns_labels), 1)
        self.allow = self._make()

    def _named_of(self, w: res.WorkloadEndpoint, ns_labels) -> list[netpol.Named]:
        target = netpol.named_target(w, self.p, self.direction, self.node, self.rule.peers, self.static, ns_labels)
        return [] if target is None else list(netpol.named_elements(w, self.ports.names, target))

    def _make(self) -> netpol.Allow | None:
        networks = [n for _, counted in self.pod_peers for n in counted]
        return netpol.make_allow(self.rule, self.ports, self.static, networks, self.named,
                                 [n for _, counted in self.not_peers for n in counted], self.index)

    def on_wep(self, old, new, ns_labels, namespace: str) -> bool:
        changed = False
        for peer, counted in (*self.pod_peers, *((q, c) for q, c in self.not_peers if q.cidr is None)):
            for w, step in ((old, -1), (new, 1)):
                if w is not None and peer.matches_pod(w.labels, w.namespace, ns_labels[w.namespace], namespace):
                    changed |= _count(counted, w.ip_networks, step)
        if self.ports.names:
            for w, step in ((old, -1), (new, 1)):
                if w is not None:
                    changed |= _count(self.named, self._named_of(w, ns_labels), step)
        if changed:
            allow = self._make()
            if allow == self.allow:
                return False
            self.allow = allow
        return changed


class _Policy:
    """A used policy, resolved and indexed by peer."""

    __slots__ = ("egress", "ingress", "key", "p")

    def __init__(self, p: res.NetworkPolicy, node: str, weps, ns_labels) -> None:
        self.p, self.key = p, netpol.policy_key(p)
        weps = tuple(weps)
        self.ingress = [_Rule(r, p, netpol.INGRESS, node, weps, ns_labels, i) for i, r in enumerate(p.ingress)] \
            if netpol.INGRESS in p.policy_types else []
        self.egress = [_Rule(r, p, netpol.EGRESS, node, weps, ns_labels, i) for i, r in enumerate(p.egress)] \
            if netpol.EGRESS in p.policy_types else []

    def resolved(self) -> netpol.ResolvedPolicy:
        return netpol.ResolvedPolicy(self.key, tuple(r.allow for r in self.ingress if r.allow is not None),
                                     tuple(r.allow for r in self.egress if r.allow is not None))

    def on_wep(self, old, new, ns_labels) -> bool:
        changed = False
        for r in (*self.ingress, *self.egress):
            changed |= r.on_wep(old, new, ns_labels, self.p.namespace)
        return changed


class AllPolicies:
    """Every policy kind of the state by policy key (`policy.tiers.policy_key`), read live
    from the ClusterState's tables: Kubernetes', tortie.io/v1 namespaced and global."""

    def __init__(self, *tables: dict) -> None:
        self.tables = tables

    def items(self) -> Iterable[tuple[str, res.NetworkPolicy]]:
        for table in self.tables:
            for p in table.values():
                yield netpol.policy_key(p), p

    def values(self) -> Iterable[res.NetworkPolicy]:
        for table in self.tables:
            yield from table.values()

    def get(self, key: str):
        ns, _, rest = key.partition("/")
        kind, sep, name = rest.partition(":")
        if not sep:
            return self.tables[0].get((ns, rest))
        if kind == "GlobalNetworkPolicy":
            return self.tables[2].get(name) if len(self.tables) > 2 else None
        return self.tables[1].get((ns, name)) if len(self.tables) > 1 else None


class PolicyCalculator:
    def __init__(self, node: str, weps: dict[WepKey, res.WorkloadEndpoint],
                 policies: dict[WepKey, res.NetworkPolicy],
                 namespaces: dict[str, res.Namespace], calico_policies: dict | None = None,
                 global_policies: dict | None = None, tiers: dict | None = None,
                 host_endpoints: dict | None = None) -> None:
        # The ClusterState's own tables (read only here; the state folds the events).
        self.node = node
        self.weps, self.namespaces = weps, namespaces
        self.policies = AllPolicies(policies, calico_policies if calico_policies is not None else {},
                                    global_policies if global_policies is not None else {})
        self.tiers = tiers if tiers is not None else {}
        self.host_endpoints = host_endpoints if host_endpoints is not None else {}
        self._ns_labels = _NamespaceLabels(namespaces)
        # local endpoints by host interface (normally one each)
        self._by_iface: dict[str, dict[WepKey, res.WorkloadEndpoint]] = {}
        self._index: dict[str, _Policy] = {}  # used policies, resolved and indexed
        self.pod_filters: dict[str, netpol.PodFilter] = {}  # emitted, by interface
        self.resolved: dict[str, netpol.ResolvedPolicy] = {}  # emitted, by policy key
        self._users: dict[str, set[str]] = {}  # policy key -> interfaces it isolates
        # What the managers were sent, and the keys touched since.
        self._sent_pods: dict[str, netpol.PodFilter] = {}
        self._sent_policies: dict[str, netpol.ResolvedPolicy] = {}
        self._touched_pods: set[str] = set()
        self._touched_policies: set[str] = set()

    # -- inputs (called after the state has folded the event) ----------------------------
    def on_wep(self, old: res.WorkloadEndpoint | None, new: res.WorkloadEndpoint | None) -> None:
        for w, add in ((old, False), (new, True)):
            if w is not None and w.node == self.node and w.interface_name:
                by_key = self._by_iface.setdefault(w.interface_name, {})
                if add:
                    by_key[(w.namespace, w.name)] = w
                else:
                    by_key.pop((w.namespace, w.name), None)
                if not by_key:
                    del self._by_iface[w.interface_name]
        # The indexes first: one built below (a pod starts using a policy) is made from the
        # state as it is now and must not see this change a second time.
        for key, idx in self._index.items():
            if idx.on_wep(old, new, self._ns_labels):
                self._set_resolved(key, idx.resolved())
        for w in (old, new):
            if w is not None and w.node == self.node and w.interface_name:
                self._refresh_pod(w.interface_name)

    def on_policy(self, key: str) -> None:
        self._index.pop(key, None)
        # a namespaced policy selects pods of its own namespace only; a global one, any
        namespace = key.partition("/")[0]
        for iface, by_key in list(self._by_iface.items()):
            if namespace == "*" or any(ns == namespace for ns, _ in by_key):
                self._refresh_pod(iface)
        if namespace == "*":
            self._refresh_hosts()
        if key in self._users:
            self._resolve(key)

    def on_tier(self) -> None:
        """A Tier's order changed (or a HostEndpoint): every local endpoint's policies may have."""
        for iface in list(self._by_iface):
            self._refresh_pod(iface)
        self._refresh_hosts()

    def _refresh_hosts(self) -> None:
        """This node's host endpoints, whole (a node has a few)."""
        want = netpol.host_filters(self.node, self.host_endpoints.values(), self.policies.values(), self.tiers)
        for key in [k for k, f in self.pod_filters.items() if f.host and k not in want]:
            self._set_pod(key, None)
        for key, f in want.items():
            self._set_pod(key, f)

    def on_namespace(self, name: str) -> None:
        self._ns_labels.pop(name, None)
        for key, p in list(self.policies.items()):
            if key in self._users and _has_namespace_selector(p):
                self._resolve(key)
        # a global policy's namespaceSelector may now select (or not) this namespace's pods
        for iface, by_key in list(self._by_iface.items()):
            if any(ns == name for ns, _ in by_key):
                self._refresh_pod(iface)

    def recompute(self) -> None:
        """Everything from the state (a snapshot): emitted state is diffed, not reset."""
        self._ns_labels.clear()
        self._by_iface = {}
        for (ns, name), w in self.weps.items():
            if w.node == self.node and w.interface_name:
                self._by_iface.setdefault(w.interface_name, {})[(ns, name)] = w
        want_pods = netpol.pod_filters(self.node, self.weps.values(), self.policies.values(),
                                       self._ns_labels, self.tiers)
        want_pods.update(netpol.host_filters(self.node, self.host_endpoints.values(), self.policies.values(),
                                             self.tiers))
        used = {k for f in want_pods.values() for k in (f.ingress or ()) + (f.egress or ())}
        self._index = {}
        for key, p in self.policies.items():
            if key in used:
                self._index[key] = _Policy(p, self.node, self.weps.values(), self._ns_labels)
        want_policies = {key: idx.resolved() for key, idx in self._index.items()}
        for key, p in want_policies.items():
            if self.resolved.get(key) != p:
                self.resolved[key] = p
                self._touched_policies.add(key)
        for iface in set(self.pod_filters) | set(want_pods):
            self._set_pod(iface, want_pods.get(iface))
        for key in [k for k in self.resolved if k not in want_policies]:
            self._drop(key)

    def usage(self) -> dict[str, int]:
        """Policy key -> how many local endpoints it is active on (either direction)."""
        return {key: len(ifaces) for key, ifaces in self._users.items()}

    def take(self) -> list:
        sets: list = []
        drops: list = []
        for key in self._touched_policies:
            want = self.resolved.get(key)
            if want == self._sent_policies.get(key):
                continue
            if want is None:
                del self._sent_policies[key]
                drops.append(PolicyUpdate(key, None))
            else:
                self._sent_policies[key] = want
                sets.append(PolicyUpdate(key, want))
        for iface in self._touched_pods:
            want = self.pod_filters.get(iface)
            if want == self._sent_pods.get(iface):
                continue
            if want is None:
                del self._sent_pods[iface]
            else:
                self._sent_pods[iface] = want
            sets.append(EndpointFilterUpdate(iface, want))
        self._touched_policies, self._touched_pods = set(), set()
        return sets + drops

    # -- internals ------------------------------------------------------------------------
    def _local_wep(self, iface: str) -> res.WorkloadEndpoint | None:
        by_key = self._by_iface.get(iface)
        # as netpol.compute: in (namespace, name) order, the last one wins
        return by_key[max(by_key)] if by_key else None

    def _refresh_pod(self, iface: str) -> None:
        wep = self._local_wep(iface)
        want = None
        if wep is not None and netpol.interface_usable(iface):
            want = netpol.pod_filter(wep, self.policies.values(), self._ns_labels, self.tiers)
        self._set_pod(iface, want)

    def _set_pod(self, iface: str, want: netpol.PodFilter | None) -> None:
        have = self.pod_filters.get(iface)
        if have == want:
            return
        old_keys = set((have.ingress or ()) + (have.egress or ())) if have else set()
        new_keys = set((want.ingress or ()) + (want.egress or ())) if want else set()
        for key in new_keys - old_keys:
            users = self._users.setdefault(key, set())
            users.add(iface)
            if key not in self.resolved:
                self._resolve(key)
        if want is None:
            del self.pod_filters[iface]
        else:
            self.pod_filters[iface] = want
        self._touched_pods.add(iface)
        for key in old_keys - new_keys:
            users = self._users.get(key)
            if users is not None:
                users.discard(iface)
                if not users:
                    del self._users[key]
                    self._drop(key)

    def _resolve(self, key: str) -> None:
        """Resolve a policy from scratch (it changed, or a pod starts using it)."""
        p = self.policies.get(key)
        if p is None or key not in self._users:
            return
        idx = self._index[key] = _Policy(p, self.node, self.weps.values(), self._ns_labels)
        self._set_resolved(key, idx.resolved())

    def _set_resolved(self, key: str, want: netpol.ResolvedPolicy) -> None:
        if self.resolved.get(key) != want:
            self.resolved[key] = want
            self._touched_policies.add(key)

    def _drop(self, key: str) -> None:
        self._index.pop(key, None)
        if self.resolved.pop(key, None) is not None:
            self._touched_policies.add(key)
