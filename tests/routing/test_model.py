"""Route and Rule values: normalization makes a desired route equal to the kernel's."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.errors import ValidationError
from tortie.routing import netlink as nl
from tortie.routing.model import Route, Rule, learned_route, normalize_cidr, route_key


def test_cidr_is_normalized():
    assert normalize_cidr("10.1.2.3/24") == "10.1.2.0/24"
    assert normalize_cidr("10.1.2.3") == "10.1.2.3/32"
    assert normalize_cidr("FD00:0::1") == "fd00::1/128"
    assert normalize_cidr("fd00:1:2:3::ff/122") == "fd00:1:2:3::c0/122"
    assert normalize_cidr("0.0.0.0/0") == "0.0.0.0/0"


@pytest.mark.parametrize("bad", ["10.1.2/24", "10.0.0.0/33", "fd00::/129", "x", "10.0.0.0/-1"])
def test_bad_cidr_is_rejected(bad):
    with pytest.raises(ValidationError):
        normalize_cidr(bad)


def test_route_defaults_and_key():
    r = Route("10.1.0.5", dev="cali1")
    assert (r.dst, r.table, r.type, r.scope, r.metric) == ("10.1.0.5/32", 254, "unicast", "link", 0)
    assert r.family == socket.AF_INET
    assert r.key == (socket.AF_INET, 254, "10.1.0.5/32") == route_key("10.1.0.5/32")
    via = Route("10.2.0.0/26", gateways=("10.9.0.2",))
    assert via.scope == "universe"
    v6 = Route("fd00::5", dev="cali1")
    # IPv6 has no route scopes, and the kernel's default metric is 1024.
    assert (v6.family, v6.scope, v6.metric) == (socket.AF_INET6, "universe", 1024)


def test_gateways_are_canonical_and_sorted():
    a = Route("10.3.0.0/26", gateways=("10.9.0.3", "10.9.0.2"))
    b = Route("10.3.0.0/26", gateways=("10.9.0.2", "10.9.0.3"))
    assert a == b and a.gateways == ("10.9.0.2", "10.9.0.3")
    assert Route("fd00::/64", gateways=("FD00:9::0002",)).gateways == ("fd00:9::2",)


@pytest.mark.parametrize("kwargs", [
    {"dst": "10.0.0.0/8"},  # unicast with neither dev nor gateway
    {"dst": "10.0.0.0/8", "type": "blackhole", "dev": "x"},
    {"dst": "10.0.0.0/8", "type": "unreachable"},
    {"dst": "10.0.0.0/8", "dev": "x", "table": 255},
    {"dst": "10.0.0.0/8", "gateways": ("10.0.0.1", "10.0.0.1")},
    {"dst": "10.0.0.0/8", "gateways": ("fd00::1",)},
])
def test_invalid_routes(kwargs):
    with pytest.raises(ValidationError):
        Route(**kwargs)


def test_the_key_is_made_once_and_follows_the_route():
    import dataclasses

    r = Route("10.1.0.5", dev="cali1", table=1000)
    assert r.key == (socket.AF_INET, 1000, "10.1.0.5/32") and r.key is r.key
    moved = dataclasses.replace(r, table=254)
    assert moved.key == (socket.AF_INET, 254, "10.1.0.5/32")
    assert "key" not in repr(r) and Route("10.1.0.5/32", dev="cali1", table=1000) == r
    assert Route("FD00::5", dev="cali1").key == (socket.AF_INET6, 254, "fd00::5/128")


def test_routes_are_small_and_immutable():
    r = Route("10.1.0.5/32", dev="cali1")
    assert not hasattr(r, "__dict__")
    with pytest.raises(AttributeError):
        r.dev = "other"  # type: ignore[misc]


def test_rule_family_and_validation():
    assert Rule(100, dst="10.0.0.0/8").family == socket.AF_INET
    assert Rule(101, src="fd00::1/64", table=100).src == "fd00::/64"
    assert Rule(102, family=socket.AF_INET6).family == socket.AF_INET6
    with pytest.raises(ValidationError):
        Rule(100)  # neither selector nor family
    with pytest.raises(ValidationError):
        Rule(100, src="10.0.0.0/8", dst="fd00::/8")


# -- learned_route: the trusted constructor for BGP routes ----------------------------------

_V4 = st.integers(0, 2**32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
_V6 = st.integers(0, 2**128 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")))


@st.composite
def _learned(draw):
    """A canonical prefix and distinct canonical next hops of its family, as ExaBGP hands them."""
    v6 = draw(st.booleans())
    addr = draw(_V6 if v6 else _V4)
    plen = draw(st.integers(0, 128 if v6 else 32))
    hops = draw(st.lists(_V6 if v6 else _V4, min_size=1, max_size=4, unique=True))
    return normalize_cidr(f"{addr}/{plen}"), tuple(hops)


@settings(max_examples=300, deadline=None)
@given(_learned())
def test_learned_route_equals_the_validated_and_the_parsed_route(case):
    dst, hops = case
    fast = learned_route(dst, hops)
    slow = Route(dst=dst, gateways=hops)
    assert fast == slow and hash(fast) == hash(slow)
    assert fast.key == slow.key and str(fast) == str(slow)
    out: list = []
    nl.parse_routes(nl.encode_route(nl.RTM_NEWROUTE, nl.NLM_F_CREATE, 1, fast, 77, 0), {}, 77, out)
    parsed = out[0][2]
    assert parsed == fast and hash(parsed) == hash(fast) and parsed.key == fast.key
