import json
import os
import subprocess
import sys
from pathlib import Path

from tortie.errors import AlreadyExists, Conflict, NotFound, ValidationError

REPO = Path(__file__).resolve().parents[2]

POOLS = """\
apiVersion: tortie.io/v1
kind: IPPool
metadata: {name: pool-a}
spec: {cidr: 10.65.0.0/16, natOutgoing: true}
---
apiVersion: tortie.io/v1
kind: IPPool
metadata: {name: pool-b}
spec: {cidr: 10.66.0.0/16, blockSize: 28, nodeSelector: "rack == 'r1'",
       egress: {table: 100, nextHop: 192.168.9.1}}
"""


def test_apply_get_delete_round_trip(ctl):
    path = ctl.file(POOLS)
    assert ctl.ok("apply", "-f", path).splitlines() == ["ippool/pool-a created", "ippool/pool-b created"]
    assert ctl.ok("apply", "-f", path).splitlines() == ["ippool/pool-a unchanged", "ippool/pool-b unchanged"]
    table = ctl.ok("get", "ippools").splitlines()
    assert table[0].split() == ["NAME", "CIDR", "BLOCKSIZE", "NAT", "DISABLED", "SELECTOR"]
    assert table[1].split() == ["pool-a", "10.65.0.0/16", "26", "true", "false", "all()"]
    assert "table 100 via 192.168.9.1" in ctl.ok("get", "pool", "pool-b", "-o", "wide")
    one = ctl.json("get", "ippool", "pool-b")
    assert one["kind"] == "IPPool" and one["spec"]["blockSize"] == 28
    # get -o yaml of a list feeds straight back into apply
    exported = ctl.file(ctl.ok("get", "ippool", "-o", "yaml"))
    assert ctl.ok("apply", "-f", exported).count("unchanged") == 2
    assert ctl.ok("get", "ippool", "-o", "name").split() == ["ippool/pool-a", "ippool/pool-b"]
    assert ctl.ok("delete", "ippool", "pool-a") == "ippool/pool-a deleted\n"
    assert ctl.ok("delete", "-f", path, "--ignore-not-found").splitlines() == [
        "ippool/pool-a not found (ignored)", "ippool/pool-b deleted"]
    rc, out, err = ctl("get", "ippool")
    assert rc == 0 and out == "" and "No IPPool resources found" in err


def test_invalid_file_writes_nothing_and_names_the_field(ctl):
    bad = POOLS + "---\napiVersion: tortie.io/v1\nkind: IPPool\nmetadata: {name: c}\nspec: {cidr: 10.67.0.0/16, blocksize: 26}\n"
    rc, out, err = ctl("apply", "-f", ctl.file(bad))
    assert rc == ValidationError.exit_code
    assert out == ""
    assert "document 3 (IPPool/c): spec.blocksize: unknown field" in err
    assert ctl.json("get", "ippool")["items"] == []
    rc, _, err = ctl("apply", "-f", ctl.file("kind: IPPool\n  bad: [indent\n"))
    assert rc == ValidationError.exit_code and "not valid YAML" in err


def test_partial_failure_reports_each_and_exits_with_the_error(ctl):
    ctl.ok("apply", "-f", ctl.file(POOLS))
    overlapping = POOLS.replace("pool-a", "pool-c").replace("pool-b", "pool-d").replace("10.66.0.0/16", "10.90.0.0/16")
    rc, out, err = ctl("create", "-f", ctl.file(overlapping))
    assert rc == ValidationError.exit_code
    assert "overlaps IPPool 'pool-a'" in err and out == "ippool/pool-d created\n"
    rc, _, err = ctl("create", "-f", ctl.file(POOLS))
    assert rc == AlreadyExists.exit_code and err.count("already exists") == 2
    rc, _, err = ctl("replace", "-f", ctl.file(POOLS.replace("pool-a", "pool-x").replace("10.65.", "10.70.")))
    assert rc == NotFound.exit_code and "pool-x" in err


def test_stale_resource_version_is_refused(ctl):
    ctl.ok("apply", "-f", ctl.file(POOLS))
    old = ctl.json("get", "ippool", "pool-a")
    ctl.ok("label", "ippool", "pool-a", "team=a")
    old["spec"]["natOutgoing"] = False
    rc, _, err = ctl("apply", "-f", ctl.file(json.dumps(old)))
    assert rc == Conflict.exit_code and "resourceVersion" in err
    assert ctl.json("get", "ippool", "pool-a")["spec"]["natOutgoing"] is True


def test_label_and_selector_filter(ctl):
    nodes = "".join(
        f"---\napiVersion: tortie.io/v1\nkind: Node\nmetadata: {{name: n{i}}}\n"
        f"spec: {{bgp: {{ipv4Address: 10.0.0.{i}/24}}}}\n" for i in (1, 2, 3))
    ctl.ok("apply", "-f", ctl.file(nodes))
    assert ctl.ok("label", "node", "n1", "rack=r1", "zone=z") == "node/n1 labeled\n"
    ctl.ok("label", "node", "n2", "rack=r2")
    rc, _, err = ctl("label", "node", "n2", "rack=r1")
    assert rc == ValidationError.exit_code and "--overwrite" in err
    ctl.ok("label", "node", "n2", "rack=r1", "--overwrite")
    assert ctl.ok("get", "nodes", "-l", "rack == 'r1'", "-o", "name").split() == ["node/n1", "node/n2"]
    assert ctl.ok("get", "nodes", "-l", "!has(rack)", "-o", "name").split() == ["node/n3"]
    ctl.ok("label", "node", "n1", "zone-")
    assert ctl.json("get", "node", "n1")["metadata"]["labels"] == {"rack": "r1"}
    rc, _, err = ctl("label", "node", "n1", "team=not valid")
    assert rc == ValidationError.exit_code and "not a valid label value" in err
    rc, _, err = ctl("get", "nodes", "-l", "rack ==")
    assert rc == ValidationError.exit_code and "selector" in err


def test_namespaced_kinds(ctl):
    doc = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: %s}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""
    ctl.ok("apply", "-f", ctl.file(doc % "team-a"), "-f", ctl.file(doc % "team-b"))
    assert ctl.ok("get", "netpol", "-n", "team-a", "-o", "name") == "networkpolicy/deny-all\n"
    table = ctl.ok("get", "networkpolicies", "-A").splitlines()
    assert table[0].split()[:2] == ["NAMESPACE", "NAME"] and len(table) == 3
    assert "No NetworkPolicy resources found in namespace default" in ctl("get", "netpol")[2]
    assert ctl.ok("delete", "netpol", "deny-all", "-n", "team-b") == "networkpolicy/team-b/deny-all deleted\n"
    rc, _, err = ctl("get", "netpol", "deny-all", "-n", "team-b")
    assert rc == NotFound.exit_code and "namespace team-b" in err


def test_node_status_reads_what_agents_publish(ctl, etcd, etcd_config):
    import time

    from tortie.bgp import status as bgp_status

    peers = [bgp_status.PeerStatus(peer="10.0.0.2", kind="mesh", state="established", since=time.time() - 5,
                                   prefixes_received=3, prefixes_sent=1, name="node:n2"),
             bgp_status.PeerStatus(peer="10.0.1.1", kind="global", state="connect", since=time.time(),
                                   last_error="connection refused", name="tor")]
    etcd.put(etcd_config.prefix + "status/bgp/n1", bgp_status.to_json("n1", peers).encode())
    etcd.put(etcd_config.prefix + "status/bgp/old",
             json.dumps({"node": "old", "updated": time.time() - 600, "peers": []}).encode())
    out = ctl.ok("node", "status")
    assert "Node n1: 1/2 BGP peers established" in out
    assert "connection refused" in out and "10.0.0.2" in out
    assert "Node old: 0/0" in out and "STALE" in out
    rc, out, _ = ctl("node", "status", "n9")
    assert rc == NotFound.exit_code and "no BGP status published" in out
    doc = json.loads(ctl.ok("node", "status", "n1", "-o", "json"))
    assert doc[0]["peers"][1]["state"] == "connect" and doc[0]["stale"] is False


def test_console_script_uses_env_and_exit_codes(etcd, etcd_config, tmp_path):
    # The installed entry point, as a user runs it: config from the environment.
    exe = Path(sys.executable).with_name("tortiectl")
    env = {**os.environ, "TORTIE_ETCD_ENDPOINTS": etcd_config.endpoints[0],
           "TORTIE_ETCD_PREFIX": etcd_config.prefix}
    r = subprocess.run([str(exe), "apply", "-f", "-"], input=POOLS, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ippool/pool-a created", "ippool/pool-b created"]
    r = subprocess.run([str(exe), "get", "ippool", "nope"], env=env, capture_output=True, text=True)
    assert r.returncode == NotFound.exit_code and "not found" in r.stderr and r.stdout == ""
    r = subprocess.run([str(exe), "--etcd-endpoints", "http://127.0.0.1:1", "--timeout", "0.5", "get", "pools"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 6 and "etcd unreachable" in r.stderr
    r = subprocess.run([str(exe), "get", "pools", "-o", "name", "--etcd-endpoints", "http://127.0.0.1:1",
                        "--timeout", "0.5"], env=env, capture_output=True, text=True)
    assert r.returncode == 6  # global flags after the command count too
    r = subprocess.run([str(exe), "version"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "revision" in r.stdout


def test_get_shows_a_resource_written_behind_the_stores_back(ctl, etcd, etcd_config):
    etcd.put(etcd_config.prefix + "resources/ippool/raw",
             json.dumps({"kind": "IPPool", "metadata": {"name": "raw"}, "spec": {}}).encode())
    rows = ctl.ok("get", "ippool").splitlines()
    assert rows[1].split()[:2] == ["raw", "<invalid:"]
    assert ctl.json("get", "ippool", "raw")["spec"] == {}
