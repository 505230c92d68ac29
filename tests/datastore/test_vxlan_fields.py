"""VXLAN settings on IPPool and Node: accepted as Calico writes them, bad input refused in
one line naming the field, the pools of a family agreeing on the VNI (store)."""

import pytest

from tortie.datastore import resources as r
from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound, ValidationError


def pool(name="p1", cidr="10.10.0.0/16", **spec):
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec}}


def node(**spec):
    return {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": spec}


@pytest.mark.parametrize("mode", ["Never", "Always", "CrossSubnet"])
def test_the_three_modes_are_accepted(mode):
    view = r.IPPool.from_resource(pool(vxlanMode=mode, vxlanVNI=4097, vxlanMTU=1400))
    assert (view.vxlan_mode, view.vxlan_vni, view.vxlan_mtu) == (mode, 4097, 1400)


def test_defaults_are_the_views_not_stored():
    assert "vxlanMode" not in r.validate(pool())["spec"]
    view = r.IPPool.from_resource(pool())
    assert (view.vxlan_mode, view.vxlan_vni, view.vxlan_mtu) == ("Never", 4096, None)


@pytest.mark.parametrize(("resource", "field"), [
    (pool(vxlanMode="Sometimes"), "spec.vxlanMode"),
    (pool(vxlanMode="always"), "spec.vxlanMode"),
    (pool(vxlanMode=1), "spec.vxlanMode"),
    (pool(vxlanVNI=0), "spec.vxlanVNI"),
    (pool(vxlanVNI=1 << 24), "spec.vxlanVNI"),
    (pool(vxlanVNI="4096"), "spec.vxlanVNI"),
    (pool(vxlanMTU=576), "spec.vxlanMTU"),
    (pool(ipipMode="CrossSubnet"), "spec.ipipMode"),
    (node(ipv4VXLANTunnelAddr="fd00::1"), "spec.ipv4VXLANTunnelAddr"),
    (node(vxlanTunnelMACAddr="01:00:00:00:00:01"), "spec.vxlanTunnelMACAddr"),
    (node(vxlanTunnelMACAddr="02:00:00:00:00"), "spec.vxlanTunnelMACAddr"),
    (node(vxlanMTU=70000), "spec.vxlanMTU"),
])
def test_bad_input_names_the_field_in_one_line(resource, field):
    with pytest.raises(ValidationError) as exc:
        r.validate(resource)
    assert exc.value.field == field
    assert "\n" not in str(exc.value) and field in str(exc.value)


def test_node_vtep_fields():
    view = r.Node.from_resource(node(ipv4VXLANTunnelAddr="10.65.0.1", vxlanTunnelMACAddr="02:AA:00:00:00:01",
                                     vxlanMTU=1400))
    assert (view.vxlan_tunnel_addr, view.vxlan_mac, view.vxlan_mtu) == ("10.65.0.1", "02:aa:00:00:00:01", 1400)


@pytest.fixture
def store(etcd):
    return ResourceStore(etcd)


def test_vxlan_pools_of_a_family_share_the_vni_and_nothing_is_stored_otherwise(store):
    store.create(pool("a", "10.10.0.0/16", vxlanMode="Always", vxlanVNI=10))
    with pytest.raises(ValidationError) as exc:
        store.create(pool("b", "10.11.0.0/16", vxlanMode="CrossSubnet"))  # default VNI 4096
    assert exc.value.field == "spec.vxlanVNI"
    with pytest.raises(NotFound):
        store.get("ippool", "b")
    store.create(pool("c", "10.12.0.0/16", vxlanMode="Never", vxlanVNI=11))  # no VXLAN: no conflict
    store.create(pool("d", "10.13.0.0/16", vxlanMode="CrossSubnet", vxlanVNI=10))
    store.create(pool("e", "fd00::/48", vxlanMode="Always"))  # IPv6 has its own device
