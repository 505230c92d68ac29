"""BlockIndex answers what `ipaddress.subnet_of` would, for both families."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.agent.block_index import BlockIndex

BLOCKS = ["10.65.0.0/26", "10.65.0.64/26", "10.66.4.0/24", "fd00:10:65::/122", "192.168.7.0/29"]
NETS = [(c, ipaddress.ip_network(c)) for c in BLOCKS]


def reference(prefix: str) -> str | None:
    net = ipaddress.ip_network(prefix)
    for cidr, b in NETS:
        if net.version == b.version and net.prefixlen > b.prefixlen and net.subnet_of(b):
            return cidr
    return None


def test_examples():
    index = BlockIndex(NETS)
    assert index.containing("10.65.0.5/32") == "10.65.0.0/26"
    assert index.containing("10.65.0.64/27") == "10.65.0.64/26"
    assert index.containing("10.65.0.0/26") is None  # the block itself is not more specific
    assert index.containing("10.65.0.128/32") is None
    assert index.containing("10.66.4.255/32") == "10.66.4.0/24"
    assert index.containing("fd00:10:65::3f/128") == "fd00:10:65::/122"
    assert index.containing("fd00:10:65::40/128") is None
    assert index.containing("0.0.0.0/0") is None
    assert not BlockIndex() and BlockIndex().containing("10.65.0.5/32") is None


def _near(version: int):
    """Addresses near our blocks, so hits and near misses both come up."""
    base = st.sampled_from([int(n.network_address) for _, n in NETS if n.version == version])
    bits = 32 if version == 4 else 128
    return st.tuples(base, st.integers(-300, 300), st.integers(0, bits)).map(
        lambda t: str(ipaddress.ip_network(
            (ipaddress.ip_address(t[0] + t[1] if 0 <= t[0] + t[1] < 2**bits else t[0]), t[2]),
            strict=False)))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_near(4), _near(6)))
def test_matches_ipaddress(prefix):
    assert BlockIndex(NETS).containing(prefix) == reference(prefix)
