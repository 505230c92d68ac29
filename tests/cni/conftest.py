"""CNI fixtures: the shim installed as a runtime sees it, and a node namespace with the
CNI server running inside it against the test's etcd prefix."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest
from cni_helpers import NODE_ADDR, POOL_CIDR, Node, NsRelay

from tortie.cni.install import install
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore


@pytest.fixture(scope="session")
def cni_bin():
    d = tempfile.mkdtemp(prefix="tortie-cni-bin-")
    install(d)
    for plugin in ("portmap", "tuning", "bandwidth", "ptp", "host-local"):
        if os.path.exists(f"/usr/lib/cni/{plugin}"):
            os.symlink(f"/usr/lib/cni/{plugin}", os.path.join(d, plugin))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cni_node(netns, etcd, etcd_config, cni_bin):
    store = ResourceStore(etcd)
    store.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "pool1"},
                 "spec": {"cidr": POOL_CIDR, "blockSize": 26}})
    ns = netns.new("node")
    subprocess.run(["ip", "-n", ns, "addr", "add", f"{NODE_ADDR}/32", "dev", "lo"], check=True)
    host, port = etcd_config.endpoints[0].rsplit("/", 1)[-1].rsplit(":", 1)
    relay = NsRelay(ns, (host, int(port)))
    rundir = tempfile.mkdtemp(prefix="tcni-")
    node = Node(
        ns=ns, name=f"node-{uuid.uuid4().hex[:6]}", socket=os.path.join(rundir, "cni.sock"), bin_dir=cni_bin,
        etcd_env={"TORTIE_ETCD_ENDPOINTS": relay.endpoint, "TORTIE_ETCD_PREFIX": etcd_config.prefix},
        store=store, ipam=IPAM(etcd), netns_factory=netns, log_path=os.path.join(rundir, "server.log"),
    )
    node.relay = relay
    node.start_server()
    try:
        yield node
    finally:
        node.stop_server()
        relay.close()
        shutil.rmtree(rundir, ignore_errors=True)


