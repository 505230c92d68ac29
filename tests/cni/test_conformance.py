"""CNI conformance: the installed plugin exec'd as a runtime execs it, inside a node
namespace, against real pod namespaces, a real CNI server and a real etcd."""

from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest
from cni_helpers import NETWORK, NODE_ADDR, POOL_CIDR, tcp_reachable

K8S_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"


def _cid() -> str:
    return uuid.uuid4().hex


def _add(node, pod_ns, cid, version="1.0.0", pod="web", **conf):
    return node.exec_plugin("ADD", node.config(version, **conf), cid=cid, netns=pod_ns,
                            args=K8S_ARGS.format(pod=pod, cid=cid))


def _del(node, pod_ns, cid, version="1.0.0", pod="web", **conf):
    return node.exec_plugin("DEL", node.config(version, **conf), cid=cid, netns=pod_ns,
                            args=K8S_ARGS.format(pod=pod, cid=cid))


def _pod_ip(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_each_result_version(cni_node, version):
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    r = _add(cni_node, pod_ns, cid, version)
    assert r.rc == 0, r.stdout + r.stderr
    res = r.json
    assert res["cniVersion"] == version
    assert len(res["ips"]) == 1
    ip = res["ips"][0]
    assert ("version" in ip) == (version in ("0.3.1", "0.4.0"))
    if "version" in ip:
        assert ip["version"] == "4"
    assert ip["address"].endswith("/32")
    assert ipaddress.ip_interface(ip["address"]).ip in ipaddress.ip_network(POOL_CIDR)
    host, cont = res["interfaces"]
    assert host["name"].startswith("tor") and "sandbox" not in host
    assert cont == {"name": "eth0", "mac": cont["mac"], "sandbox": f"/run/netns/{pod_ns}"}
    assert ip["interface"] == 1
    assert {"dst": "0.0.0.0/0", "gw": "169.254.1.1"} in res["routes"]

    # the pod's view: /32 on eth0, link-scope gateway, default through it
    addr = subprocess.run(["ip", "-n", pod_ns, "-o", "addr", "show", "eth0"], capture_output=True, text=True).stdout
    assert ip["address"] in addr
    routes = subprocess.run(["ip", "-n", pod_ns, "route"], capture_output=True, text=True).stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0" in routes and "scope link" in routes
    # the host's: proxy ARP on the veth, the /32 route with tortie's protocol
    assert f"{_pod_ip(res)} dev {host['name']}" in cni_node.host_routes()
    proxy = subprocess.run(["ip", "netns", "exec", cni_node.ns, "cat",
                            f"/proc/sys/net/ipv4/conf/{host['name']}/proxy_arp"], capture_output=True, text=True)
    assert proxy.stdout.strip() == "1"
    # the endpoint in etcd
    (wep,) = cni_node.weps()
    assert wep["metadata"]["namespace"] == "ns1"
    assert wep["spec"]["pod"] == "web" and wep["spec"]["node"] == cni_node.name
    assert wep["spec"]["interfaceName"] == host["name"]
    assert wep["spec"]["ipNetworks"] == [ip["address"]]
    assert wep["spec"]["containerID"] == cid

    assert tcp_reachable(cni_node.ns, _pod_ip(res), pod_ns)

    if version != "0.3.1":  # CHECK exists from 0.4.0 on
        chk = cni_node.exec_plugin("CHECK", cni_node.config(version, prevResult=res), cid=cid, netns=pod_ns,
                                   args=K8S_ARGS.format(pod="web", cid=cid))
        assert chk.rc == 0, chk.stdout
        assert chk.stdout == ""

    d = _del(cni_node, pod_ns, cid, version)
    assert d.rc == 0, d.stdout
    assert cni_node.veths() == []
    assert cni_node.allocations() == []
    assert cni_node.weps() == []
    assert cni_node.host_routes() == ""
    links = subprocess.run(["ip", "-n", pod_ns, "-o", "link"], capture_output=True, text=True).stdout
    assert "eth0" not in links


def test_two_pods_talk_and_node_reaches_both(cni_node):
    a_ns, b_ns = cni_node.pod_ns(), cni_node.pod_ns()
    a = _add(cni_node, a_ns, _cid(), pod="a").json
    b = _add(cni_node, b_ns, _cid(), pod="b").json
    assert _pod_ip(a) != _pod_ip(b)
    assert tcp_reachable(a_ns, _pod_ip(b), b_ns)
    assert tcp_reachable(b_ns, _pod_ip(a), a_ns)
    assert tcp_reachable(cni_node.ns, _pod_ip(a), a_ns)
    # and the pod reaches the node's own address
    assert tcp_reachable(a_ns, NODE_ADDR, cni_node.ns)


def test_add_is_idempotent(cni_node):
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    first = _add(cni_node, pod_ns, cid)
    second = _add(cni_node, pod_ns, cid)
    assert first.rc == 0 and second.rc == 0, second.stdout
    assert first.json == second.json
    assert len(cni_node.allocations()) == 1
    assert len(cni_node.veths()) == 1
    assert len(cni_node.weps()) == 1
    assert tcp_reachable(cni_node.ns, _pod_ip(second.json), pod_ns)


def test_add_repairs_half_wired_pod(cni_node):
    """A repeated ADD after the veth was lost keeps the address and wires it again."""
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    first = _add(cni_node, pod_ns, cid).json
    host_if = first["interfaces"][0]["name"]
    subprocess.run(["ip", "-n", cni_node.ns, "link", "del", host_if], check=True)
    again = _add(cni_node, pod_ns, cid)
    assert again.rc == 0, again.stdout
    assert _pod_ip(again.json) == _pod_ip(first)
    assert tcp_reachable(cni_node.ns, _pod_ip(first), pod_ns)


def test_del_without_add(cni_node):
    pod_ns = cni_node.pod_ns()
    d = _del(cni_node, pod_ns, _cid())
    assert d.rc == 0, d.stdout
    assert d.stdout == ""


def test_del_without_netns_and_pod_args(cni_node):
    """DEL may come with no CNI_NETNS and no pod identity: the endpoint is found by container id."""
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    assert _add(cni_node, pod_ns, cid).rc == 0
    d = cni_node.exec_plugin("DEL", cni_node.config(), cid=cid, netns="", args="")
    assert d.rc == 0, d.stdout
    assert cni_node.veths() == [] and cni_node.allocations() == [] and cni_node.weps() == []


def test_del_with_netns_gone(cni_node):
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    assert _add(cni_node, pod_ns, cid).rc == 0
    subprocess.run(["ip", "netns", "del", pod_ns], check=True)
    cni_node.netns_factory.names.remove(pod_ns)
    d = _del(cni_node, pod_ns, cid)
    assert d.rc == 0, d.stdout
    assert cni_node.veths() == []
    assert cni_node.allocations() == []
    assert cni_node.weps() == []
    # and a second DEL is fine too
    assert _del(cni_node, pod_ns, cid).rc == 0


@pytest.mark.parametrize("damage", ["pod-default-route", "pod-gateway-route", "host-route", "pod-address",
                                    "host-veth"])
def test_check_detects_damage(cni_node, damage):
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    res = _add(cni_node, pod_ns, cid).json
    ip, host_if = res["ips"][0]["address"], res["interfaces"][0]["name"]
    conf = cni_node.config(prevResult=res)
    ok = cni_node.exec_plugin("CHECK", conf, cid=cid, netns=pod_ns)
    assert ok.rc == 0, ok.stdout
    cmd = {
        "pod-default-route": ["ip", "-n", pod_ns, "route", "del", "default"],
        "pod-gateway-route": ["ip", "-n", pod_ns, "route", "del", "169.254.1.1", "dev", "eth0"],
        "host-route": ["ip", "-n", cni_node.ns, "route", "del", ip, "dev", host_if],
        "pod-address": ["ip", "-n", pod_ns, "addr", "del", ip, "dev", "eth0"],
        "host-veth": ["ip", "-n", cni_node.ns, "link", "del", host_if],
    }[damage]
    subprocess.run(cmd, check=True)
    bad = cni_node.exec_plugin("CHECK", conf, cid=cid, netns=pod_ns)
    assert bad.rc != 0
    err = bad.json
    assert err["cniVersion"] == "1.0.0" and isinstance(err["code"], int) and err["msg"]


def test_check_unknown_container(cni_node):
    pod_ns = cni_node.pod_ns()
    r = cni_node.exec_plugin("CHECK", cni_node.config(), cid=_cid(), netns=pod_ns)
    assert r.rc != 0 and r.json["code"] == 3


def test_version(cni_node):
    for v in ("0.3.1", "0.4.0", "1.0.0", "1.1.0"):
        r = cni_node.exec_plugin("VERSION", {"cniVersion": v})
        assert r.rc == 0
        assert r.json["cniVersion"] == v
        assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(r.json["supportedVersions"])


def test_status(cni_node):
    ok = cni_node.exec_plugin("STATUS", cni_node.config("1.1.0"))
    assert ok.rc == 0 and ok.stdout == ""
    # a pool whose node selector leaves this node out is no use to it
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool1"},
                          "spec": {"cidr": POOL_CIDR, "blockSize": 26, "nodeSelector": "zone == 'b'"}})
    bad = cni_node.exec_plugin("STATUS", cni_node.config("1.1.0"))
    assert bad.rc != 0 and bad.json["code"] == 50
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "Node",
                          "metadata": {"name": cni_node.name, "labels": {"zone": "b"}}})
    assert cni_node.exec_plugin("STATUS", cni_node.config("1.1.0")).rc == 0
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool1"},
                          "spec": {"cidr": POOL_CIDR, "blockSize": 26, "disabled": True}})
    bad = cni_node.exec_plugin("STATUS", cni_node.config("1.1.0"))
    assert bad.rc != 0 and bad.json["code"] == 50
    old = cni_node.exec_plugin("STATUS", cni_node.config("1.0.0"))
    assert old.rc != 0 and old.json["code"] == 1


def test_gc_releases_what_the_runtime_no_longer_lists(cni_node):
    keep_ns, gone_ns = cni_node.pod_ns(), cni_node.pod_ns()
    keep, gone = _cid(), _cid()
    keep_res = _add(cni_node, keep_ns, keep, pod="keep").json
    assert _add(cni_node, gone_ns, gone, pod="gone").rc == 0
    assert len(cni_node.allocations()) == 2
    conf = cni_node.config("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]})
    r = cni_node.exec_plugin("GC", conf)
    assert r.rc == 0, r.stdout
    assert cni_node.allocations() == [_pod_ip(keep_res)]
    assert [w["spec"]["containerID"] for w in cni_node.weps()] == [keep]
    assert cni_node.veths() == [keep_res["interfaces"][0]["name"]]
    assert tcp_reachable(cni_node.ns, _pod_ip(keep_res), keep_ns)


def test_labels_from_args(cni_node):
    pod_ns = cni_node.pod_ns()
    conf = cni_node.config(args={"cni": {"labels": {"app": "web", "tier": "front"}}})
    r = cni_node.exec_plugin("ADD", conf, cid=_cid(), netns=pod_ns, args=K8S_ARGS.format(pod="lab", cid="x"))
    assert r.rc == 0, r.stdout
    (wep,) = cni_node.weps()
    assert wep["metadata"]["labels"] == {"app": "web", "tier": "front"}


def test_tortie_ipam_for_ptp(cni_node):
    """tortie-ipam as the IPAM of Debian's ptp plugin: addresses from tortie's pool."""
    pod_ns = cni_node.pod_ns()
    cid = _cid()
    conf = {"cniVersion": "1.0.0", "name": "ptp-net", "type": "ptp",
            "ipam": {"type": "tortie-ipam", "agentSocket": cni_node.socket}}
    r = cni_node.exec_plugin("ADD", conf, cid=cid, netns=pod_ns, plugin="ptp")
    assert r.rc == 0, r.stdout + r.stderr
    ip = _pod_ip(r.json)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POOL_CIDR)
    assert cni_node.allocations() == [ip]
    assert tcp_reachable(cni_node.ns, ip, pod_ns)
    d = cni_node.exec_plugin("DEL", conf, cid=cid, netns=pod_ns, plugin="ptp")
    assert d.rc == 0, d.stdout + d.stderr
    assert cni_node.allocations() == []


def test_tortie_ipam_verbs_directly(cni_node):
    cid = _cid()
    conf = {"cniVersion": "0.4.0", "name": NETWORK, "type": "bridge",
            "ipam": {"type": "tortie-ipam", "agentSocket": cni_node.socket,
                     "routes": [{"dst": "0.0.0.0/0"}]}}
    add = cni_node.exec_plugin("ADD", conf, cid=cid, netns="/dev/null", plugin="tortie-ipam")
    assert add.rc == 0, add.stdout
    res = add.json
    assert res["ips"][0]["version"] == "4" and "interfaces" not in res
    assert res["routes"] == [{"dst": "0.0.0.0/0"}]
    again = cni_node.exec_plugin("ADD", conf, cid=cid, netns="/dev/null", plugin="tortie-ipam")
    assert again.json == res
    chk = cni_node.exec_plugin("CHECK", {**conf, "prevResult": res}, cid=cid, netns="/dev/null",
                               plugin="tortie-ipam")
    assert chk.rc == 0, chk.stdout
    assert cni_node.exec_plugin("DEL", conf, cid=cid, plugin="tortie-ipam").rc == 0
    assert cni_node.allocations() == []


def test_dual_stack(cni_node):
    """IPv6 by the same code path: a /128 in the pod, default via the host veth's fixed
    link-local address, the host /128 route; real TCP over IPv6 node->pod and pod->pod."""
    cni_node.store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool6"},
                          "spec": {"cidr": "fd00:10::/64"}})
    subprocess.run(["ip", "-n", cni_node.ns, "addr", "add", "fd00:99::1/128", "dev", "lo"], check=True)
    pods = []
    for name in ("v6a", "v6b"):
        pod_ns = cni_node.pod_ns()
        r = _add(cni_node, pod_ns, _cid(), "0.4.0", pod=name, ipam={"assign_ipv6": "true"})
        assert r.rc == 0, r.stdout
        pods.append((pod_ns, r.json))
    for pod_ns, res in pods:
        v6 = res["ips"][1]["address"]
        assert [i["version"] for i in res["ips"]] == ["4", "6"]
        assert v6.endswith("/128") and ipaddress.ip_interface(v6).ip in ipaddress.ip_network("fd00:10::/64")
        assert {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"} in res["routes"]
        routes6 = subprocess.run(["ip", "-n", pod_ns, "-6", "route"], capture_output=True, text=True).stdout
        assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in routes6
        host_if = res["interfaces"][0]["name"]
        host6 = subprocess.run(["ip", "-n", cni_node.ns, "-6", "route", "show", "proto", "77"],
                               capture_output=True, text=True).stdout
        assert f"{ipaddress.ip_interface(v6).ip} dev {host_if}" in host6
        assert tcp_reachable(cni_node.ns, str(ipaddress.ip_interface(v6).ip), pod_ns)
    (a_ns, _), (b_ns, b) = pods
    assert tcp_reachable(a_ns, b["ips"][1]["address"].split("/")[0], b_ns)
