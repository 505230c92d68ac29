"""The host route the CNI wiring installs is exactly the one the agent's route manager
wants (from the endpoint the CNI server wrote, and from the CNI server's own class), so
adopting it writes nothing: no churn of a live pod's route."""

from __future__ import annotations

import uuid

from cni_helpers import tcp_reachable

from tortie.agent.calc import ClusterState
from tortie.agent.calc_desired import desired
from tortie.agent.cni_routes import ROUTE_CLASS
from tortie.routing.model import Route
from tortie.routing.route_mgr import RouteManager


def test_route_manager_adopts_cni_routes_without_writes(cni_node, etcd, etcd_config):
    pods = []
    for name in ("a", "b"):
        pod_ns = cni_node.pod_ns()
        cid = uuid.uuid4().hex
        r = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns,
                                 args=f"K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={name}")
        assert r.rc == 0, r.stdout
        pods.append((pod_ns, r.json))

    state = ClusterState(prefix=etcd_config.prefix)
    kvs, _ = etcd.get_prefix(etcd_config.prefix)
    for kv in kvs:
        state.apply(kv.key, kv.value)
    want = desired(state, cni_node.name)
    expected = {
        Route(dst=res["ips"][0]["address"], dev=res["interfaces"][0]["name"], scope="link") for _, res in pods
    }
    assert set(want.workload_routes) == expected

    mgr = RouteManager(netns=cni_node.ns)
    mgr.set_routes("workloads", want.workload_routes)
    for route in expected:
        mgr.set_route(ROUTE_CLASS, route)
    stats = mgr.apply()
    assert (stats.added, stats.replaced, stats.deleted, stats.errors) == (0, 0, 0, ())
    assert set(mgr.actual().values()) == expected
    for pod_ns, res in pods:
        assert tcp_reachable(cni_node.ns, res["ips"][0]["address"].split("/")[0], pod_ns)
