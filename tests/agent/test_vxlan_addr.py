"""A node's VTEP address against real etcd and IPAM: taken from the VXLAN pool once, kept
across runs (even from a stale view), moved and released as the pools change, and not a
leak for `ipam check`."""

from tortie.agent.vxlan_addr import reconcile
from tortie.datastore import resources as r
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore


def pool(name, cidr, mode, **spec):
    return {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, "vxlanMode": mode, **spec}}


def views(store):
    return store.views("ippool")


def test_tunnel_address_follows_the_pools(etcd):
    store, ipam = ResourceStore(etcd), IPAM(etcd)
    store.apply({"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": "n1"},
                 "spec": {"bgp": {"ipv4Address": "10.99.0.11/24"}}})
    store.apply(pool("plain", "10.70.0.0/16", "Never"))
    me = r.Node.from_resource(store.get("node", "n1"))
    assert reconcile(store, ipam, me, views(store)) == {4: None, 6: None}
    store.apply(pool("vx", "10.65.0.0/16", "CrossSubnet"))
    got = reconcile(store, ipam, me, views(store))[4]
    assert got.startswith("10.65.") and store.get("node", "n1")["spec"]["ipv4VXLANTunnelAddr"] == got
    # Again from the same (stale) view: the same address, none taken twice.
    assert reconcile(store, ipam, me, views(store))[4] == got
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == [got]
    report = ipam.check()
    assert not report["leaked_allocations"], report["leaked_allocations"]
    # Disabled: kept (existing pods still need the tunnel); Never: released, field cleared.
    store.apply(pool("vx", "10.65.0.0/16", "CrossSubnet", disabled=True))
    assert reconcile(store, ipam, me, views(store))[4] == got
    store.apply(pool("vx", "10.65.0.0/16", "Never"))
    assert reconcile(store, ipam, me, views(store))[4] is None
    assert "ipv4VXLANTunnelAddr" not in store.get("node", "n1")["spec"]
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == []
