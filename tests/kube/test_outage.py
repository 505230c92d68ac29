"""The controller across an etcd outage: changes made in Kubernetes while etcd is down
reach the datastore once it is back, without a restart."""

from __future__ import annotations

import tempfile

import pytest
from doubles.apiserver_fake import namespace, pod
from kubehelpers import RunningController, namespace_present, wait_for

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.store import ResourceStore
from tortie.kube.controller import Controller, ControllerConfig
from tortie.lab.etcd_server import EtcdServer


@pytest.fixture
def restartable_etcd(tmp_path):
    server = EtcdServer(data_dir=tempfile.mkdtemp(dir=tmp_path))
    server.start()
    yield server
    server.stop()


def test_changes_during_etcd_outage_arrive_after_it(restartable_etcd, fake_api):
    config = ControllerConfig(etcd=EtcdConfig(endpoints=(restartable_etcd.endpoint,), prefix="/outage/",
                                              timeout=1.0),
                              k8s_api=fake_api.url, retry_interval=0.2, gc_interval=3600, resync_interval=3600)
    etcd = EtcdClient(config.etcd)
    store = ResourceStore(etcd)
    fake_api.add(namespace("before"))
    fake_api.add(pod("default", "web", {"app": "web"}))
    rc = RunningController(Controller(config, etcd=etcd))
    try:
        assert rc.controller.synced.wait(15)
        assert namespace_present(store, "before")

        restartable_etcd.stop()
        fake_api.add(namespace("during"))
        fake_api.delete("Namespace", "before")
        wait_for(lambda: rc.controller.health.components["datastore"].last_error, what="outage noticed")
        restartable_etcd.start()

        wait_for(lambda: namespace_present(store, "during"), timeout=20, what="namespace written after the outage")
        wait_for(lambda: not namespace_present(store, "before"), timeout=20, what="namespace deleted after the outage")
        assert rc.controller.health.components["datastore"].last_error is None
        # Endpoints written after the outage are still seen (the endpoint watch recovered).
        store.create({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                      "metadata": {"name": "n1-k8s-web-eth0", "namespace": "default"},
                      "spec": {"node": "n1", "pod": "web", "containerID": "c1"}})
        wait_for(lambda: store.get("WorkloadEndpoint", "n1-k8s-web-eth0", "default")["metadata"].get("labels")
                 == {"app": "web"}, timeout=20, what="pod labels on an endpoint made after the outage")
    finally:
        rc.stop()
        etcd.close()
