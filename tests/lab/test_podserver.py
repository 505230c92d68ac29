"""The pod server and probes against real namespaces (no lab: one process, two namespaces)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tortie.errors import DataplaneError
from tortie.lab import podserver
from tortie.lab.probe import Endpoint, probe, run_matrix


@pytest.fixture
def server(tmp_path):
    control = str(tmp_path / "ps.sock")
    proc = subprocess.Popen([sys.executable, "-m", "tortie.lab.podserver", "--control", control],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for _ in range(200):  # the socket file appears at bind(), a moment before listen()
            try:
                podserver.request(control, {"op": "list"})
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.02)
        yield control
    finally:
        proc.terminate()
        proc.wait(5)


def test_serves_tcp_and_udp_on_80_and_81_inside_the_pod_only(server, netns):
    pod, other = netns.new("pod"), netns.new("other")
    podserver.request(server, {"op": "add", "pod": "default/a", "netns": pod})
    for port in (80, 81):
        for udp in (False, True):
            r = probe(pod, "127.0.0.1", port, udp=udp, expect="default/a")
            assert r.ok and r.answered_by == "default/a", r
            assert r.seen_as == "127.0.0.1" and r.reply == "default/a 127.0.0.1", r  # the client as seen
    # The sockets live in the pod's namespace: nothing listens in another one.
    assert not probe(other, "127.0.0.1", 80).ok
    assert not probe(other, "127.0.0.1", 80, udp=True, timeout=0.3).ok
    assert podserver.request(server, {"op": "list"})["pods"] == ["default/a"]


def test_expect_and_removal(server, netns):
    pod = netns.new("pod")
    podserver.request(server, {"op": "add", "pod": "default/a", "netns": pod})
    wrong = probe(pod, "127.0.0.1", 81, expect="default/b")
    assert not wrong.ok and "default/a" in wrong.error
    podserver.request(server, {"op": "del", "pod": "default/a"})
    gone = probe(pod, "127.0.0.1", 80)
    assert not gone.ok and gone.error == "Connection refused"
    assert not probe(pod, "127.0.0.1", 80, udp=True, timeout=0.3).ok


def test_bad_requests_are_answered_not_fatal(server):
    with pytest.raises(DataplaneError, match="no network namespace"):
        podserver.request(server, {"op": "add", "pod": "x/y", "netns": "tt-missing-ns"})
    with pytest.raises(DataplaneError, match="unknown op"):
        podserver.request(server, {"op": "explode"})
    assert podserver.request(server, {"op": "list"})["pods"] == []


def test_matrix_across_a_veth(server, netns):
    """Two namespaces joined by a veth: each reaches the other's server, in parallel probes."""
    a, b = netns.new("a"), netns.new("b")
    subprocess.run(["ip", "-n", a, "link", "add", "v", "type", "veth", "peer", "name", "v", "netns", b],
                   check=True)
    for ns, addr in ((a, "192.168.7.1/24"), (b, "192.168.7.2/24")):
        netns.run(ns, "ip", "addr", "add", addr, "dev", "v")
        netns.run(ns, "ip", "link", "set", "v", "up")
    podserver.request(server, {"op": "add", "pod": "ns/a", "netns": a})
    podserver.request(server, {"op": "add", "pod": "ns/b", "netns": b})
    eps = [Endpoint("ns/a", a, "192.168.7.1"), Endpoint("ns/b", b, "192.168.7.2")]
    m = run_matrix(eps, eps, port=81)
    assert m.ok, m.render()
    assert len(m.results) == 8
    netns.run(b, "ip", "link", "set", "v", "down")
    m = run_matrix(eps, eps, port=81, timeout=0.3)
    assert m.cell("ns/a", "ns/b") == "FAIL" and m.cell("ns/b", "ns/b") == "ok"


def test_serves_ipv6_too(server, netns):
    pod = netns.new("pod")
    podserver.request(server, {"op": "add", "pod": "default/a6", "netns": pod})
    for addr in ("::1", "127.0.0.1"):  # one socket per family, both answer
        for udp in (False, True):
            r = probe(pod, addr, 80, udp=udp, expect="default/a6")
            assert r.ok, r
