"""Router IDs: the node's IPv4 address, a configured one, or derived from the node name
(IPv6-only nodes, Calico's `hash`)."""

from __future__ import annotations

import ipaddress

import pytest

from tortie.agent import config, router_id
from tortie.errors import ValidationError


def test_ipv4_address_first_then_configured_then_hash():
    assert router_id.derive("node1", "10.99.1.2") == ("10.99.1.2", "ipv4")
    assert router_id.derive("node1", "10.99.1.2", "192.0.2.7") == ("192.0.2.7", "configured")
    assert router_id.derive("node1", "10.99.1.2", "hash") == (router_id.from_name("node1"), "hash")
    assert router_id.derive("node1", None) == (router_id.from_name("node1"), "hash")


def test_derived_ids_are_stable_distinct_and_usable():
    ids = {router_id.from_name(f"node{i}") for i in range(1, 501)}
    assert len(ids) == 500  # no collision among 500 names
    assert router_id.from_name("node1") == router_id.from_name("node1")
    for rid in ids:
        ip = ipaddress.IPv4Address(rid)
        assert 1 <= ip.packed[0] <= 223 and ip.packed[0] != 127, rid


@pytest.mark.parametrize("bad", ["fd99::1", "0.0.0.0", "node1", "1.2.3"])
def test_a_bad_router_id_is_refused_naming_the_setting(bad):
    with pytest.raises(ValidationError) as e:
        config.load({"TORTIE_NODENAME": "n", "TORTIE_ROUTER_ID": bad, "TORTIE_NODE_IP": "10.0.0.1/24"})
    assert e.value.field == "TORTIE_ROUTER_ID"


def test_node_addresses_must_be_of_their_family():
    with pytest.raises(ValidationError) as e:
        config.load({"TORTIE_NODENAME": "n", "TORTIE_NODE_IP": "fd99::2/64"})
    assert e.value.field == "TORTIE_NODE_IP"
    with pytest.raises(ValidationError) as e:
        config.load({"TORTIE_NODENAME": "n", "TORTIE_NODE_IP": "10.0.0.1/24", "TORTIE_NODE_IP6": "10.0.0.2/24"})
    assert e.value.field == "TORTIE_NODE_IP6"
    cfg = config.load({"TORTIE_NODENAME": "n", "TORTIE_NODE_IP6": "fd99::2/64", "TORTIE_BGP_ENABLED": "false"})
    assert (cfg.node_ip, cfg.node_ip6, cfg.router_id) == (None, "fd99::2/64", None)
