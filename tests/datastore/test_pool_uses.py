"""IPPool allowedUses (Calico's field): a LoadBalancer pool hands out Service addresses
(kube.lb_ipam) and never a pod's; the field is checked like the rest."""

from __future__ import annotations

import pytest
from ipam_helpers import make_pool

from tortie.datastore import resources as res
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore
from tortie.errors import IPAMError, ValidationError
from tortie.kube import lb_ipam


def test_a_load_balancer_pool_never_gives_a_pod_an_address(etcd):
    store, ipam = ResourceStore(etcd), IPAM(etcd)
    make_pool(store, "lb", "10.97.0.0/24", allowedUses=["LoadBalancer"])
    with pytest.raises(IPAMError):
        ipam.auto_assign("net.c1", "n1", num_v4=1)
    with pytest.raises(ValidationError) as err:
        ipam.assign_ip("10.97.0.9", "net.c2", "n1")
    assert "allowedUses" in str(err.value)
    make_pool(store, "pods", "10.70.0.0/16")
    ips = ipam.auto_assign("net.c3", "n1", num_v4=1)
    assert ips[0].startswith("10.70.")
    assert store.views("IPPool")[1].allowed_uses == ("Workload", "Tunnel")  # Calico's default


@pytest.mark.parametrize("uses,msg", [(["LoadBalancer", "Workload"], "cannot be combined"),
                                      (["Gateway"], "is not one of"), ([], "at least one"),
                                      (["Tunnel"], "not supported yet"), (["Workload"], "not supported yet")])
def test_bad_uses_are_refused_in_one_line(uses, msg):
    with pytest.raises(ValidationError) as err:
        res.validate({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "x"},
                      "spec": {"cidr": "10.97.0.0/24", "allowedUses": uses}})
    assert msg in str(err.value) and "allowedUses" in str(err.value) and "\n" not in str(err.value)


POOLS = [{"metadata": {"name": "lb"}, "spec": {"cidr": "10.97.0.0/30", "allowedUses": ["LoadBalancer"]}},
         {"metadata": {"name": "pods"}, "spec": {"cidr": "10.70.0.0/16", "allowedUses": ["Workload"]}}]


def _lb(**spec) -> dict:
    return {"spec": {"type": "LoadBalancer", **spec}}


def test_load_balancer_addresses_follow_calicos_conventions():
    assert lb_ipam.choose(_lb(), POOLS, []) == "10.97.0.1"
    assert lb_ipam.choose(_lb(), POOLS, ["10.97.0.1"]) == "10.97.0.2"
    with pytest.raises(ValidationError):
        lb_ipam.choose(_lb(), POOLS, ["10.97.0.1", "10.97.0.2"])  # full
    assert lb_ipam.choose(_lb(loadBalancerIP="10.97.0.2"), POOLS, ["10.97.0.1"]) == "10.97.0.2"
    with pytest.raises(ValidationError) as err:
        lb_ipam.choose(_lb(loadBalancerIP="10.70.0.5"), POOLS, [])  # a pod pool's
    assert err.value.field == "spec.loadBalancerIP"
    assert lb_ipam.choose(_lb(loadBalancerClass="other.example/lb"), POOLS, []) is None  # not ours
    assert lb_ipam.choose(_lb(loadBalancerClass=lb_ipam.LB_CLASS), POOLS, []) == "10.97.0.1"
    assert lb_ipam.choose({"spec": {"type": "ClusterIP"}}, POOLS, []) is None
    kept = {**_lb(), "status": {"loadBalancer": {"ingress": [{"ip": "10.97.0.2"}]}}}
    assert lb_ipam.choose(kept, POOLS, ["10.97.0.2"]) == "10.97.0.2"
