"""`tortiectl get` has a table for every kind (Calico's policy kinds had none at first: get
crashed), and -o wide's ACTIVE-ON shows what the agents published."""

from tortie.ctl import output, policy_output
from tortie.datastore import resources as res


def test_every_kind_has_a_table():
    assert set(res.KINDS) <= set(output.TABLES)


def test_active_on_column():
    gnp = res.validate({"apiVersion": "tortie.io/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "g"},
                        "spec": {"order": 5, "tier": "sec", "ingress": [{"action": "Pass"}]}})
    text = output.render("globalnetworkpolicy", [{**gnp, "status": {"activeOn": {"node2": 1, "node1": 3}}}], "wide")
    assert text.splitlines() == ["NAME  TIER  ORDER  SELECTOR  TYPES    ACTIVE-ON",
                                 "g     sec   5      all()     Ingress  node1=3,node2=1"]
    assert policy_output.active_on(gnp) == "-"
