"""Issue 12, finding 3: IP pools that would break a node are refused in one line (as
Calico refuses them); what the datastore cannot know is a warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tortie.datastore.store import ResourceStore


def _pool(ctl, name: str, cidr: str) -> str:
    return ctl.file(f"apiVersion: tortie.io/v1\nkind: IPPool\nmetadata:\n  name: {name}\n"
                    f"spec:\n  cidr: {cidr}\n")


def _node(etcd, name: str, **spec) -> None:
    ResourceStore(etcd).apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": name},
                               "spec": spec})


def _refused(ctl, etcd, path: str, *words: str) -> str:
    rc, out, err = ctl("apply", "-f", path)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert ResourceStore(etcd).list("IPPool") == []
    return err


@pytest.mark.parametrize(("cidr", "what"), [
    ("127.0.0.0/8", "loopback"), ("127.1.0.0/16", "loopback"),
    ("169.254.0.0/16", "link-local"), ("169.254.1.0/24", "link-local"),
    ("224.0.0.0/4", "multicast"), ("239.1.0.0/16", "multicast"),
    ("::1/128", "loopback"), ("fe80::/64", "link-local"), ("ff00::/8", "multicast"), ("ff02::/16", "multicast"),
    ("0.0.0.0/0", "loopback"), ("::/0", "loopback"),
])
def test_reserved_ranges_are_refused(ctl, etcd, cidr, what):
    _refused(ctl, etcd, _pool(ctl, "bad", cidr), "spec.cidr", what)


def test_pool_holding_a_node_address_is_refused(ctl, etcd):
    _node(etcd, "n1", bgp={"ipv4Address": "192.168.40.11/24", "ipv6Address": "fd00:40::11/64"})
    _node(etcd, "n2", addresses=[{"address": "10.1.2.3", "type": "InternalIP"}])
    _refused(ctl, etcd, _pool(ctl, "p1", "192.168.0.0/16"), "192.168.40.11", "node n1")
    _refused(ctl, etcd, _pool(ctl, "p2", "fd00:40::/64"), "fd00:40::11", "node n1")
    _refused(ctl, etcd, _pool(ctl, "p3", "10.0.0.0/8"), "10.1.2.3", "node n2")
    rc, out, err = ctl("apply", "-f", _pool(ctl, "fine", "10.244.0.0/16"))
    assert rc == 0 and "created" in out and err == "", err


def _apply_in_process_of_its_own(etcd, path: str) -> tuple[int, str, str]:
    """tortiectl as a user runs it: its warnings are log lines on its stderr."""
    env = {**os.environ, "TORTIE_ETCD_ENDPOINTS": ",".join(etcd.config.endpoints),
           "TORTIE_ETCD_PREFIX": etcd.config.prefix}
    r = subprocess.run([sys.executable, "-m", "tortie.ctl.main", "apply", "-f", path], env=env,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def test_what_the_datastore_cannot_know_is_a_warning(ctl, etcd):
    rc, out, err = _apply_in_process_of_its_own(etcd, _pool(ctl, "early", "10.244.0.0/16"))
    assert rc == 0 and "created" in out, err
    assert "no node in the datastore has an IPv4 address yet" in err
    _node(etcd, "n1", bgp={"ipv4Address": "192.168.40.11/24"})
    rc, out, err = _apply_in_process_of_its_own(etcd, _pool(ctl, "on-link", "192.168.40.128/25"))
    assert rc == 0 and "created" in out, err
    assert "pool overlaps a node's subnet" in err and "192.168.40.0/24" in err


def test_an_egress_next_hop_on_no_node_subnet_is_a_warning(ctl, etcd):
    """Issue 11: apply warns (does not refuse) when a pool's egress next hop is on no
    subnet of any known node."""
    _node(etcd, "n1", bgp={"ipv4Address": "192.168.40.11/24"})

    def egress_pool(name: str, cidr: str, hop: str) -> str:
        return ctl.file(f"apiVersion: tortie.io/v1\nkind: IPPool\nmetadata:\n  name: {name}\n"
                        f"spec:\n  cidr: {cidr}\n  egress:\n    table: 201\n    nextHop: {hop}\n")

    rc, out, err = _apply_in_process_of_its_own(etcd, egress_pool("typo", "10.70.0.0/16", "192.168.49.1"))
    assert rc == 0 and "created" in out, err
    assert "egress next hop is on no subnet of any known node" in err and "192.168.40.0/24" in err
    rc, out, err = _apply_in_process_of_its_own(etcd, egress_pool("fine", "10.71.0.0/16", "192.168.40.1"))
    assert rc == 0 and "created" in out and "egress next hop" not in err, err
