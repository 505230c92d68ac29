"""IPv6 over VXLAN in a dual-stack lab (issue 13): the IPv6 pool in Always mode carries
the pods' IPv6 traffic through vxlan-v6.tortie while IPv4 keeps its direct routes; back to
Never, IPv6 goes direct again (`tortie-lab up --ip-family dual`)."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEV6 = "vxlan-v6.tortie"


def tx(lab, node: str) -> int:
    out = lab.exec(node, ["ip", "-s", "-j", "link", "show", "dev", DEV6], capture_output=True, text=True)
    return json.loads(out.stdout)[0]["stats64"]["tx"]["packets"] if out.returncode == 0 else 0


def set_v6_mode(lab, mode: str) -> None:
    pool = json.loads(lab.ctl("get", "ippool", "default-ipv6", "-o", "json").stdout)
    pool["metadata"] = {"name": "default-ipv6"}
    pool["spec"]["vxlanMode"] = mode
    lab.ctl("apply", "-f", "-", input=json.dumps(pool))


def wait(pred, seconds: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 <= seconds:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def test_ipv6_pods_through_the_tunnel_ipv4_direct(lab_factory):
    lab = lab_factory(nodes=2, ip_family="dual")
    try:
        lab.pod_add("node1", "default/a")
        lab.pod_add("node2", "default/b")
        b6 = next(a for a in lab.wep("default/b")["spec"]["ipNetworks"] if ":" in a).split("/")[0]
        set_v6_mode(lab, "Always")
        took = wait(lambda: lab.exec("node1", ["ip", "link", "show", DEV6], capture_output=True).returncode == 0
                    and lab.probe("default/a", b6, 80, timeout=0.5).ok, 10)
        assert took is not None and took <= 2.0, took
        before = tx(lab, "node1")
        assert lab.probe("default/a", b6, 80).ok and lab.probe("default/b", "default/a", 80).ok
        assert tx(lab, "node1") > before  # IPv6 went through the tunnel
        mid = tx(lab, "node1")
        assert lab.probe("default/a", "default/b", 80).ok  # IPv4: the pool is Never, direct
        assert tx(lab, "node1") == mid
        set_v6_mode(lab, "Never")
        assert wait(lambda: lab.exec("node1", ["ip", "link", "show", DEV6], capture_output=True).returncode != 0
                    and lab.probe("default/a", b6, 80, timeout=0.5).ok, 10) is not None
    finally:
        lab.down()


def test_cross_subnet_over_ipv6_behind_the_router(lab_factory):
    """--subnets 2 --ip-family dual: with the IPv6 pool in CrossSubnet, IPv6 to the pod
    behind the router goes through the tunnel, to the pod on the same subnet straight."""
    lab = lab_factory(nodes=3, subnets=2, ip_family="dual")
    try:
        for i in (1, 2, 3):
            lab.pod_add(f"node{i}", f"default/c{i}")
        v6 = {i: next(a for a in lab.wep(f"default/c{i}")["spec"]["ipNetworks"] if ":" in a).split("/")[0]
              for i in (2, 3)}
        assert not lab.probe("default/c1", v6[3], 80, timeout=0.5).ok  # Never: no way across
        set_v6_mode(lab, "CrossSubnet")
        took = wait(lambda: lab.probe("default/c1", v6[3], 80, timeout=0.5).ok
                    and lab.probe("default/c1", v6[2], 80, timeout=0.5).ok, 10)
        assert took is not None and took <= 2.0, took
        before = tx(lab, "node1")
        assert lab.probe("default/c1", v6[2], 80).ok
        assert tx(lab, "node1") == before  # same subnet: not encapsulated
        assert lab.probe("default/c1", v6[3], 80).ok
        assert tx(lab, "node1") > before  # across the router: through the tunnel
    finally:
        lab.down()
