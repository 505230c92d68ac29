"""The EndpointSlice endpoints' fast check says exactly what the full check says: the same
normalized result, or (for anything it does not take) the full check runs and decides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tortie.datastore import kinds_service as ks
from tortie.errors import ValidationError

META = {"labels": {"kubernetes.io/service-name": "web"}}
ADDRS = st.sampled_from(["10.65.0.1", "10.065.0.1", "fd00::1", "fd00:0::1", "::ffff:1.2.3.4", "x", "", 5])
ENDPOINT = st.fixed_dictionaries({}, optional={
    "addresses": st.lists(ADDRS, max_size=3),
    "conditions": st.dictionaries(st.sampled_from(["ready", "serving", "terminating", "bogus"]),
                                  st.sampled_from([True, False, None, "yes"]), max_size=3),
    "nodeName": st.sampled_from(["node1", "Node_1", "a" * 254, None]),
    "targetRef": st.dictionaries(st.sampled_from(["kind", "name", "namespace", "bogus"]),
                                 st.sampled_from(["Pod", "web-1", 3, None]), max_size=3),
    "hostname": st.sampled_from(["h", "h" * 64]),
    "zone": st.sampled_from(["z1"]),
    "hints": st.just({"forZones": [{"name": "z1"}]}),
})


def _body(endpoints, family, fast: bool):
    doc = {"addressType": family, "endpoints": endpoints}
    saved = ks._plain_endpoint
    if not fast:
        ks._plain_endpoint = lambda v, version: None
    try:
        return ks.endpoint_slice_body(doc, META)
    except ValidationError as exc:
        return ("error", str(exc))
    finally:
        ks._plain_endpoint = saved


@settings(max_examples=300, deadline=None)
@given(st.lists(ENDPOINT, min_size=1, max_size=3), st.sampled_from(["IPv4", "IPv6"]))
def test_fast_and_full_checks_agree(endpoints, family):
    assert _body(endpoints, family, True) == _body(endpoints, family, False)


@pytest.mark.parametrize("family,addr", [("IPv4", "10.65.0.1"), ("IPv6", "fd00::1")])
def test_the_common_endpoint_takes_the_fast_path(family, addr):
    e = {"addresses": [addr], "conditions": {"ready": True}, "nodeName": "node1",
         "targetRef": {"kind": "Pod", "name": "web-1"}}
    assert ks._plain_endpoint(e, 4 if family == "IPv4" else 6) == e
