"""The incremental calculation's one promise: after any sequence of events, the sum of the
messages it emitted equals what a fresh calculation computes whole from the final state.

Events: pods added, relabelled, moved, given other container ports and deleted (local and
remote), policies (numeric and named ports; Kubernetes' and Calico's, in tiers) added, changed
and deleted, namespace labels, pools (NAT, export, egress, egress
addresses, per-pool BGP export policy), block affinities,
nodes, BGP peers and configuration, and learned-route flaps (including our own blocks and
next hops that are our own addresses coming back).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tortie.agent.calc import Calculation
from tortie.agent.calc_desired import desired, network_policy
from tortie.bgp.messages import BGPConfigUpdate, ExportDelta
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.policy.messages import EndpointFilterUpdate, NatUpdate, PolicyUpdate
from tortie.policy.svc_model import HealthCheckUpdate, ProxyConfigUpdate, ServicePortUpdate
from tortie.routing.messages import RouteDelta, RulesUpdate

P = "/tortie/"
ME, OTHER = "n1", "n2"
OWN_ADDR = "10.99.0.1"


class Accumulated:
    """The dataplane as the managers would hold it after every message."""

    def __init__(self) -> None:
        self.routes: dict[str, dict] = {}
        self.rules: dict[str, frozenset] = {}
        self.nat: NatUpdate | None = None
        self.policies: dict = {}
        self.pods: dict = {}
        self.bgp: BGPConfigUpdate | None = None
        self.exports: set[str] = set()
        self.proxy: dict = {}  # Services (their own property test: tests/agent/test_calc_services.py)
        self.pod_cidrs: frozenset[str] | None = None

    def feed(self, msgs: list) -> None:
        for m in msgs:
            if isinstance(m, RouteDelta):
                cls = self.routes.setdefault(m.route_class, {})
                for r in m.routes:
                    cls[r.key] = r
                for k in m.removed:
                    assert k in cls, f"removal of a route never set: {k}"
                    del cls[k]
            elif isinstance(m, RulesUpdate):
                self.rules[m.rule_class] = m.rules
            elif isinstance(m, NatUpdate):
                self.nat = m
            elif isinstance(m, PolicyUpdate):
                if m.policy is None:
                    assert not any(m.key in (f.ingress or ()) + (f.egress or ()) for f in self.pods.values()), \
                        "a policy dropped while a pod still uses it"
                    self.policies.pop(m.key)
                else:
                    self.policies[m.key] = m.policy
            elif isinstance(m, EndpointFilterUpdate):
                if m.filter is None:
                    self.pods.pop(m.interface)
                else:
                    for k in (m.filter.ingress or ()) + (m.filter.egress or ()):
                        assert k in self.policies, "a pod refers to a policy not sent yet"
                    self.pods[m.interface] = m.filter
            elif isinstance(m, BGPConfigUpdate):
                self.bgp = m
            elif isinstance(m, ExportDelta):
                assert not (m.added & self.exports), "export added twice"
                assert m.removed <= self.exports, "export removed that was never added"
                self.exports |= m.added
                self.exports -= m.removed
            elif isinstance(m, ProxyConfigUpdate):
                self.pod_cidrs = m.pod_cidrs
            elif isinstance(m, (ServicePortUpdate, HealthCheckUpdate)):
                self.proxy[m] = True
            else:
                raise AssertionError(f"unknown message {m!r}")

    def view(self):
        return ({c: r for c, r in self.routes.items() if r}, {c: r for c, r in self.rules.items() if r},
                self.nat, self.policies, self.pods, self.bgp, self.exports, self.proxy, self.pod_cidrs or frozenset())


# --- resources ------------------------------------------------------------------------------

def _doc(kind, name, spec, namespace=None, labels=None, api=None):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = labels
    api = api or {"NetworkPolicy": "networking.k8s.io/v1", "Namespace": "v1"}.get(kind, "tortie.io/v1")
    doc = {"apiVersion": api, "kind": kind, "metadata": meta}
    if spec is not None:
        doc["spec"] = spec
    return json.dumps(res.validate(doc)).encode()


NAMES = st.sampled_from(["a", "b", "c", "d", "e"])
NSS = st.sampled_from(["default", "shop"])
APPS = st.sampled_from(["web", "db"])
# Each pod draws from addresses of its own (IPAM never gives one address to two pods):
# inside our blocks, in another block of the pool (borrowed), in the other pool, in none.
SUBNETS = ("10.65.0.{}", "10.65.0.{}", "10.65.0.{}", "10.65.1.{}", "10.66.0.{}", "10.70.0.{}")


def pod_ips(ns: str, name: str):
    n = 1 + "abcde".index(name) * 2 + (ns == "shop") + (64 if ns == "shop" else 0)
    return st.sampled_from([s.format(n) + "/32" for s in SUBNETS])


@st.composite
def wep_event(draw):
    ns, name = draw(NSS), draw(NAMES)
    key = P + keys.resource_key("workloadendpoint", name, ns)
    if draw(st.booleans()) and draw(st.booleans()):
        return key, None
    spec = {"node": draw(st.sampled_from([ME, ME, OTHER])), "orchestrator": "k8s", "endpoint": "eth0",
            "pod": name, "containerID": "c" + name, "interfaceName": f"tor{ns[0]}{name}",
            "ipNetworks": sorted(set(draw(st.lists(pod_ips(ns, name), min_size=1, max_size=2))))}
    ports = draw(st.lists(POD_PORTS, max_size=2))
    if ports:
        spec["ports"] = ports
    return key, _doc("WorkloadEndpoint", name, spec, ns, {"app": draw(APPS)})


# Container ports: "http" on different numbers (and protocols) per pod, "dns" on UDP only.
POD_PORTS = st.sampled_from([{"name": "http", "port": 80}, {"name": "http", "port": 81},
                             {"name": "http", "protocol": "UDP", "port": 80},
                             {"name": "dns", "protocol": "UDP", "port": 53}, {"name": "metrics", "port": 81}])
RULE_PORTS = st.sampled_from([{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 81},
                              {"port": "http"}, {"protocol": "UDP", "port": "http"},
                              {"protocol": "UDP", "port": "dns"}, {"port": "nobody"}])


def _peer(draw):
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return {"podSelector": {"matchLabels": {"app": draw(APPS)}}}
    if choice == 1:
        return {"namespaceSelector": {"matchLabels": {"team": draw(st.sampled_from(["x", "y"]))}}}
    if choice == 2:
        return {"ipBlock": {"cidr": "10.65.0.0/24", "except": ["10.65.0.64/26"]}}
    return {"podSelector": {}, "namespaceSelector": {}}


@st.composite
def policy_event(draw):
    ns, name = draw(NSS), draw(st.sampled_from(["p1", "p2", "p3"]))
    key = P + keys.resource_key("networkpolicy", name, ns)
    if draw(st.integers(0, 3)) == 0:
        return key, None
    types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    sel = draw(st.sampled_from([{}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}}]))
    spec = {"podSelector": sel, "policyTypes": types}
    rules = [{"from" if d == "Ingress" else "to": [_peer(draw) for _ in range(draw(st.integers(0, 2)))],
              "ports": draw(st.lists(RULE_PORTS, min_size=1, max_size=2))}
             for d in types]
    for d, r in zip(types, rules, strict=True):
        spec["ingress" if d == "Ingress" else "egress"] = [r]
    return key, _doc("NetworkPolicy", name, spec, ns)


def _calico_rule(draw, direction: str) -> dict:
    side = "source" if direction == "ingress" else "destination"
    rule: dict = {"action": draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"]))}
    peer = draw(st.sampled_from([{}, {"selector": "app == 'web'"}, {"namespaceSelector": "team == 'x'"},
                                 {"nets": ["10.65.0.0/24"]}, {"notSelector": "app == 'db'"},
                                 {"notNets": ["10.65.0.0/26"], "selector": "all()"}]))
    if peer:
        rule[side] = peer
    proto = draw(st.sampled_from([None, "TCP", "UDP", "ICMP", 47]))
    if proto is not None:
        rule["protocol"] = proto
    if proto in ("TCP", "UDP"):
        rule.setdefault("destination", {})["ports"] = draw(st.sampled_from([[80], ["80:81"], ["http"], [81, "dns"]]))
        if draw(st.booleans()):
            rule["destination"]["notPorts"] = [81]
    if proto == "ICMP" and draw(st.booleans()):
        rule["icmp"] = {"type": 8, "code": 0}
    return rule


@st.composite
def calico_policy_event(draw):
    """tortie.io/v1 NetworkPolicies, GlobalNetworkPolicies (some by namespaceSelector) and
    Tiers, mixed with the Kubernetes policies above (tier default, order 1000)."""
    which = draw(st.integers(0, 2))
    if which == 2:
        name = draw(st.sampled_from(["default", "sec"]))
        key = P + keys.resource_key("tier", name)
        if draw(st.booleans()):
            return key, None
        return key, _doc("Tier", name, {"order": draw(st.sampled_from([1, 2000, 2_000_000]))})
    name = draw(st.sampled_from(["c1", "c2"]))
    ns = draw(NSS) if which == 0 else None
    key = P + (keys.resource_key("networkpolicy.tortie.io", name, ns) if ns else
               keys.resource_key("globalnetworkpolicy", name))
    if draw(st.integers(0, 3)) == 0:
        return key, None
    types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    spec: dict = {"types": types, "tier": draw(st.sampled_from(["default", "sec"])),
                  "selector": draw(st.sampled_from(["all()", "app == 'web'", "has(app) && app != 'db'"]))}
    if draw(st.booleans()):
        spec["order"] = draw(st.sampled_from([10, 1000, 1500.5]))
    if ns is None and draw(st.booleans()):
        spec["namespaceSelector"] = "team == 'x'"
    if ns is None and draw(st.booleans()):
        spec["applyOnForward"] = True
        if draw(st.booleans()) and types == ["Ingress"]:
            spec["preDNAT"] = True
        elif draw(st.booleans()):
            spec["doNotTrack"] = True
    for d in types:
        spec[d.lower()] = [_calico_rule(draw, d.lower()) for _ in range(draw(st.integers(0, 2)))]
    return key, _doc("GlobalNetworkPolicy" if ns is None else "NetworkPolicy", name, spec, ns, api="tortie.io/v1")


@st.composite
def host_endpoint_event(draw):
    """HostEndpoints of this node and another, one interface or all ("*")."""
    name = draw(st.sampled_from(["h1", "h2"]))
    key = P + keys.resource_key("hostendpoint", name)
    if draw(st.integers(0, 3)) == 0:
        return key, None
    spec = {"node": draw(st.sampled_from([ME, ME, OTHER])), "interfaceName": draw(st.sampled_from(["eth0", "*"]))}
    return key, _doc("HostEndpoint", name, spec, labels={"app": draw(APPS)})


@st.composite
def namespace_event(draw):
    name = draw(NSS)
    key = P + keys.resource_key("namespace", name)
    if draw(st.integers(0, 3)) == 0:
        return key, None
    return key, _doc("Namespace", name, None, labels={"team": draw(st.sampled_from(["x", "y"]))})


@st.composite
def pool_event(draw):
    name, cidr = draw(st.sampled_from([("p4", "10.65.0.0/16"), ("q4", "10.66.0.0/16")]))
    key = P + keys.resource_key("ippool", name)
    if draw(st.integers(0, 3)) == 0:
        return key, None
    spec = {"cidr": cidr, "natOutgoing": draw(st.booleans()), "disableBGPExport": draw(st.booleans())}
    kind = draw(st.integers(0, 2))
    if kind == 1:
        spec["egress"] = {"table": draw(st.sampled_from([101, 102])),
                          "nextHop": draw(st.sampled_from(["10.99.1.1", "10.99.2.1"]))}
        if draw(st.booleans()):
            spec["egress"]["address"] = draw(st.sampled_from(["192.0.2.4", "192.0.2.5"]))
    elif kind == 2:
        spec["egress"] = _from_peers(draw)
    if draw(st.booleans()):
        spec["bgp"] = draw(st.sampled_from([{"peers": "router == 'tor1'"}, {"communities": ["65000:9"]},
                                            {"peers": "has(router)", "asPathPrepend": 2}]))
    return key, _doc("IPPool", name, spec)


def _from_peers(draw) -> dict:
    """Egress next hops learned from the BGPPeers the selector picks (fromPeers)."""
    egress = {"table": draw(st.sampled_from([101, 102])), "fallback": draw(st.sampled_from(["none", "main"])),
              "fromPeers": draw(st.sampled_from(["router == 'tor1'", "has(router)"]))}
    if draw(st.booleans()):
        egress["prefixes"] = ["0.0.0.0/0", "192.0.2.0/24"]
    return egress


@st.composite
def affinity_event(draw):
    node = draw(st.sampled_from([ME, ME, OTHER]))
    block = draw(st.sampled_from(["10.65.0.0/26", "10.65.0.64/26", "10.66.0.0/26"]))
    key = P + keys.affinity_key(node, block)
    if draw(st.integers(0, 3)) == 0:
        return key, None
    return key, json.dumps({"state": draw(st.sampled_from(["confirmed", "confirmed", "pending"]))}).encode()


@st.composite
def node_event(draw):
    name = draw(st.sampled_from([ME, OTHER]))
    key = P + keys.resource_key("node", name)
    if draw(st.integers(0, 4)) == 0:
        return key, None
    addr = OWN_ADDR if name == ME else "10.99.0.2"
    spec = {"bgp": {"ipv4Address": addr + "/24"}}
    if draw(st.booleans()):
        spec["addresses"] = [{"address": "10.98.0." + ("1" if name == ME else "2"), "type": "CalicoNodeIP"}]
    return key, _doc("Node", name, spec)


@st.composite
def bgp_event(draw):
    if draw(st.booleans()):
        name, ip = draw(st.sampled_from([("tor", "10.99.0.254"), ("tor2", "10.99.0.253")]))
        key = P + keys.resource_key("bgppeer", name)
        if draw(st.booleans()):
            return key, None
        labels = draw(st.sampled_from([{}, {"router": "tor1"}, {"router": "tor2"}]))
        return key, _doc("BGPPeer", name, {"peerIP": ip, "asNumber": 65000}, labels=labels)
    key = P + keys.resource_key("bgpconfiguration", "default")
    if draw(st.booleans()):
        return key, None
    return key, _doc("BGPConfiguration", "default", {"nodeToNodeMeshEnabled": draw(st.booleans()),
                                                     "communities": draw(st.sampled_from([[], ["65000:1"]]))})


@st.composite
def learned_event(draw):
    # others' blocks, our blocks coming back, a more specific of ours, pods' /32s (ours,
    # other nodes', or nobody's), outside every pool
    prefix = draw(st.sampled_from(["10.65.0.0/26", "10.65.0.64/26", "10.65.9.0/26", "10.65.0.16/28",
                                   "10.65.0.1/32", "10.65.0.3/32", "10.65.0.2/32", "10.70.0.1/32",
                                   "10.65.0.70/32"]))
    if draw(st.booleans()):
        return ("learned", {}, [prefix])
    hops = tuple(sorted(set(draw(st.lists(st.sampled_from(["10.99.0.2", "10.99.0.3", OWN_ADDR]),
                                           min_size=1, max_size=2)))))
    return ("learned", {prefix: hops}, [])


@st.composite
def egress_learned_event(draw):
    """The speaker's egress view: per peer, the prefixes it announces now, with next hops."""
    view = {}
    for peer in draw(st.sets(st.sampled_from(["10.99.0.254", "10.99.0.253"]))):
        prefixes = draw(st.sets(st.sampled_from(["0.0.0.0/0", "192.0.2.0/24"]), min_size=1))
        view[peer] = {p: draw(st.sampled_from([peer, "10.99.0.250"])) for p in prefixes}
    return ("egress", view)


EVENT = st.one_of(egress_learned_event(), wep_event(), wep_event(), wep_event(), policy_event(), policy_event(),
                  calico_policy_event(), calico_policy_event(), host_endpoint_event(), namespace_event(), namespace_event(), pool_event(), affinity_event(), node_event(),
                  bgp_event(), learned_event())


def _fresh(items: dict, learned: dict, egress: dict | None = None, bfd_up: frozenset = frozenset()) -> Accumulated:
    calc = Calculation(ME, prefix=P, own_addresses=frozenset({OWN_ADDR}))
    for peer in bfd_up:
        calc.on_bfd(peer, True)
    calc.on_snapshot(items)
    calc.replace_learned(learned)
    calc.on_egress_learned(egress or {})
    acc = Accumulated()
    acc.feed(calc.take_messages())
    # the snapshot path against the reference functions, computed whole
    want = desired(calc.state, ME, learned, frozenset({OWN_ADDR}), frozenset(bfd_up), egress_learned=egress)
    assert acc.exports == set(want.exports)
    assert set(acc.routes.get("egress", {}).values()) == set(want.egress_routes)
    assert acc.rules.get("egress", frozenset()) == want.rules
    assert set(acc.routes.get("workloads", {}).values()) == set(want.workload_routes)
    assert set(acc.routes.get("bgp", {}).values()) == set(want.bgp_routes)
    assert calc.refused == dict(want.refused)
    full = network_policy(calc.state, ME)
    assert acc.pods == {f.interface: f for f in full.pods}
    assert acc.policies == {p.key: p for p in full.policies}
    return acc


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(EVENT, max_size=8), events=st.lists(EVENT, min_size=1, max_size=25),
       batch=st.integers(1, 4))
def test_accumulated_deltas_equal_a_full_recompute(initial, events, batch):
    _deltas_equal_a_full_recompute(initial, events, batch)


@st.composite
def peer_event(draw):
    name, ip = draw(st.sampled_from([("tor", "10.99.0.254"), ("tor2", "10.99.0.253")]))
    key = P + keys.resource_key("bgppeer", name)
    if draw(st.integers(0, 4)) == 0:
        return key, None
    labels = draw(st.sampled_from([{}, {"router": "tor1"}, {"router": "tor2"}, {"router": "tor1"}]))
    bfd = draw(st.sampled_from([None, {"minTx": 100}]))  # silenced while BFD is not Up
    return key, _doc("BGPPeer", name, {"peerIP": ip, "asNumber": 65000, **({"bfd": bfd} if bfd else {})},
                     labels=labels)


@st.composite
def from_peers_pool_event(draw):
    name, cidr = draw(st.sampled_from([("p4", "10.65.0.0/16"), ("q4", "10.66.0.0/16")]))
    key = P + keys.resource_key("ippool", name)
    if draw(st.integers(0, 4)) == 0:
        return key, None
    return key, _doc("IPPool", name, {"cidr": cidr, "egress": _from_peers(draw)})


# Egress next hops learned from BGP (fromPeers) need a node, a labelled BGPPeer, a pool and
# the speaker's view all at once: rare among all events, so they get a run of their own.
EGRESS_EVENT = st.one_of(egress_learned_event(), egress_learned_event(), pool_event(), from_peers_pool_event(),
                         from_peers_pool_event(), peer_event(),
                         peer_event(), bgp_event(), st.tuples(st.just("bfd"), st.sampled_from(["10.99.0.254"]),
                                                              st.booleans()))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(EGRESS_EVENT, max_size=8), events=st.lists(EGRESS_EVENT, min_size=1, max_size=25),
       batch=st.integers(1, 4))
def test_learned_egress_deltas_equal_a_full_recompute(initial, events, batch):
    me = (P + keys.resource_key("node", ME), _doc("Node", ME, {"bgp": {"ipv4Address": OWN_ADDR + "/24"}}))
    _deltas_equal_a_full_recompute([me, *initial], events, batch)


def _deltas_equal_a_full_recompute(initial, events, batch):
    items: dict[str, bytes] = {}
    learned: dict[str, tuple[str, ...]] = {}
    egress: dict = {}
    bfd_up: set[str] = set()

    def fold(ev, calc=None):
        if ev[0] == "bfd":
            (bfd_up.add if ev[2] else bfd_up.discard)(ev[1])
            if calc is not None:
                calc.on_bfd(ev[1], ev[2])
            return
        if ev[0] == "egress":
            egress.clear()
            egress.update(ev[1])
            if calc is not None:
                calc.on_egress_learned(ev[1])
            return
        if ev[0] == "learned":
            _, changed, removed = ev
            learned.update(changed)
            for p in removed:
                learned.pop(p, None)
            if calc is not None:
                calc.on_learned(changed, removed)
            return
        key, value = ev
        if value is None:
            items.pop(key, None)
        else:
            items[key] = value
        if calc is not None:
            calc.on_update(key, value)

    for ev in initial:
        fold(ev)
    calc = Calculation(ME, prefix=P, own_addresses=frozenset({OWN_ADDR}))
    calc.on_snapshot(dict(items))
    for peer in bfd_up:
        calc.on_bfd(peer, True)
    calc.replace_learned(dict(learned))
    calc.on_egress_learned(dict(egress))
    acc = Accumulated()
    acc.feed(calc.take_messages())
    for i, ev in enumerate(events):
        fold(ev, calc)
        if i % batch == 0:  # messages taken after one event or after a few
            acc.feed(calc.take_messages())
    acc.feed(calc.take_messages())
    assert acc.view() == _fresh(items, learned, egress, frozenset(bfd_up)).view()


@settings(max_examples=60, deadline=None)
@given(first=st.lists(EVENT, max_size=10), second=st.lists(EVENT, max_size=10))
def test_a_second_snapshot_emits_only_the_difference(first, second):
    """A compaction resync replaces the whole view: what is emitted after it still sums up
    to the new state."""
    items: dict[str, bytes] = {}
    for ev in first:
        if ev[0] not in ("learned", "egress"):
            items[ev[0]] = ev[1] if ev[1] is not None else items.pop(ev[0], None) or b""
    items = {k: v for k, v in items.items() if v}
    calc = Calculation(ME, prefix=P, own_addresses=frozenset({OWN_ADDR}))
    calc.on_snapshot(items)
    acc = Accumulated()
    acc.feed(calc.take_messages())
    later = dict(items)
    for ev in second:
        if ev[0] in ("learned", "egress"):
            continue
        if ev[1] is None:
            later.pop(ev[0], None)
        else:
            later[ev[0]] = ev[1]
    calc.on_snapshot(later)
    acc.feed(calc.take_messages())
    assert acc.view() == _fresh(later, {}).view()
