"""The struct-packed encoder and the dump parser agree, for every route shape tortie uses."""

from __future__ import annotations

import pytest

from tortie.routing import netlink as nl
from tortie.routing.model import Route, Rule

NAMES = {3: "vA", 4: "vB"}


@pytest.mark.parametrize("route", [
    Route("10.1.0.5/32", dev="vA"),
    Route("10.1.0.0/26", type="blackhole"),
    Route("10.2.0.0/26", gateways=("10.9.0.2",), dev="vA", src="10.9.0.1"),
    Route("10.3.0.0/26", gateways=("10.9.0.2", "10.9.0.3"), dev="vA", onlink=True),
    Route("10.4.0.0/24", gateways=("10.9.0.7",), dev="vA", table=1000, metric=20),
    Route("fd00:1::5/128", dev="vA"),
    Route("fd00:2::/122", gateways=("fd00:9::2", "fd00:9::3"), dev="vA"),
])
def test_route_round_trip(route):
    oif = 3 if route.dev else 0
    msg = nl.encode_route(nl.RTM_NEWROUTE, nl.NLM_F_CREATE, 7, route, 77, oif)
    assert len(msg) % 4 == 0
    out: list = []
    nl.parse_routes(msg + msg, NAMES, 77, out)
    assert [(t, p) for t, p, _ in out] == [(nl.RTM_NEWROUTE, 77)] * 2
    assert out[0][2] == route


def test_parser_filters_by_protocol_and_uses_cache():
    ours = nl.encode_route(nl.RTM_NEWROUTE, 0, 1, Route("10.1.0.5/32", dev="vA"), 77, 3)
    other = nl.encode_route(nl.RTM_NEWROUTE, 0, 2, Route("10.1.0.6/32", dev="vA"), 4, 3)
    out: list = []
    cache: tuple[dict, dict] = ({}, {})
    nl.parse_routes(other + ours, NAMES, 77, out, cache)
    assert [r.dst for _, _, r in out] == ["10.1.0.5/32"]
    first = out[0][2]
    out.clear()
    nl.parse_routes(ours, NAMES, 77, out, (cache[1], {}))
    assert out[0][2] is first  # parsed once, found again by its bytes


def test_rule_round_trip():
    rule = Rule(101, src="10.1.0.0/16", table=1000)
    msg = nl.encode_rule(nl.RTM_NEWRULE, 0, 1, rule, 77)
    out: list = []
    nl.parse_rules(msg, out)
    assert out[0][1] == rule
    assert nl.rule_priority(out[0][2]) == 101


SHAPES = [
    Route("10.1.0.5/32", dev="vA"),
    Route("10.1.0.0/26", type="blackhole"),
    Route("10.200.1.7/32", gateways=("10.97.0.2",)),
    Route("10.5.0.0/16", gateways=("10.97.0.9",), table=1000),
    Route("10.6.0.0/24", gateways=("10.97.0.9",), table=300),
    Route("10.2.0.0/26", gateways=("10.9.0.2",), dev="vA", src="10.9.0.1"),
    Route("10.3.0.0/26", gateways=("10.9.0.2", "10.9.0.3"), dev="vA", onlink=True),
    Route("10.4.0.0/24", gateways=("10.9.0.7",), dev="vA", table=1000, metric=20),
    Route("fd00:1::5/128", dev="vA"),
    Route("fd00:1::/122", type="blackhole"),
    Route("fd00:2::/122", gateways=("fd00:9::2", "fd00:9::3"), dev="vA"),
]


@pytest.mark.parametrize("route", SHAPES)
def test_shape_cache_matches_the_generic_encoding(route):
    """Every message is its shape's cached bytes with seq and dst filled in: the same bytes
    as the generic encoder, whatever the seq, for routes sharing the shape."""
    plen = route.dst.partition("/")[2]
    other = Route(("fd00:77::" if route.family == nl.AF_INET6 else "10.77.0.0") + f"/{plen}",
                  table=route.table, type=route.type, dev=route.dev, gateways=route.gateways,
                  scope=route.scope, onlink=route.onlink, src=route.src, metric=route.metric)
    oif = 3 if route.dev else 0
    for mtype, flags in ((nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_EXCL),
                         (nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_REPLACE),
                         (nl.RTM_DELROUTE, 0)):
        for seq, r in ((9, route), (123456, route), (10, other)):  # the cached shape, reused
            fast = nl.encode_route(mtype, flags, seq, r, 77, oif)
            addr, _, plen = r.dst.partition("/")
            slow = nl._encode_generic(mtype, flags, seq, r, 77, oif, r.family, addr, plen,
                                      r.table)
            assert fast == slow


def test_encode_routes_numbers_the_batch_and_leaves_out_missing_devices():
    kinds = {"add": (nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, True),
             "del": (nl.RTM_DELROUTE, 0, False)}
    ops = [("add", SHAPES[0]), ("add", Route("10.1.0.6/32", dev="gone")), ("del", SHAPES[0]),
           ("add", SHAPES[2])]
    msgs, missing = nl.encode_routes(ops, 100, 77, kinds, {"vA": 3})
    assert missing == [1]
    assert msgs == [nl.encode_route(nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, 100,
                                    SHAPES[0], 77, 3),
                    nl.encode_route(nl.RTM_DELROUTE, 0, 102, SHAPES[0], 77, 0),
                    nl.encode_route(nl.RTM_NEWROUTE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, 103,
                                    SHAPES[2], 77, 0)]
