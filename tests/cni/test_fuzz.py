"""Issue 12, item 7: the installed `tortie` shim exec'd as a runtime does, against one CNI
server, with generated network configurations (valid-ish and garbage), CNI_* environments
and commands. Every answer is a CNI result or a CNI error as the spec words them (one JSON
document on stdout; exit status 0 with a result, non-zero with an error whose code is a
well-known one -- 1-7, 11, 50, 51 -- or plugin-specific, 100 and up); the server stays up
and serves; and once every container is deleted nothing is left: no veth, address,
WorkloadEndpoint, pod route or pending cleanup.

Most examples are refused in validation, by the shim or the server (an exec is 20-30 ms
either way); the valid ones ADD, CHECK and DEL a few containers over and over, in a few
pod namespaces, under two network names and two interface names, so repeats, conflicts
and deletes of what is not there all come up. TORTIE_FUZZ_EXAMPLES sets the count.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("TORTIE_FUZZ_EXAMPLES") or 2000)
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
WELL_KNOWN = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}
CIDS = tuple(f"fz{uuid.uuid4().hex[:10]}{i}" for i in range(4))
NETWORKS = ("k8s-pod-network", "blue-net")
IFNAMES = ("eth0", "net1")
PLUGINS = ("tortie", "tortie-ipam")

# What an environment variable and a JSON string can hold (no NUL, no lone surrogate).
env_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40),
                      st.floats(allow_nan=False, allow_infinity=False), env_text)
json_any = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(env_text, inner, max_size=3)), max_leaves=8)


def maybe(strategy, garbage, *, p_absent: bool = True):
    """Mostly `strategy`, sometimes garbage, sometimes absent (None)."""
    options = [strategy, strategy, strategy, garbage]
    if p_absent:
        options.append(st.none())
    return st.one_of(*options)


def netconf(sock: str):
    ipam = st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["tortie-ipam", "host-local"]) | json_any,
        "assign_ipv4": st.sampled_from([True, False, "true", "false"]) | json_any,
        "assign_ipv6": st.sampled_from([False, "false"]) | json_any,
        "ipv4_pools": st.sampled_from([["10.244.0.0/16"], ["pool1"], ["nope"]]) | json_any,
        "routes": st.just([{"dst": "0.0.0.0/0"}]) | json_any,
        "prefix": st.sampled_from(["host", "block"]) | json_any,
    })
    return st.fixed_dictionaries({
        "cniVersion": maybe(st.sampled_from(SUPPORTED), json_any),
        "name": maybe(st.sampled_from(NETWORKS), json_any),
        "type": maybe(st.sampled_from(PLUGINS), json_any),
        "agentSocket": st.just(sock),
    }, optional={
        "ipam": ipam | json_any,
        "mtu": st.integers(-10, 70000) | json_any,
        "dns": st.just({"nameservers": ["10.96.0.10"]}) | json_any,
        "prevResult": json_any,
        "args": st.just({"cni": {"labels": {"app": "fz"}}}) | json_any,
        "runtimeConfig": json_any,
        "cni.dev/valid-attachments": st.lists(st.fixed_dictionaries(
            {"containerID": st.sampled_from(CIDS), "ifname": st.sampled_from(IFNAMES)}), max_size=4) | json_any,
    }).map(lambda d: {k: v for k, v in d.items() if v is not None})


def valid_netconf(sock: str):
    return st.fixed_dictionaries({
        "cniVersion": st.sampled_from(SUPPORTED), "name": st.sampled_from(NETWORKS),
        "type": st.sampled_from(PLUGINS), "agentSocket": st.just(sock),
    }, optional={"mtu": st.sampled_from([0, 1400, 1500, 9000]), "args": st.just({"cni": {"labels": {"a": "b"}}}),
                 "dns": st.just({"nameservers": ["10.96.0.10"]})})


def stdin_bytes(sock: str):
    head = b'{"agentSocket":"' + sock.encode() + b'",'
    return st.one_of(
        valid_netconf(sock).map(lambda d: json.dumps(d).encode()),
        netconf(sock).map(lambda d: json.dumps(d).encode()),
        netconf(sock).map(lambda d: json.dumps(d).encode()),
        st.dictionaries(env_text, json_any, max_size=4).map(
            lambda d: json.dumps({**d, "agentSocket": sock}).encode()),
        st.binary(max_size=64).map(lambda b: head + b),   # reaches the server, broken
        json_any.map(lambda v: json.dumps(v).encode()),    # no agentSocket: the shim answers
        st.binary(max_size=64),
    )


def environment(pod_paths: list[str], bin_dir: str):
    valid = st.fixed_dictionaries({
        "CNI_COMMAND": st.sampled_from(COMMANDS), "CNI_CONTAINERID": st.sampled_from(CIDS),
        "CNI_NETNS": st.sampled_from(pod_paths), "CNI_IFNAME": st.sampled_from(IFNAMES),
        "CNI_ARGS": st.sampled_from([None, "K8S_POD_NAMESPACE=fz;K8S_POD_NAME=web", "IgnoreUnknown=1"]),
        "CNI_PATH": st.just(bin_dir),
    })
    return valid | st.fixed_dictionaries({
        "CNI_COMMAND": maybe(st.sampled_from(COMMANDS), env_text),
        "CNI_CONTAINERID": maybe(st.sampled_from(CIDS), env_text),
        "CNI_NETNS": maybe(st.sampled_from(pod_paths), st.sampled_from(
            ["/run/netns/fz-none", "/dev/null", "/proc/self/ns/uts", ""]) | env_text),
        "CNI_IFNAME": maybe(st.sampled_from(IFNAMES), env_text),
        "CNI_ARGS": maybe(st.sampled_from(["K8S_POD_NAMESPACE=fz;K8S_POD_NAME=web",
                                           "IgnoreUnknown=1;K8S_POD_NAME=x;SURPRISE=1", ""]), env_text),
        "CNI_PATH": maybe(st.just(bin_dir), env_text),
    })


def check_answer(command: str | None, rc: int, out: bytes, version_asked) -> dict | None:
    """The spec's shape of an answer; the parsed document (None for an empty success)."""
    if rc == 0 and command in ("DEL", "CHECK", "STATUS", "GC"):
        assert out.strip() == b"", out
        return None
    doc = json.loads(out)  # exactly one JSON document
    assert isinstance(doc, dict) and isinstance(doc.get("cniVersion"), str), doc
    if rc != 0:
        assert set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
        assert type(doc["code"]) is int and (doc["code"] in WELL_KNOWN or doc["code"] >= 100), doc
        assert isinstance(doc["msg"], str) and doc["msg"], doc
        assert isinstance(doc.get("details", ""), str), doc
        return doc
    if command == "VERSION":
        assert set(doc["supportedVersions"]) == set(SUPPORTED), doc
        return doc
    assert command == "ADD", (command, doc)
    if version_asked in SUPPORTED:
        assert doc["cniVersion"] == version_asked, doc
    assert doc["ips"], doc
    for ip in doc["ips"]:
        ipaddress.ip_interface(ip["address"])
    return doc


def exec_shim(bin_dir: str, plugin: str, env: dict, stdin: bytes) -> subprocess.CompletedProcess:
    """As a runtime does: the plugin file from the bin dir, its env, the config on stdin."""
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **{k: v for k, v in env.items() if v is not None}}
    return subprocess.run([os.path.join(bin_dir, plugin)], input=stdin, env=full, capture_output=True,
                          timeout=30)


@pytest.mark.slow
def test_fuzz_cni(cni_node):
    node = cni_node
    pods = [node.pod_ns() for _ in range(3)]
    pod_paths = [f"/run/netns/{p}" for p in pods]
    seen: dict[str, int] = {}
    generic: list[str] = []  # code 999: what the server did not expect
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(env=environment(pod_paths, node.bin_dir), stdin=stdin_bytes(node.socket),
           plugin=st.sampled_from(PLUGINS))
    def one(env, stdin, plugin):
        r = exec_shim(node.bin_dir, plugin, env, stdin)
        try:
            asked = json.loads(stdin).get("cniVersion")
        except (ValueError, AttributeError):
            asked = None
        doc = check_answer(env["CNI_COMMAND"], r.returncode, r.stdout, asked)
        key = f"{env['CNI_COMMAND'] if env['CNI_COMMAND'] in COMMANDS else 'other'} " + (
            "ok" if r.returncode == 0 else f"code {doc['code']}")
        seen[key] = seen.get(key, 0) + 1
        if doc and doc.get("code") == 999:
            generic.append(f"{doc['msg']} {doc.get('details', '')}"[:200])

    one()
    took = time.monotonic() - t0
    print(f"\nfuzz: {sum(seen.values())} examples in {took:.1f}s: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
    print("\n".join(sorted(set(generic))))
    assert node.proc.poll() is None, "the CNI server died"
    assert sum(v for k, v in seen.items() if k.startswith("ADD ok")) > 0, seen

    # Everything the examples may have made is deleted as a runtime would, then nothing is left.
    for cid in CIDS:
        for path in pod_paths[:1]:  # DEL finds the host veth by container and interface name
            for net in NETWORKS:
                for ifname in IFNAMES:
                    for plugin in PLUGINS:
                        conf = {"cniVersion": "1.0.0", "name": net, "type": plugin, "agentSocket": node.socket}
                        r = exec_shim(node.bin_dir, plugin, {
                            "CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_NETNS": path,
                            "CNI_IFNAME": ifname, "CNI_PATH": node.bin_dir}, json.dumps(conf).encode())
                        assert r.returncode == 0, r.stdout
    assert node.veths() == []
    assert node.allocations() == []
    assert node.weps() == []
    assert node.host_routes() == ""
    pending = os.path.join(os.path.dirname(node.socket), "cni-pending.json")
    assert not os.path.exists(pending) or json.load(open(pending)) == []
    # and it still serves: a plain ADD and DEL
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "fzlast", "CNI_NETNS": pod_paths[0], "CNI_IFNAME": "eth0",
           "CNI_PATH": node.bin_dir}
    conf = json.dumps({"cniVersion": "1.0.0", "name": NETWORKS[0], "type": "tortie",
                       "agentSocket": node.socket}).encode()
    assert exec_shim(node.bin_dir, "tortie", env, conf).returncode == 0
    assert exec_shim(node.bin_dir, "tortie", {**env, "CNI_COMMAND": "DEL"}, conf).returncode == 0
    assert node.allocations() == [] and node.veths() == []
