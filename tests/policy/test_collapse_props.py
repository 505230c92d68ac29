"""netpol's integer collapse gives exactly what ipaddress.collapse_addresses gives."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.policy.netpol import _collapse

V4 = st.builds(lambda a, pl: ipaddress.IPv4Network((a & ~((1 << (32 - pl)) - 1), pl)),
               st.integers(0, 2**20 - 1).map(lambda a: 0x0A000000 | a), st.integers(18, 32))
V6 = st.builds(lambda a, pl: ipaddress.IPv6Network((a & ~((1 << (128 - pl)) - 1), pl)),
               st.integers(0, 2**16 - 1), st.integers(112, 128))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(V4, V6), max_size=20))
def test_collapse_equals_ipaddress(nets):
    want = []
    for v in (4, 6):
        want += ipaddress.collapse_addresses(n for n in nets if n.version == v)
    assert _collapse(nets) == tuple(str(n) for n in want)
