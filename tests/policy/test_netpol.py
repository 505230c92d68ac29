"""NetworkPolicy semantics, pure: datastore views -> which local pods are isolated and what
their filter allows (`netpol.allows` evaluates the values the ruleset is rendered from)."""

import pytest

from tortie.datastore import resources as res
from tortie.errors import ValidationError
from tortie.policy.filter_mgr import policy_chain, render
from tortie.policy.netpol import EGRESS, INGRESS, allows, compute

NODE = "n1"


def wep(ref, ip, node=NODE, labels=None, iface=None, ports=()):
    """ports: "name=port[/PROTO]" items, as `tortie-lab pod add --port` takes them."""
    ns, name = ref.split("/")
    spec = {"node": node, "interfaceName": iface or f"tor{name[:11]}", "ipNetworks": [ip]}
    if ports:
        spec["ports"] = [{"name": n, "port": int(p.split("/")[0]), "protocol": [*p.split("/"), "TCP"][1]}
                         for n, p in (item.split("=") for item in ports)]
    return res.WorkloadEndpoint.from_resource({
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec})


def pol(ref, **spec):
    ns, name = ref.split("/")
    spec.setdefault("podSelector", {})
    return res.NetworkPolicy.from_resource({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})


def namespace(name, **labels):
    return res.Namespace.from_resource({"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": name, "labels": labels}})


# A small cluster: web and db in "shop" on this node, client pods elsewhere.
WEB = wep("shop/web", "10.65.0.1/32", labels={"app": "web"})
DB = wep("shop/db", "10.65.0.2/32", labels={"app": "db"})
FRONT = wep("shop/front", "10.65.1.3/32", node="n2", labels={"role": "frontend"})
PLAIN = wep("shop/plain", "10.65.1.4/32", node="n2")  # no labels
MON = wep("ops/mon", "10.65.1.5/32", node="n2", labels={"role": "frontend"})
OTHER = wep("other/x", "10.65.0.6/32", labels={"app": "web"})  # local, another namespace
WEPS = [WEB, DB, FRONT, PLAIN, MON, OTHER]
NAMESPACES = {"ops": namespace("ops", team="ops"), "shop": namespace("shop", team="shop")}


def filt(*policies, weps=WEPS, namespaces=NAMESPACES):
    return compute(NODE, weps, policies, namespaces)


def ip(w):
    return w.ip_networks[0].split("/")[0]


def ingress_ok(f, dst, src, proto="TCP", port=80):
    return allows(f, dst.interface_name, INGRESS, ip(src) if isinstance(src, res.WorkloadEndpoint) else src,
                  proto, port, local=ip(dst))


def egress_ok(f, src, dst, proto="TCP", port=80):
    return allows(f, src.interface_name, EGRESS, ip(dst) if isinstance(dst, res.WorkloadEndpoint) else dst,
                  proto, port)


def test_no_policy_isolates_nothing_and_renders_no_table():
    f = filt()
    assert f.pods == ()
    assert render(f) is None
    assert ingress_ok(f, WEB, PLAIN) and egress_ok(f, WEB, "8.8.8.8")


def test_default_deny_ingress_isolates_every_pod_of_its_namespace_only():
    f = filt(pol("shop/deny"))
    assert {p.name for p in f.pods} == {"web", "db"}  # local pods of shop; other/x untouched
    assert all(p.egress is None for p in f.pods)
    assert not ingress_ok(f, WEB, FRONT) and not ingress_ok(f, DB, WEB)
    assert ingress_ok(f, OTHER, FRONT)
    assert egress_ok(f, WEB, "8.8.8.8")  # ingress-only policy leaves egress open


def test_policies_of_other_namespaces_and_remote_pods_are_not_rendered():
    f = filt(pol("ops/deny"))
    assert f.pods == ()  # ops has no local pod
    assert render(f) is None


def test_pod_selector_picks_pods_by_label():
    f = filt(pol("shop/web-only", podSelector={"matchLabels": {"app": "web"}}))
    assert [p.name for p in f.pods] == ["web"]
    assert not ingress_ok(f, WEB, FRONT)
    assert ingress_ok(f, DB, FRONT)


def test_allow_from_pod_selector_is_the_policy_namespace_only():
    f = filt(pol("shop/allow", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]}]))
    assert ingress_ok(f, WEB, FRONT)
    assert not ingress_ok(f, WEB, MON)  # same label, other namespace
    assert not ingress_ok(f, WEB, PLAIN)  # no labels


def test_union_of_policies_selecting_a_pod():
    f = filt(pol("shop/deny"),
             pol("shop/a", podSelector={"matchLabels": {"app": "web"}},
                 ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]}]),
             pol("shop/b", podSelector={"matchLabels": {"app": "web"}},
                 ingress=[{"from": [{"ipBlock": {"cidr": "10.65.1.4/32"}}]}]))
    web = next(p for p in f.pods if p.name == "web")
    assert set(web.ingress) == {"shop/deny", "shop/a", "shop/b"}
    assert ingress_ok(f, WEB, FRONT) and ingress_ok(f, WEB, PLAIN)
    assert not ingress_ok(f, WEB, MON)
    assert not ingress_ok(f, DB, FRONT)  # db only has the deny


def test_empty_from_allows_everyone_and_empty_rule_list_nobody():
    f = filt(pol("shop/all", ingress=[{}]))
    assert ingress_ok(f, WEB, MON) and ingress_ok(f, WEB, "203.0.113.9")
    f = filt(pol("shop/none", ingress=[]))
    assert not ingress_ok(f, WEB, MON)


def test_namespace_selector_alone_means_every_pod_there():
    f = filt(pol("shop/from-ops", ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]))
    assert ingress_ok(f, WEB, MON)
    assert not ingress_ok(f, WEB, FRONT)


def test_empty_namespace_selector_means_every_namespace():
    f = filt(pol("shop/any-pod", ingress=[{"from": [{"namespaceSelector": {}}]}]))
    assert ingress_ok(f, WEB, MON) and ingress_ok(f, WEB, FRONT)
    assert not ingress_ok(f, WEB, "203.0.113.9")  # not a pod


def test_implicit_namespace_name_label_also_without_a_namespace_resource():
    sel = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}
    f = filt(pol("shop/by-name", ingress=[{"from": [sel]}]), namespaces={})
    assert ingress_ok(f, WEB, MON) and not ingress_ok(f, WEB, FRONT)


def test_pod_and_namespace_selector_together_need_both():
    peer = {"namespaceSelector": {"matchLabels": {"team": "ops"}},
            "podSelector": {"matchLabels": {"role": "frontend"}}}
    extra = wep("ops/batch", "10.65.1.7/32", node="n2", labels={"role": "batch"})
    f = filt(pol("shop/both", ingress=[{"from": [peer]}]), weps=[*WEPS, extra])
    assert ingress_ok(f, WEB, MON)
    assert not ingress_ok(f, WEB, extra)  # right namespace, wrong pod
    assert not ingress_ok(f, WEB, FRONT)  # right pod labels, wrong namespace


def test_match_expressions_selectors():
    f = filt(pol("shop/expr", podSelector={"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
                 ingress=[{"from": [{"podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}}]}]))
    assert [p.name for p in f.pods] == ["db"]
    assert ingress_ok(f, DB, FRONT) and not ingress_ok(f, DB, PLAIN)


def test_ip_block_with_except():
    f = filt(pol("shop/block", ingress=[{"from": [{"ipBlock": {"cidr": "192.168.0.0/16",
                                                               "except": ["192.168.1.0/24", "192.168.7.7/32"]}}]}]))
    assert ingress_ok(f, WEB, "192.168.0.1") and ingress_ok(f, WEB, "192.168.255.254")
    assert ingress_ok(f, WEB, "192.168.7.6") and ingress_ok(f, WEB, "192.168.7.8")
    assert not ingress_ok(f, WEB, "192.168.1.9") and not ingress_ok(f, WEB, "192.168.7.7")
    assert not ingress_ok(f, WEB, "10.0.0.1")


def test_except_only_narrows_its_own_peer():
    f = filt(pol("shop/two", ingress=[{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.65.0.0/16"]}},
        {"podSelector": {"matchLabels": {"role": "frontend"}}}]}]))
    assert ingress_ok(f, WEB, FRONT)  # inside the except, allowed by the other peer
    assert not ingress_ok(f, WEB, PLAIN)
    assert ingress_ok(f, WEB, "10.1.2.3")


def test_ip_block_host_bits_are_tolerated():
    f = filt(pol("shop/host-bits", ingress=[{"from": [{"ipBlock": {"cidr": "192.168.5.77/24"}}]}]))
    assert ingress_ok(f, WEB, "192.168.5.1") and not ingress_ok(f, WEB, "192.168.6.1")


def test_ports_protocols_and_end_port():
    f = filt(pol("shop/ports", ingress=[{"ports": [
        {"port": 80}, {"protocol": "UDP", "port": 5000, "endPort": 5010}, {"protocol": "SCTP"}]}]))
    assert ingress_ok(f, WEB, FRONT, "TCP", 80)
    assert not ingress_ok(f, WEB, FRONT, "TCP", 81)
    assert not ingress_ok(f, WEB, FRONT, "UDP", 80)
    assert ingress_ok(f, WEB, FRONT, "UDP", 5000) and ingress_ok(f, WEB, FRONT, "UDP", 5010)
    assert not ingress_ok(f, WEB, FRONT, "UDP", 5011) and not ingress_ok(f, WEB, FRONT, "TCP", 5005)
    assert ingress_ok(f, WEB, FRONT, "SCTP", 9)  # protocol without port: all its ports
    body = render(f)
    assert "meta l4proto udp th dport { 5000-5010 }" in body and "meta l4proto sctp counter" in body


def test_peers_and_ports_must_both_match():
    f = filt(pol("shop/both-parts", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                                              "ports": [{"port": 81}]}]))
    assert ingress_ok(f, WEB, FRONT, port=81)
    assert not ingress_ok(f, WEB, FRONT, port=80) and not ingress_ok(f, WEB, PLAIN, port=81)


def test_a_named_port_no_pod_declares_matches_nothing_not_everything():
    f = filt(pol("shop/named", ingress=[{"ports": [{"port": "http"}]}]))
    assert not ingress_ok(f, WEB, FRONT, port=80)
    assert f.policy("shop/named").ingress == ()
    f = filt(pol("shop/mixed", ingress=[{"ports": [{"port": "http"}, {"port": 8080}]}]))
    assert ingress_ok(f, WEB, FRONT, port=8080) and not ingress_ok(f, WEB, FRONT, port=80)


# Named ports: web serves "http" on 8080, db on 5432 ("http" too, UDP 53 as "dns").
NWEB = wep("shop/web", "10.65.0.1/32", labels={"app": "web"}, ports=["http=8080", "metrics=9090"])
NDB = wep("shop/db", "10.65.0.2/32", labels={"app": "db"}, ports=["http=5432", "dns=53/UDP"])
NFRONT = wep("shop/front", "10.65.1.3/32", node="n2", labels={"role": "frontend"}, ports=["http=81"])
NREMOTE_WEB = wep("shop/web2", "10.65.1.7/32", node="n2", labels={"app": "web"}, ports=["http=7000"])
NWEPS = [NWEB, NDB, NFRONT, PLAIN, MON, NREMOTE_WEB]


def test_ingress_named_port_resolves_against_each_selected_pod():
    f = filt(pol("shop/named", ingress=[{"ports": [{"port": "http"}]}]), weps=NWEPS)
    assert ingress_ok(f, NWEB, FRONT, port=8080) and not ingress_ok(f, NWEB, FRONT, port=5432)
    assert ingress_ok(f, NDB, FRONT, port=5432) and not ingress_ok(f, NDB, FRONT, port=8080)
    assert not ingress_ok(f, NWEB, FRONT, port=80) and not ingress_ok(f, NWEB, FRONT, "UDP", 8080)
    # only this node's selected pods: not the remote web2, not front's own "http"
    (allow,) = f.policy("shop/named").ingress
    assert allow.named == (("10.65.0.1", "TCP", 8080), ("10.65.0.2", "TCP", 5432))
    assert allow.ports == ()


def test_ingress_named_port_needs_the_peer_too_and_matches_the_protocol():
    f = filt(pol("shop/named", podSelector={"matchLabels": {"app": "db"}},
                 ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                           "ports": [{"protocol": "UDP", "port": "dns"}, {"port": "http"}]}]), weps=NWEPS)
    assert ingress_ok(f, NDB, NFRONT, "UDP", 53) and ingress_ok(f, NDB, NFRONT, "TCP", 5432)
    assert not ingress_ok(f, NDB, NFRONT, "TCP", 53)  # "dns" is UDP only
    assert not ingress_ok(f, NDB, PLAIN, "UDP", 53)  # not a frontend
    body = render(f)
    assert "ip saddr @" in body and "ip daddr . meta l4proto . th dport @" in body
    assert "10.65.0.2 . udp . 53" in body and "10.65.0.2 . tcp . 5432" in body


def test_from_a_namespace_on_a_named_port():
    f = filt(pol("shop/from-ops", ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}],
                                            "ports": [{"port": "http"}]}]), weps=NWEPS)
    assert ingress_ok(f, NWEB, MON, port=8080) and not ingress_ok(f, NWEB, MON, port=81)
    assert not ingress_ok(f, NWEB, NFRONT, port=8080)


def test_egress_named_port_resolves_against_every_destination_pod():
    f = filt(pol("shop/out", podSelector={"matchLabels": {"app": "web"}}, policyTypes=["Egress"],
                 egress=[{"ports": [{"port": "http"}]}]), weps=NWEPS)
    assert egress_ok(f, NWEB, NFRONT, port=81) and egress_ok(f, NWEB, NDB, port=5432)
    assert not egress_ok(f, NWEB, NFRONT, port=5432) and not egress_ok(f, NWEB, NDB, port=81)
    assert egress_ok(f, NWEB, NREMOTE_WEB, port=7000)  # remote pods too
    assert not egress_ok(f, NWEB, "8.8.8.8", port=81)  # no pod there declares it


def test_egress_named_port_only_to_peer_pods_and_mixed_with_numbers():
    f = filt(pol("shop/out", podSelector={"matchLabels": {"app": "web"}}, policyTypes=["Egress"],
                 egress=[{"to": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                          "ports": [{"port": "http"}, {"port": 9999}]}]), weps=NWEPS)
    assert egress_ok(f, NWEB, NFRONT, port=81) and egress_ok(f, NWEB, NFRONT, port=9999)
    assert not egress_ok(f, NWEB, NDB, port=5432) and not egress_ok(f, NWEB, NDB, port=9999)
    (allow,) = f.policy("shop/out").egress
    assert allow.named == (("10.65.1.3", "TCP", 81),)


def test_egress_named_port_to_an_ip_block_takes_the_pods_inside_it():
    f = filt(pol("shop/out", podSelector={"matchLabels": {"app": "web"}}, policyTypes=["Egress"],
                 egress=[{"to": [{"ipBlock": {"cidr": "10.65.1.0/24", "except": ["10.65.1.7/32"]}}],
                          "ports": [{"port": "http"}]}]), weps=NWEPS)
    assert egress_ok(f, NWEB, NFRONT, port=81)
    assert not egress_ok(f, NWEB, NREMOTE_WEB, port=7000)  # excepted
    assert not egress_ok(f, NWEB, NDB, port=5432)  # outside the block


def test_a_pod_declaring_a_name_twice_on_two_protocols():
    both = wep("shop/both", "10.65.0.9/32", labels={"app": "both"}, ports=["dns=53/UDP", "dns=5353"])
    f = filt(pol("shop/dns", podSelector={"matchLabels": {"app": "both"}},
                 ingress=[{"ports": [{"protocol": "UDP", "port": "dns"}]}]), weps=[both, FRONT])
    assert ingress_ok(f, both, FRONT, "UDP", 53)
    assert not ingress_ok(f, both, FRONT, "TCP", 5353) and not ingress_ok(f, both, FRONT, "UDP", 5353)


def test_named_ports_of_ipv6_pods():
    w6 = wep("shop/w6", "fd00:65::1/128", labels={"app": "v6"}, ports=["http=8080"])
    c6 = wep("shop/c6", "fd00:65::2/128", node="n2", ports=["http=81"])
    f = filt(pol("shop/v6", podSelector={"matchLabels": {"app": "v6"}}, policyTypes=["Ingress", "Egress"],
                 ingress=[{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}],
                 egress=[{"ports": [{"port": "http"}]}]), weps=[w6, c6])
    assert ingress_ok(f, w6, c6, port=8080) and not ingress_ok(f, w6, c6, port=81)
    assert egress_ok(f, w6, c6, port=81) and not egress_ok(f, w6, c6, port=8080)
    body = render(f)
    assert "ip6 daddr . meta l4proto . th dport @" in body and "type ipv6_addr . inet_proto . inet_service" in body


def test_bad_port_names_are_refused():
    for name in ("HTTP", "a--b", "-a", "8080", "abcdefghijklmnop"):
        with pytest.raises(ValidationError):
            wep("shop/bad", "10.65.0.9/32", ports=[f"{name}=80"])
        with pytest.raises(ValidationError):
            pol("shop/bad", ingress=[{"ports": [{"port": name}]}])


def test_selector_matching_no_pod_allows_nothing():
    f = filt(pol("shop/ghost", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "ghost"}}}]}]))
    assert not ingress_ok(f, WEB, FRONT) and not ingress_ok(f, WEB, "0.0.0.0")
    assert " saddr " not in render(f)  # its chain holds no rule


def test_egress_policy_with_ip_block():
    f = filt(pol("shop/out", policyTypes=["Egress"],
                 egress=[{"to": [{"ipBlock": {"cidr": "10.65.1.0/24", "except": ["10.65.1.4/32"]}}],
                          "ports": [{"port": 80}]}]))
    assert all(p.ingress is None for p in f.pods)
    assert egress_ok(f, WEB, FRONT) and not egress_ok(f, WEB, PLAIN)
    assert not egress_ok(f, WEB, FRONT, port=443) and not egress_ok(f, WEB, "8.8.8.8")
    assert ingress_ok(f, WEB, "8.8.8.8")  # egress-only: ingress open
    assert egress_ok(f, OTHER, "8.8.8.8")


def test_policy_types_default_from_the_rules_given():
    f = filt(pol("shop/implied", egress=[{"to": [{"podSelector": {}}]}]))
    web = next(p for p in f.pods if p.name == "web")
    assert web.ingress == ("shop/implied",) and web.egress == ("shop/implied",)
    assert not ingress_ok(f, WEB, FRONT)
    assert egress_ok(f, WEB, FRONT) and not egress_ok(f, WEB, MON)


def test_egress_deny_all():
    f = filt(pol("shop/no-out", policyTypes=["Egress"]))
    assert not egress_ok(f, WEB, FRONT) and not egress_ok(f, DB, "10.65.0.1")


def test_remote_and_interfaceless_pods_get_no_filter():
    nowire = wep("shop/pending", "10.65.0.9/32", labels={"app": "web"})
    nowire = res.WorkloadEndpoint(**{**nowire.__dict__, "interface_name": None})
    f = filt(pol("shop/deny"), weps=[*WEPS, nowire])
    assert {p.name for p in f.pods} == {"web", "db"}


def test_labels_change_is_a_new_filter():
    allow = pol("shop/allow", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]}])
    before = filt(allow)
    relabeled = wep("shop/plain", "10.65.1.4/32", node="n2", labels={"role": "frontend"})
    after = filt(allow, weps=[w for w in WEPS if w is not PLAIN] + [relabeled])
    assert not ingress_ok(before, WEB, PLAIN) and ingress_ok(after, WEB, PLAIN)
    assert render(before) != render(after)


def test_ipv6_pods_and_blocks():
    v6 = wep("shop/six", "fd00::6/128", labels={"app": "web"})
    peer6 = wep("shop/peer6", "fd00:1::7/128", node="n2", labels={"role": "frontend"})
    f = filt(pol("shop/allow", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}},
                                                  {"ipBlock": {"cidr": "2001:db8::/32"}}]}]),
             weps=[*WEPS, v6, peer6])
    assert allows(f, v6.interface_name, INGRESS, "fd00:1::7")
    assert allows(f, v6.interface_name, INGRESS, "2001:db8::1")
    assert not allows(f, v6.interface_name, INGRESS, "fd00:1::8")
    body = render(f)
    peers = policy_chain("shop/allow", "in")
    assert f"ip6 saddr @{peers}-0-6 " in body and f"ip6 saddr @{peers}-0-6p " in body
    assert f"ip saddr @{peers}-0-4p " in body and f"@{peers}-0-4 " not in body  # no IPv4 ipBlock
    # ipBlocks in an interval set, the pods' own addresses in a hash set
    assert f"add set inet tortie-filter {peers}-0-6 {{ type ipv6_addr; flags interval; }}" in body
    assert f"add element inet tortie-filter {peers}-0-6 {{ 2001:db8::/32 }}" in body
    assert f"add set inet tortie-filter {peers}-0-6p {{ type ipv6_addr; }}" in body
    assert f"add element inet tortie-filter {peers}-0-6p {{ fd00:1::7 }}" in body
    assert f"add element inet tortie-filter {peers}-0-4p {{ 10.65.1.3" in body


@pytest.mark.parametrize("order", [0, 1])
def test_rendering_is_deterministic(order):
    pols = [pol("shop/deny"), pol("shop/allow", ingress=[{"from": [{"podSelector": {}}]}])]
    weps = WEPS if order == 0 else list(reversed(WEPS))
    assert render(compute(NODE, weps, pols if order == 0 else pols[::-1], NAMESPACES)) == \
        render(compute(NODE, WEPS, pols, NAMESPACES))


def test_render_dispatches_by_veth_per_direction():
    f = filt(pol("shop/deny", policyTypes=["Ingress", "Egress"]))
    body = render(f)
    assert f'"{WEB.interface_name}" : jump pod-in-{WEB.interface_name}' in body
    assert f'"{WEB.interface_name}" : jump pod-out-{WEB.interface_name}' in body
    assert OTHER.interface_name not in body
    assert "ct state established,related accept" in body


def test_an_interface_name_nft_cannot_quote_is_left_out():
    odd = wep("shop/odd", "10.65.0.8/32", labels={"app": "web"}, iface='to"r')
    f = filt(pol("shop/deny"), weps=[*WEPS, odd])
    assert {p.name for p in f.pods} == {"web", "db"}
