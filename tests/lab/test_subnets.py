"""`--subnets 2`: the plan (who sits where, the router between) and what it refuses."""

import dataclasses

import pytest

from tortie.errors import ValidationError
from tortie.lab import topology


def test_half_the_nodes_behind_the_router():
    plan = topology.make_plan("sub", 3, "none", subnets=2)
    assert [n.address for n in plan.nodes] == ["10.99.0.11/24", "10.99.0.12/24", "10.99.200.13/24"]
    assert [n.gateways for n in plan.nodes] == [(), (), ("10.99.200.1",)]
    assert [n.uplinks[0].bridge for n in plan.nodes] == ["br0", "br0", "br1"]
    assert "sub-gw" in plan.netns_names() and topology.is_lab_netns("sub", "sub-gw")
    assert topology.plan_from_dict(dataclasses.asdict(plan)) == plan
    assert "sub-gw" not in topology.make_plan("sub", 3).netns_names()


@pytest.mark.parametrize(("kw", "nodes"), [
    ({"tor": "bird"}, 2), ({}, 1), ({"subnets": 3}, 2)])
def test_refused_in_one_line(kw, nodes):
    kw = {"tor": "none", "subnets": 2, **kw}
    with pytest.raises(ValidationError) as exc:
        topology.make_plan("sub", nodes, kw.pop("tor"), **kw)
    assert exc.value.field == "subnets"
