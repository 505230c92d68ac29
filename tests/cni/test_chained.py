"""A conflist as a runtime runs it: tortie, then Debian's portmap, tuning and bandwidth,
each fed the previous result as prevResult; ADD in order, CHECK in order, DEL in reverse."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from cni_helpers import NETWORK, NODE_ADDR, Call, tcp_reachable

HOST_PORT = 18080
POD_PORT = 8080


def conflist(node, version: str) -> dict:
    return {
        "cniVersion": version,
        "name": NETWORK,
        "plugins": [
            {"type": "tortie", "agentSocket": node.socket, "ipam": {"type": "tortie-ipam"}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }


RUNTIME_CONFIG = {
    "portMappings": [{"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}],
    "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 1_000_000,
                  "egressRate": 8_000_000, "egressBurst": 1_000_000},
}


class Runtime:
    """What libcni does for a conflist, by hand: per plugin, the network's name and
    cniVersion injected, runtimeConfig filtered by the plugin's capabilities, and the
    previous plugin's result as prevResult."""

    def __init__(self, node, conf: dict, cid: str, pod_ns: str, args: str) -> None:
        self.node, self.conf, self.cid, self.pod_ns, self.args = node, conf, cid, pod_ns, args

    def plugin_conf(self, plugin: dict, prev: dict | None) -> dict:
        c = {k: v for k, v in plugin.items() if k != "capabilities"}
        c["name"] = self.conf["name"]
        c["cniVersion"] = self.conf["cniVersion"]
        caps = plugin.get("capabilities") or {}
        rc = {k: v for k, v in RUNTIME_CONFIG.items() if caps.get(k)}
        if rc:
            c["runtimeConfig"] = rc
        if prev is not None:
            c["prevResult"] = prev
        return c

    def call(self, command: str, plugin: dict, prev: dict | None) -> Call:
        return self.node.exec_plugin(command, self.plugin_conf(plugin, prev), cid=self.cid, netns=self.pod_ns,
                                     args=self.args, plugin=plugin["type"])

    def add(self) -> dict:
        prev = None
        for plugin in self.conf["plugins"]:
            r = self.call("ADD", plugin, prev)
            assert r.rc == 0, f"{plugin['type']} ADD: {r.stdout} {r.stderr}"
            prev = r.json
        return prev

    def check(self, cached: dict) -> list[Call]:
        return [self.call("CHECK", plugin, cached) for plugin in self.conf["plugins"]]

    def delete(self, cached: dict | None) -> None:
        for plugin in reversed(self.conf["plugins"]):
            r = self.call("DEL", plugin, cached)
            assert r.rc == 0, f"{plugin['type']} DEL: {r.stdout} {r.stderr}"


def _node_out(node, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", node.ns, *cmd], capture_output=True, text=True).stdout


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_conflist_portmap_tuning_bandwidth(cni_node, version):
    pod_ns = cni_node.pod_ns()
    cid = uuid.uuid4().hex
    rt = Runtime(cni_node, conflist(cni_node, version), cid, pod_ns, f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;"
                 f"K8S_POD_NAME=chained;K8S_POD_INFRA_CONTAINER_ID={cid}")
    result = rt.add()
    assert result["cniVersion"] == version
    pod_ip = result["ips"][0]["address"].split("/")[0]
    host_if = result["interfaces"][0]["name"]
    assert [i["name"] for i in result["interfaces"]][:2] == [host_if, "eth0"]

    # tuning set its sysctl inside the pod
    somax = subprocess.run(["ip", "netns", "exec", pod_ns, "cat", "/proc/sys/net/core/somaxconn"],
                           capture_output=True, text=True).stdout.strip()
    assert somax == "777"
    # bandwidth shaped the host veth (ingress) and redirected egress through an ifb
    assert "tbf" in _node_out(cni_node, "tc", "qdisc", "show", "dev", host_if)
    assert any(line.split(":")[1].strip().startswith("bwp") for line in
               _node_out(cni_node, "ip", "-o", "link").splitlines())
    # portmap: the node's address and host port reach the pod's listener
    assert tcp_reachable(cni_node.ns, NODE_ADDR, pod_ns, port=POD_PORT, dst_port=HOST_PORT, bind_ip=pod_ip)
    # the pod itself is reachable directly too
    assert tcp_reachable(cni_node.ns, pod_ip, pod_ns, port=POD_PORT)

    checks = rt.check(result)
    for plugin, r in zip(rt.conf["plugins"], checks, strict=True):
        if plugin["type"] == "portmap" and r.rc != 0:
            # Debian's portmap 1.1.1 CHECK always looks for IPv6 rules, even for an IPv4-only
            # pod (containernetworking/plugins#819, fixed upstream later): only that is excused.
            assert "could not check ipv6 dnat" in r.stdout, r.stdout
            continue
        assert r.rc == 0, f"{plugin['type']} CHECK: {r.stdout} {r.stderr}"

    rt.delete(result)
    assert cni_node.veths() == []
    assert cni_node.allocations() == []
    assert cni_node.weps() == []
    assert not any(line.split(":")[1].strip().startswith("bwp") for line in
                   _node_out(cni_node, "ip", "-o", "link").splitlines())
    nat = _node_out(cni_node, "iptables", "-t", "nat", "-S")
    assert str(HOST_PORT) not in nat
    # DEL of the whole list again, as a runtime retries it: still fine
    rt.delete(result)


def test_chained_tortie_honours_prev_result(cni_node):
    """tortie placed after another plugin appends its interfaces and addresses to prevResult."""
    pod_ns = cni_node.pod_ns()
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo0", "sandbox": "/x"}],
            "ips": [{"address": "192.0.2.7/24", "interface": 0}], "dns": {"nameservers": ["192.0.2.53"]}}
    r = cni_node.exec_plugin("ADD", cni_node.config(prevResult=prev), cid=uuid.uuid4().hex, netns=pod_ns)
    assert r.rc == 0, r.stdout
    res = json.loads(r.stdout)
    assert [i["name"] for i in res["interfaces"]] == ["lo0", res["interfaces"][1]["name"], "eth0"]
    assert res["ips"][0] == {"address": "192.0.2.7/24", "interface": 0}
    assert res["ips"][1]["interface"] == 2  # shifted past prevResult's one interface
    assert res["dns"] == {"nameservers": ["192.0.2.53"]}
