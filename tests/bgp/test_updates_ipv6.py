"""IPv6 UPDATEs as ExaBGP hands them over (RFC 2545 next hops)."""

from __future__ import annotations

from tortie.bgp.updates import parse_update


def update(by_nh: dict[str, list[str]]) -> dict:
    return {"attribute": {"origin": "igp"}, "announce": {"ipv6 unicast": by_nh}}


def test_a_global_next_hop_wins_over_the_link_local_one_in_either_order():
    # BIRD on the link sends both; ExaBGP lists the prefix once under each next hop
    for order in (("fd99:0:1::1", "fe80::d8c7:4bff:fe0b:ed8d"), ("fe80::d8c7:4bff:fe0b:ed8d", "fd99:0:1::1")):
        got, withdrawn = parse_update(update({nh: ["fd65::40/122"] for nh in order}), "10.0.0.1", None)
        assert got == {"fd65::40/122": ("fd99:0:1::1", "", ())}
        assert withdrawn == []


def test_a_link_local_next_hop_alone_is_kept():
    got, _ = parse_update(update({"fe80::1": ["fd65::40/122"]}), "10.0.0.1", None)
    assert got["fd65::40/122"][0] == "fe80::1"


def test_ipv4_next_hops_are_untouched():
    got, _ = parse_update({"announce": {"ipv4 unicast": {"10.99.1.1": ["10.65.0.0/26"]}}}, "10.0.0.1", None)
    assert got == {"10.65.0.0/26": ("10.99.1.1", "", ())}
