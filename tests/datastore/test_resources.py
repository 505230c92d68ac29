import re
import threading

import pytest

from tortie.datastore import resources as r
from tortie.datastore.store import ResourceStore
from tortie.errors import AlreadyExists, Conflict, NotFound, ValidationError


def pool(name="p1", cidr="10.10.0.0/16", **spec):
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec}}


def netpol(spec, name="np"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "ns1"}, "spec": spec}


# --- validation -----------------------------------------------------------------------

_PEER = {"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
         "spec": {"peerIP": "10.0.0.1", "asNumber": 1}}
_BGPCONF = {"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"}}
_WEP = {"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"}}


@pytest.mark.parametrize(("resource", "field"), [
    ({**_PEER, "spec": {**_PEER["spec"], "keepOriginalNextHop": True}}, "spec.keepOriginalNextHop"),
    ({**_PEER, "spec": {**_PEER["spec"], "holdTime": 90, "keepAliveTime": 20}}, "spec.keepAliveTime"),
    ({**_WEP, "spec": {"node": "n", "profiles": ["kns.default"]}}, "spec.profiles"),
])
def test_settings_tortie_would_ignore_are_refused(resource, field):
    """Issue 12, finding 6: no setting is accepted and then silently ignored."""
    with pytest.raises(ValidationError) as err:
        r.validate(resource)
    assert err.value.field == field and "is not supported yet" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_service_ranges_are_accepted_now_that_they_are_announced():
    """Issue 9: the Service ranges work (agent.calc_services.service_exports), so they are kept."""
    doc = r.validate({**_BGPCONF, "spec": {"serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
                                           "serviceExternalIPs": [{"cidr": "192.0.2.0/24"}],
                                           "serviceLoadBalancerIPs": [{"cidr": "198.51.100.0/24"}]}})
    assert doc["spec"]["serviceLoadBalancerIPs"] == [{"cidr": "198.51.100.0/24"}]
    with pytest.raises(ValidationError) as err:
        r.validate({**_BGPCONF, "spec": {"serviceClusterIPs": [{"cidr": "10.96.0.1/12"}]}})
    assert err.value.field == "spec.serviceClusterIPs[0].cidr"


def test_unsupported_settings_at_their_default_are_accepted():
    r.validate({**_PEER, "spec": {**_PEER["spec"], "keepOriginalNextHop": False, "holdTime": 90,
                                  "keepAliveTime": 30}})
    r.validate({**_BGPCONF, "spec": {"serviceClusterIPs": [], "logSeverityScreen": "Debug"}})
    r.validate({**_WEP, "spec": {"node": "n", "profiles": []}})


def test_pool_defaults_and_normalization():
    res = r.validate(pool(cidr="10.10.0.0/16"))
    assert res["spec"] == {"cidr": "10.10.0.0/16", "blockSize": 26, "natOutgoing": False,
                           "disabled": False, "disableBGPExport": False, "nodeSelector": "all()"}
    v6 = r.validate(pool(cidr="fd00:10:0::/48"))
    assert v6["spec"]["blockSize"] == 122 and v6["spec"]["cidr"] == "fd00:10::/48"


@pytest.mark.parametrize("cidr", ["10.10.3.7/16", "fd00:10::1/48"])
def test_unmasked_pool_cidr_is_rejected_with_the_masked_form(cidr):
    with pytest.raises(ValidationError, match="host bits set") as exc:
        r.validate(pool(cidr=cidr))
    assert exc.value.field == "spec.cidr"


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        (pool(cidr="10.10.0.0/33"), "spec.cidr"),
        (pool(cidr=None), "spec.cidr"),
        (pool(blockSize=33), "spec.blockSize"),
        (pool(cidr="10.0.0.0/28", blockSize=26), "spec.blockSize"),
        (pool(blockSize="26"), "spec.blockSize"),
        (pool(natOutgoing="yes"), "spec.natOutgoing"),
        (pool(nodeSelector="zone =="), "spec.nodeSelector"),
        (pool(ipipMode="Always"), "spec.ipipMode"),
        (pool(blocksize=26), "spec.blocksize"),  # typo: unknown field
        (pool(egress={"table": 254, "nextHop": "10.0.0.1"}), "spec.egress.table"),
        (pool(egress={"table": 100, "nextHop": "fd00::1"}), "spec.egress.nextHop"),
        (pool(egress={"table": 100}), "spec.egress.nextHop"),
        (pool(name="Bad_Name"), "metadata.name"),
        ({**pool(), "metadata": {"name": "p", "labels": {"a": "b c"}}}, "metadata.labels[a]"),
        ({**pool(), "metadata": {"name": "p", "labels": {"a": 1}}}, "metadata.labels[a]"),
        ({**pool(), "metadata": {"name": "p", "namespace": "x"}}, "metadata.namespace"),
        ({**pool(), "apiVersion": "projectcalico.org/v3"}, "apiVersion"),
        ({**pool(), "kind": "ippool"}, "kind"),
        ({**pool(), "kind": "Gadget"}, "kind"),
        ({**pool(), "extra": 1}, "extra"),
        ({"apiVersion": "tortie.io/v1", "kind": "IPAMConfig", "metadata": {"name": "x"}, "spec": {}},
         "metadata.name"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1"}}, "spec.asNumber"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1:99999", "asNumber": 1}}, "spec.peerIP"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"asNumber": 1}}, "spec.peerIP"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1", "asNumber": 1, "node": "a", "nodeSelector": "all()"}},
         "spec.nodeSelector"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1", "asNumber": 1, "holdTime": "90 seconds"}}, "spec.holdTime"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1", "asNumber": 1, "holdTime": "2s"}}, "spec.holdTime"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1", "asNumber": 1, "maxPrefixes": 0}}, "spec.maxPrefixes"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "x"},
          "spec": {"peerIP": "10.0.0.1", "asNumber": 1, "maxPrefixes": "many"}}, "spec.maxPrefixes"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
          "spec": {"communities": ["65000:100", "no-export"]}}, "spec.communities[1]"),
        ({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n"},
          "spec": {"bgp": {"ipv4Address": "fd00::1/64"}}}, "spec.bgp.ipv4Address"),
        ({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n"},
          "spec": {"bgp": {"asNumber": 0}}}, "spec.bgp.asNumber"),
        ({"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "other"},
          "spec": {}}, "metadata.name"),
        ({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"},
          "spec": {"ipNetworks": ["10.0.0.1/32"]}}, "spec.node"),
        ({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"},
          "spec": {"node": "n", "ipNetworks": ["10.0.0.300/32"]}}, "spec.ipNetworks[0]"),
        ({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"},
          "spec": {"node": "n", "interfaceName": "a-very-long-interface-name"}}, "spec.interfaceName"),
        (netpol({}), "spec.podSelector"),
        (netpol({"podSelector": {}, "policyTypes": ["Inbound"]}), "spec.policyTypes"),
        (netpol({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}),
         "spec.podSelector.matchExpressions[0].operator"),
        (netpol({"podSelector": {}, "ingress": [{"from": [{}]}]}), "spec.ingress[0].from[0]"),
        (netpol({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"},
                                                            "podSelector": {}}]}]}),
         "spec.ingress[0].from[0].ipBlock"),
        (netpol({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                                     "except": ["11.0.0.0/16"]}}]}]}),
         "spec.egress[0].to[0].ipBlock.except[0]"),
        (netpol({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}), "spec.ingress[0].ports[0].port"),
        (netpol({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
         "spec.ingress[0].ports[0].endPort"),
        (netpol({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
         "spec.ingress[0].ports[0].protocol"),
    ],
)
def test_validation_names_the_field(resource, field):
    with pytest.raises(ValidationError) as err:
        r.validate(resource)
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(field)


def test_kubernetes_kinds_are_accepted_as_written():
    res = r.validate(netpol({
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                               "podSelector": {}}],
                     "ports": [{"port": 5432}, {"port": "metrics", "protocol": "UDP"}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}],
    }))
    assert res["spec"]["policyTypes"] == ["Ingress", "Egress"]  # the API server's defaulting
    assert res["spec"]["ingress"][0]["ports"][0] == {"port": 5432, "protocol": "TCP"}
    ns = r.validate({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "team-a", "labels": {"team": "a"},
                                  "managedFields": [{"manager": "kubectl"}]},
                     "status": {"phase": "Active"}})
    assert ns["metadata"] == {"name": "team-a", "labels": {"team": "a"}}
    assert netpol({"podSelector": {}})["metadata"]["namespace"] == "ns1"


def test_kind_aliases():
    for alias in ("IPPool", "ippools", "pool", "POOLS"):
        assert r.kind_for(alias).name == "IPPool"
    assert r.kind_for("netpol").name == "NetworkPolicy"
    assert r.kind_for("wep").namespaced


# --- views ----------------------------------------------------------------------------

def test_views():
    p = r.IPPool.from_resource(pool(egress={"table": 100, "nextHop": "192.168.5.1"},
                                    nodeSelector="rack == 'a'"))
    assert p.block_size == 26 and p.version == 4 and p.egress == r.Egress(100, ("192.168.5.1",))
    assert p.selects({"rack": "a"}) and not p.selects({"rack": "b"})
    node = r.Node.from_resource({"apiVersion": "tortie.io/v1", "kind": "Node",
                                 "metadata": {"name": "n1", "labels": {"rack": "a"}},
                                 "spec": {"bgp": {"ipv4Address": "10.0.0.1/24", "asNumber": "1.10"}}})
    assert node.ipv4 == "10.0.0.1" and node.as_number == 65546 and node.ipv6 is None
    peer = r.BGPPeer.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPPeer",
                                    "metadata": {"name": "tor"},
                                    "spec": {"peerIP": "[fd00::1]:1179", "asNumber": 65000,
                                             "nodeSelector": "rack == 'a'"}})
    assert (peer.peer_ip, peer.port) == ("fd00::1", 1179)
    timed = r.BGPPeer.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "t"},
                                     "spec": {"peerIP": "10.0.0.9", "asNumber": 1, "holdTime": "1m30s",
                                              "keepAliveTime": 30, "password": "s3cret",
                                              "acceptPrefixes": ["0.0.0.0/0", "10.9.0.0/16"]}})
    assert (timed.hold_time, timed.keepalive_time, timed.password) == (90, 30, "s3cret")
    assert timed.accept_prefixes == ("0.0.0.0/0", "10.9.0.0/16")
    assert peer.applies_to(node)
    assert not peer.applies_to(r.Node(name="n2", labels={"rack": "b"}, resource_version=0))
    mesh = r.BGPPeer.from_resource({"apiVersion": "tortie.io/v1", "kind": "BGPPeer",
                                    "metadata": {"name": "rr"},
                                    "spec": {"peerSelector": "has(rr)"}})
    rr = r.Node(name="rr1", labels={"rr": ""}, resource_version=0)
    assert mesh.applies_to(node) and mesh.peer_nodes([node, rr]) == [rr]
    assert len({node, r.Node.from_resource({"apiVersion": "tortie.io/v1", "kind": "Node",
                                             "metadata": {"name": "n1", "labels": {"rack": "a"}},
                                             "spec": {"bgp": {"ipv4Address": "10.0.0.1/24",
                                                              "asNumber": 65546}}})}) == 1
    with pytest.raises(TypeError):
        node.labels["rack"] = "b"  # views are values
    with pytest.raises(ValidationError, match="expected a Node"):
        r.Node.from_resource(pool())


def test_effective_bgp_config_layers():
    default = r.BGPConfiguration.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
        "spec": {"asNumber": 65001, "nodeToNodeMeshEnabled": False}})
    node = r.BGPConfiguration.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "node.n1"},
        "spec": {"listenPort": 1179}})
    eff = r.effective_bgp_config(default, node)
    assert (eff.as_number, eff.node_to_node_mesh, eff.listen_port) == (65001, False, 1179)
    assert r.effective_bgp_config(None).as_number == r.DEFAULT_AS


def test_keys():
    assert r.key_for(r.kind_for("IPPool"), "p1") == "resources/ippool/p1"
    assert r.key_for(r.kind_for("NetworkPolicy"), "np", "ns1") == "resources/networkpolicy/ns1/np"
    kind, ns, name = r.parse_key("resources/workloadendpoint/ns1/w1")
    assert (kind.name, ns, name) == ("WorkloadEndpoint", "ns1", "w1")
    assert r.parse_key("resources/ippool/a/b") is None
    assert r.parse_key("ipam/blocks/10.0.0.0-26") is None


# --- the store against real etcd -------------------------------------------------------

@pytest.fixture
def store(etcd):
    return ResourceStore(etcd)


def test_crud_round_trip(store, etcd, etcd_prefix):
    created = store.create(pool())
    rv = created["metadata"]["resourceVersion"]
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    raw = etcd.get(etcd_prefix + "resources/ippool/p1")
    assert raw.mod_revision == int(rv) and b"resourceVersion" not in raw.value
    assert store.get("ippool", "p1") == created
    with pytest.raises(AlreadyExists):
        store.create(pool())
    updated = store.apply(pool(natOutgoing=True))
    assert updated["spec"]["natOutgoing"] and updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(updated["metadata"]["resourceVersion"]) > int(rv)
    assert [p["metadata"]["name"] for p in store.list("pools")] == ["p1"]
    assert store.views("ippool")[0].nat_outgoing
    assert store.delete("ippool", "p1")["spec"]["natOutgoing"]
    with pytest.raises(NotFound):
        store.get("ippool", "p1")
    with pytest.raises(NotFound):
        store.delete("ippool", "p1")
    with pytest.raises(NotFound):
        store.replace(pool())


def test_resource_version_guards_writes(store):
    first = store.create(pool())
    store.apply(pool(disabled=True))
    stale = {**pool(natOutgoing=True), "metadata": dict(first["metadata"])}
    with pytest.raises(Conflict, match="changed"):
        store.apply(stale)
    with pytest.raises(Conflict):
        store.delete("ippool", "p1", resource_version=first["metadata"]["resourceVersion"])
    fresh = store.get("ippool", "p1")
    assert store.replace({**pool(natOutgoing=True), "metadata": fresh["metadata"]})["spec"]["natOutgoing"]


def test_namespaced_list(store):
    for ns, name in (("a", "x"), ("b", "x"), ("a", "y")):
        store.create({**netpol({"podSelector": {}}, name), "metadata": {"name": name, "namespace": ns}})
    assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in store.list("netpol")] == [
        ("a", "x"), ("a", "y"), ("b", "x")]
    assert len(store.list("netpol", namespace="b")) == 1
    assert store.get("netpol", "x", "b")["metadata"]["namespace"] == "b"
    with pytest.raises(NotFound, match="namespace c"):
        store.get("netpol", "x", "c")


def test_pools_may_not_overlap_and_keep_their_shape(store):
    store.create(pool("a", "10.10.0.0/16"))
    with pytest.raises(ValidationError, match="overlaps IPPool 'a'") as err:
        store.create(pool("b", "10.10.128.0/17"))
    assert err.value.field == "spec.cidr"
    store.create(pool("c", "fd00::/48"))  # other family: no overlap
    with pytest.raises(ValidationError) as err:
        store.apply(pool("a", "10.10.0.0/16", blockSize=28))
    assert err.value.field == "spec.blockSize"
    store.delete("ippool", "a")
    store.create(pool("b", "10.10.128.0/17"))


def test_concurrent_overlapping_pool_creates_admit_exactly_one(etcd_config):
    # Each thread has its own client, so the serial key is what stops the race.
    from tortie.datastore.etcd import EtcdClient
    results: list[str] = []
    barrier = threading.Barrier(6)

    def create(i: int) -> None:
        with EtcdClient(etcd_config) as client:
            barrier.wait()
            try:
                ResourceStore(client).create(pool(f"p{i}", f"10.20.{i}.0/24" if i % 2 else "10.20.0.0/16"))
                results.append(f"p{i}")
            except (ValidationError, Conflict):
                pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with EtcdClient(etcd_config) as client:
        pools = ResourceStore(client).views("ippool")
        client.delete_prefix(etcd_config.prefix)
    nets = [p.network for p in pools]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:]), nets
    assert sorted(p.name for p in pools) == sorted(results) and results


def test_network_policy_view_follows_kubernetes_peer_rules():
    pol = r.NetworkPolicy.from_resource(netpol({
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"role": "api"}}},  # same namespace only
                      {"namespaceSelector": {"matchLabels": {"team": "ops"}}},  # any pod there
                      {"namespaceSelector": {"matchLabels": {"team": "a"}},
                       "podSelector": {"matchLabels": {"role": "batch"}}}],  # both must hold
             "ports": [{"port": 5432}, {"protocol": "UDP", "port": 5000, "endPort": 5010}]},
        ],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}],
    }))
    assert pol.policy_types == ("Ingress", "Egress")
    assert pol.selects({"app": "db"}, "ns1") and not pol.selects({"app": "db"}, "other")
    api, ops, both = pol.ingress[0].peers
    assert api.matches_pod({"role": "api"}, "ns1", {}, "ns1")
    assert not api.matches_pod({"role": "api"}, "ns2", {}, "ns1")
    assert ops.matches_pod({}, "ops-ns", {"team": "ops"}, "ns1")
    assert not ops.matches_pod({}, "ns1", {}, "ns1")
    assert both.matches_pod({"role": "batch"}, "a-ns", {"team": "a"}, "ns1")
    assert not both.matches_pod({"role": "web"}, "a-ns", {"team": "a"}, "ns1")
    assert pol.ingress[0].ports == (r.PolicyPort("TCP", 5432), r.PolicyPort("UDP", 5000, 5010))
    (block,) = pol.egress[0].peers
    assert block.except_cidrs == ("10.1.0.0/16",)
    assert block.matches_address("10.9.9.9") and not block.matches_address("10.1.9.9")
    assert not block.matches_address("11.0.0.1") and not block.matches_address("fd00::1")
    assert not block.matches_pod({}, "ns1", {}, "ns1")
    deny_all = r.NetworkPolicy.from_resource(netpol({"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert deny_all.selects({"any": "pod"}, "ns1") and deny_all.ingress == ()


SAMPLES = [
    pool(cidr="10.1.0.0/16", egress={"table": 100, "nextHop": "10.1.0.1", "interface": "eth1"}, ipipMode="Never"),
    {"apiVersion": "tortie.io/v1", "kind": "IPAMConfig", "metadata": {"name": "default"}, "spec": {}},
    {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"example.com/rack": "r1"}},
     "spec": {"bgp": {"ipv4Address": "10.0.0.1", "ipv6Address": "fd00::1/64", "asNumber": "1.10",
                      "routeReflectorClusterID": "224.0.0.1"},
              "addresses": [{"address": "10.0.0.1", "type": "InternalIP"}]}},
    {"apiVersion": "tortie.io/v1", "kind": "BGPPeer", "metadata": {"name": "tor"},
     "spec": {"peerIP": "[fd00::1]:179", "asNumber": 65001, "holdTime": "1m", "acceptPrefixes": ["0.0.0.0/0"]}},
    {"apiVersion": "tortie.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "node.n1"},
     "spec": {"communities": ["65000:1", "1:2:3"], "serviceClusterIPs": [], "logSeverityScreen": "Debug"}},
    {"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
     "metadata": {"name": "n1-k8s-web-eth0", "namespace": "ns1", "annotations": {"note": "any text at all"}},
     "spec": {"node": "n1", "pod": "web", "ipNetworks": ["10.65.0.7/32"], "mac": "02:00:00:00:00:01",
              "ports": [{"name": "http", "port": 80}]}},
    netpol({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns1"}},
]


@pytest.mark.parametrize("resource", SAMPLES, ids=lambda s: s["kind"])
def test_validation_is_idempotent_and_every_kind_has_a_view(resource):
    once = r.validate(resource)
    assert r.validate(once) == once  # what the store keeps re-validates unchanged
    view = r.VIEWS[once["kind"].lower()].from_resource(once)
    assert view.name == once["metadata"]["name"]
    hash(view)


def test_apply_likely_new_creates_blind_and_replaces_what_is_there(store):
    wep = {"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
           "metadata": {"name": "w", "namespace": "default"},
           "spec": {"node": "n1", "orchestrator": "k8s", "endpoint": "eth0", "pod": "p",
                    "ipNetworks": ["10.65.0.1/32"]}}
    first = store.apply(wep, likely_new=True)
    assert first["metadata"]["uid"]
    again = store.apply({**wep, "spec": {**wep["spec"], "pod": "q"}}, likely_new=True)
    assert again["metadata"]["uid"] == first["metadata"]["uid"]  # replaced, not made anew
    assert int(again["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert store.get("workloadendpoint", "w", "default")["spec"]["pod"] == "q"


def test_egress_next_hops_and_fallback():
    """Issue 11: several next hops (ECMP) and what happens when none is usable."""
    p = r.IPPool.from_resource(pool(egress={"table": 100, "nextHops": [{"address": "192.168.5.2"},
                                                                        {"address": "192.168.6.1"}],
                                            "fallback": "main"}))
    assert p.egress == r.Egress(100, ("192.168.5.2", "192.168.6.1"), None, "main")
    same = r.IPPool.from_resource(pool(egress={"table": 100, "nextHops": [
        {"address": "192.168.5.2", "interface": "eth1", "weight": 1}, {"address": "192.168.5.3", "interface": "eth1"}]}))
    assert same.egress.interface == "eth1" and same.egress.fallback == "none"
    watched = r.IPPool.from_resource(pool(egress={"table": 100, "nextHops": [
        {"address": "192.168.5.2", "bfd": {"minTx": "100ms", "minRx": "1s"}}, {"address": "192.168.5.3"}]}))
    assert watched.egress.bfd == (("192.168.5.2", 100, 1000, 3),)
    bad = [
        ({"table": 100}, "spec.egress.nextHop: is required"),
        ({"table": 100, "nextHops": []}, "spec.egress.nextHops: must name at least one next hop"),
        ({"table": 100, "nextHop": "192.168.5.1", "nextHops": [{"address": "192.168.5.2"}]}, "not both"),
        ({"table": 100, "nextHops": [{"address": "nope"}]}, "spec.egress.nextHops[0].address"),
        ({"table": 100, "nextHops": [{"address": "fd00::1"}]}, "spec.egress.nextHops[0].address"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2"}, {"address": "192.168.5.2"}]}, "twice"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2", "weight": 3}]}, "not supported yet"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2", "interface": "eth0"},
                                     {"address": "192.168.6.1", "interface": "eth1"}]}, "not supported yet"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2"}], "interface": "eth0"}, "per next hop"),
        ({"table": 100, "nextHop": "192.168.5.1", "fallback": "elsewhere"}, "spec.egress.fallback"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2", "bfd": {"minTx": 5}}]},
         "spec.egress.nextHops[0].bfd.minTx: must be between 10 and 60000"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2", "bfd": {"minRx": "fast"}}]},
         "spec.egress.nextHops[0].bfd.minRx: 'fast' is not an interval"),
        ({"table": 100, "nextHops": [{"address": "192.168.5.2", "bfd": {"multiplier": 0}}]}, "multiplier"),
    ]
    for egress, words in bad:
        with pytest.raises(ValidationError, match=re.escape(words)):
            r.IPPool.from_resource(pool(egress=egress))
