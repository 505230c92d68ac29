"""The key layout (datastore.keys): what is built parses back, anything else parses to None."""

from tortie.datastore import keys


def test_ipam_keys_round_trip():
    assert keys.block_key("10.0.0.0/26") == "ipam/blocks/10.0.0.0-26"
    assert keys.affinity_key("n1", "fd00::/122") == "ipam/affinity/n1/fd00::-122"
    assert keys.parse_affinity(keys.affinity_key("n1", "fd00::/122")) == ("n1", "fd00::/122")
    assert keys.affinity_prefix("n1") == "ipam/affinity/n1/"
    assert keys.handle_key("k8s-pod-network.abc") == "ipam/handles/k8s-pod-network.abc"
    for other in ("ipam/blocks/10.0.0.0-26", "ipam/affinity/n1", "resources/node/n1"):
        assert keys.parse_affinity(other) is None


def test_resource_serial_and_status_keys():
    assert keys.resource_key("ippool", "p1") == "resources/ippool/p1"
    assert keys.parse_resource("resources/networkpolicy/ns1/np") == ("networkpolicy", "ns1", "np")
    assert keys.parse_resource("status/bgp/n1") is None
    assert keys.serial_key("ippool") == "meta/serial/ippool"
    assert keys.parse_bgp_status(keys.bgp_status_key("n1")) == "n1"
    assert keys.parse_bgp_status("status/bgp/") is None
    assert keys.parse_bgp_status("resources/node/n1") is None
