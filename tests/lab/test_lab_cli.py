"""`tortie-lab` end to end, driven literally through its CLI as a subprocess.

Each test checks that `down` leaves nothing: no namespace of the lab, no process it
recorded, no new veth in this namespace, no state dir -- also after a failed or killed `up`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tortie.lab import nsutil, state, topology
from tortie.lab.cluster import Lab, resolve_agent

pytestmark = pytest.mark.slow

_script = os.path.join(os.path.dirname(sys.executable), "tortie-lab")
CLI = [_script] if os.access(_script, os.X_OK) else [sys.executable, "-m", "tortie.lab"]


def lab_cli(name: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, "--name", name, *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"tortie-lab {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def root_veths() -> set[str]:
    out = nsutil.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
    return {line.split(":")[1].strip() for line in out.splitlines() if line.strip()}


def recorded_procs(name: str) -> list[state.Proc]:
    try:
        return state.load(name).procs
    except Exception:
        return []


def assert_nothing_left(name: str, procs: list[state.Proc], veths_before: set[str]) -> None:
    assert [n for n in nsutil.netns_list() if topology.is_lab_netns(name, n)] == []
    assert [p for p in procs if state.alive(p)] == []
    assert not os.path.exists(state.lab_dir(name))
    assert root_veths() <= veths_before


@pytest.fixture
def lab_name(new_lab_name):
    name = new_lab_name("c")
    yield name
    # Whatever a failing test leaves, the lab goes.
    subprocess.run([*CLI, "--name", name, "down"], capture_output=True, timeout=120)


def pod_eth0_address(netns: str) -> str:
    out = json.loads(nsutil.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "eth0"]).stdout)
    return next(a["local"] for a in out[0]["addr_info"] if a["family"] == "inet")


def test_issue3_acceptance_one_node_two_pods(lab_name):
    veths = root_veths()
    out = lab_cli(lab_name, "up", "--nodes", "1").stdout
    assert "ready" in out
    ip_a = lab_cli(lab_name, "pod", "add", "node1", "default/a", "--label", "app=web",
                   "--port", "http=80", "--port", "dns=53/udp").stdout.strip()
    bad = lab_cli(lab_name, "pod", "add", "node1", "default/c", "--port", "HTTP=80", check=False)
    assert bad.returncode != 0 and "NAME=PORT" in bad.stderr, bad.stderr
    ip_b = lab_cli(lab_name, "pod", "add", "node1", "default/b").stdout.strip()
    assert ip_a != ip_b

    for port in ("80", "81"):
        lab_cli(lab_name, "probe", "default/a", "default/b", port)
        lab_cli(lab_name, "probe", "default/b", "default/a", port, "--udp")
        lab_cli(lab_name, "probe", "node1", "default/a", port)
        lab_cli(lab_name, "probe", "node1", "default/b", port, "--udp")
    assert lab_cli(lab_name, "probe", "default/a", ip_b, "80").returncode == 0
    # Not vacuous: a probe to an address nobody has fails.
    assert lab_cli(lab_name, "probe", "default/a", "10.99.0.250", "80", check=False).returncode == 1
    lab_cli(lab_name, "matrix")

    status = json.loads(lab_cli(lab_name, "status", "-o", "json").stdout)
    assert status["name"] == lab_name and status["etcd_endpoints"] == ["http://10.99.0.2:2379"]
    assert [n["name"] for n in status["nodes"]] == ["node1"]
    assert status["underlay"]["subnet"] == "10.99.0.0/24" and status["tors"] == []
    pods = {p["name"]: p for p in status["pods"]}
    assert set(pods) == {"default/a", "default/b"}

    lab = Lab(lab_name)
    for ref, ip in (("default/a", ip_a), ("default/b", ip_b)):
        eth0 = pod_eth0_address(pods[ref]["netns"])
        wep = lab.wep(ref)
        assert wep is not None, f"no WorkloadEndpoint for {ref}"
        assert [n.split("/")[0] for n in wep["spec"]["ipNetworks"]] == [eth0] == [ip]
        assert wep["spec"]["node"] == "node1"
    assert lab.wep("default/a")["spec"]["ports"] == [{"name": "dns", "protocol": "UDP", "port": 53},
                                                     {"name": "http", "protocol": "TCP", "port": 80}]
    assert "ports" not in lab.wep("default/b")["spec"]

    labels = json.loads(lab_cli(lab_name, "pod", "label", "default/a", "tier=front", "app-").stdout)
    assert labels == {"tier": "front"}
    assert lab.wep("default/a")["metadata"]["labels"] == {"tier": "front"}

    lab_cli(lab_name, "pod", "del", "default/b")
    assert lab.wep("default/b") is None
    assert not nsutil.netns_exists(pods["default/b"]["netns"])
    assert lab_cli(lab_name, "probe", "default/a", ip_b, "80", check=False).returncode == 1

    # etcd faults by the recorded PID: frozen and thawed, killed and started on its data
    def etcd_state() -> str:
        proc = state.load(lab_name).proc("etcd")
        return "gone" if proc is None or not state.alive(proc) else state._stat(proc.pid)[0]

    lab_cli(lab_name, "etcd", "pause")
    assert etcd_state() == "T"
    lab_cli(lab_name, "etcd", "resume")
    assert etcd_state() in "SR"
    lab_cli(lab_name, "etcd", "stop", "--kill")
    assert etcd_state() == "gone"
    assert lab_cli(lab_name, "etcd", "resume", check=False).returncode != 0  # nothing to resume
    lab_cli(lab_name, "etcd", "start", "n1")
    assert lab.wep("default/a") is not None  # its data kept, and it answers again

    procs = recorded_procs(lab_name)
    assert {p.role for p in procs} >= {"etcd", "podserver", "agent:node1"}
    lab_cli(lab_name, "down")
    assert_nothing_left(lab_name, procs, veths)


def test_reference_plugins_two_nodes_matrix_and_clean_down(lab_name):
    """The harness itself, on the Debian ptp/host-local plugins (needs no other tortie package)."""
    veths = root_veths()
    lab_cli(lab_name, "up", "--nodes", "2", "--cni", "ptp")
    for node, pod in (("node1", "default/a"), ("node1", "default/b"), ("node2", "other/c")):
        lab_cli(lab_name, "pod", "add", node, pod)
    out = lab_cli(lab_name, "matrix", "--port", "81").stdout
    assert "36/36 probes answered" in out  # 2 nodes, the outside host, 3 pods -> 3 pods; TCP and UDP
    status = json.loads(lab_cli(lab_name, "status", "-o", "json").stdout)
    c = next(p for p in status["pods"] if p["name"] == "other/c")
    assert c["node"] == "node2" and pod_eth0_address(c["netns"]) == c["address"]
    ran = lab_cli(lab_name, "exec", "other/c", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert c["address"] in ran
    # A pod cut off behind the lab's back is caught by the probe, not hidden.
    nsutil.ip(c["netns"], "link", "set", "eth0", "down")
    assert lab_cli(lab_name, "probe", "default/a", "other/c", "80", check=False).returncode == 1
    procs = recorded_procs(lab_name)
    lab_cli(lab_name, "down")
    assert_nothing_left(lab_name, procs, veths)
    # down is idempotent.
    lab_cli(lab_name, "down")


def test_failed_up_leaves_nothing(lab_name):
    """A node agent that cannot start (invalid etcd endpoint) fails `up`, which cleans up."""
    veths = root_veths()
    agent = resolve_agent("auto")
    agent = "cni-server" if agent == "none" else agent
    t0 = time.monotonic()
    r = lab_cli(lab_name, "up", "--nodes", "2", "--agent", agent, "--timeout", "20",
                "--agent-env", "TORTIE_ETCD_ENDPOINTS=ftp://nowhere", check=False)
    assert r.returncode != 0, r.stdout
    assert "up failed" in r.stdout and "tortie-lab:" in r.stderr
    assert time.monotonic() - t0 < 60
    assert_nothing_left(lab_name, [], veths)


def test_down_after_up_was_killed(lab_name):
    """`up` killed with SIGKILL half way: `down` still finds and removes everything."""
    veths = root_veths()
    proc = subprocess.Popen([*CLI, "--name", lab_name, "up", "--nodes", "2", "--cni", "ptp"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(p.role == "etcd" for p in recorded_procs(lab_name)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        procs = recorded_procs(lab_name)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    etcd = next(p for p in procs if p.role == "etcd")
    assert state.alive(etcd)
    assert lab_cli(lab_name, "status", check=False).returncode == 0
    lab_cli(lab_name, "down")
    assert_nothing_left(lab_name, recorded_procs(lab_name) + procs, veths)
    assert not state.alive(etcd)


def test_commands_on_a_missing_lab_fail_cleanly(lab_name):
    r = lab_cli(lab_name, "status", check=False)
    assert r.returncode == 3 and "no lab" in r.stderr and "Traceback" not in r.stderr
    r = lab_cli(lab_name, "up", "--nodes", "0", check=False)
    assert r.returncode == 2 and "--nodes 0" in r.stderr
    assert not os.path.exists(state.lab_dir(lab_name))


@pytest.mark.parametrize("tor,uplinks", [("bird", 1), ("frr", 1), ("frr", 2)])
def test_routers_outside_host_and_uplinks(lab_name, tor, uplinks):
    """--tor bird|frr: nodes on their own links (or 2 shared segments), sessions, the outside host."""
    veths = root_veths()
    out = lab_cli(lab_name, "up", "--nodes", "2", "--tor", tor, "--uplinks", str(uplinks), "--cni", "ptp").stdout
    assert f"{tor} running" in out
    status = json.loads(lab_cli(lab_name, "status", "-o", "json").stdout)
    names = ["tor"] if uplinks == 1 else ["tor1", "tor2"]
    assert [(t["kind"], t["namespace"]) for t in status["tors"]] == [(tor, f"{lab_name}-{n}") for n in names]
    assert status["outside"]["namespace"] == f"{lab_name}-ext"
    want = ["10.99.1.2/24", "10.99.2.2/24"] if uplinks == 1 else ["10.99.101.11/24", "10.99.101.12/24"]
    assert [n["address"] for n in status["nodes"]] == want
    assert [len(n["uplinks"]) for n in status["nodes"]] == [uplinks] * 2
    lab_cli(lab_name, "pod", "add", "node1", "default/a")
    lab_cli(lab_name, "pod", "add", "node2", "default/b")
    out = lab_cli(lab_name, "matrix").stdout
    assert "ext" in out and "20/20 probes answered" in out
    lab = Lab(lab_name)
    sessions = lab.bgp_sessions()
    assert {t: set(v) for t, v in sessions.items()} == {n: {"node1", "node2"} for n in names}
    # Not one segment any more: node2 reaches node1's address through a router.
    hop = nsutil.run(["ip", "-n", f"{lab_name}-node2", "route", "get", "10.99.0.2"]).stdout.split()[2]
    assert hop in {u["gateway"] for u in status["nodes"][1]["uplinks"]}
    procs = recorded_procs(lab_name)
    assert set(names) <= {p.role for p in procs}
    lab_cli(lab_name, "down")
    assert_nothing_left(lab_name, procs, veths)
    for n in names:
        assert not os.path.exists(f"/var/run/frr/{lab_name}-{n}")


def test_down_when_half_of_the_lab_is_gone(lab_name):
    """No state file and a node namespace already deleted: down still removes the rest."""
    veths = root_veths()
    lab_cli(lab_name, "up", "--nodes", "2", "--cni", "ptp")
    lab_cli(lab_name, "pod", "add", "node2", "default/a")
    procs = recorded_procs(lab_name)
    assert len(procs) == 2  # etcd and the pod server (ptp: no agents)
    nsutil.netns_del(f"{lab_name}-node1")
    os.unlink(state.state_path(lab_name))
    out = lab_cli(lab_name, "down").stdout
    assert "is down" in out
    assert_nothing_left(lab_name, procs, veths)
