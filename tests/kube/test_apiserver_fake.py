"""The fake API server against the official kubernetes client: lists, reads, watches,
410 Gone and a cut stream look to the client as they would from a real server."""

from __future__ import annotations

import threading
import time

import pytest
import urllib3
from doubles.apiserver_fake import namespace, network_policy, node, pod
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from tortie.errors import AlreadyExists, NotFound


def test_list_and_get(fake_api, kube_client):
    fake_api.add(node("n1", {"zone": "a"}))
    fake_api.add(namespace("prod", {"env": "prod"}))
    fake_api.add(pod("prod", "web", {"app": "web"}))
    fake_api.add(pod("dev", "db", {"app": "db"}))
    fake_api.add(network_policy("prod", "deny"))
    core, net = k8s.CoreV1Api(kube_client), k8s.NetworkingV1Api(kube_client)

    nodes = core.list_node()
    assert [n.metadata.name for n in nodes.items] == ["n1"]
    assert nodes.items[0].metadata.labels == {"zone": "a"}
    assert int(nodes.metadata.resource_version) == fake_api.resource_version
    assert sorted(p.metadata.name for p in core.list_pod_for_all_namespaces().items) == ["db", "web"]
    assert [p.metadata.name for p in core.list_namespaced_pod("prod").items] == ["web"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app=db").items] == ["db"]
    assert core.read_namespaced_pod("web", "prod").spec.node_name == "node1"
    assert core.read_namespace("prod").metadata.labels == {"env": "prod"}
    assert [p.metadata.name for p in net.list_network_policy_for_all_namespaces().items] == ["deny"]
    assert [p.metadata.name for p in net.list_namespaced_network_policy("prod").items] == ["deny"]
    assert net.list_namespaced_network_policy("dev").items == []
    with pytest.raises(k8s.ApiException) as exc:
        core.read_namespaced_pod("web", "dev")
    assert exc.value.status == 404


def test_raw_list_wire_format(fake_api, kube_client):
    fake_api.add(pod("default", "p"))
    resp = k8s.CoreV1Api(kube_client).list_pod_for_all_namespaces(_preload_content=False)
    import json
    doc = json.loads(resp.data)
    assert doc["kind"] == "PodList" and doc["apiVersion"] == "v1"
    assert doc["metadata"]["resourceVersion"] == str(fake_api.resource_version)
    assert doc["items"][0]["metadata"]["name"] == "p"


def test_changes_bump_resource_version(fake_api):
    rv0 = fake_api.resource_version
    a = fake_api.add(pod("default", "p", {"v": "1"}))
    b = fake_api.label("Pod", "p", {"v": "2"}, "default")
    assert int(a["metadata"]["resourceVersion"]) == rv0 + 1
    assert int(b["metadata"]["resourceVersion"]) == rv0 + 2
    assert b["metadata"]["uid"] == a["metadata"]["uid"]
    with pytest.raises(AlreadyExists):
        fake_api.add(pod("default", "p"))
    fake_api.delete("Pod", "p", "default")
    with pytest.raises(NotFound):
        fake_api.get("Pod", "p", "default")
    assert fake_api.resource_version == rv0 + 3


def _later(fn, delay: float = 0.2) -> threading.Thread:
    def run():
        time.sleep(delay)
        fn()
    t = threading.Thread(target=run)
    t.start()
    return t


def test_watch_streams_changes_after_resource_version(fake_api, kube_client):
    core = k8s.CoreV1Api(kube_client)
    fake_api.add(pod("default", "old"))
    rv = core.list_pod_for_all_namespaces().metadata.resource_version

    def changes():
        fake_api.add(pod("default", "new", {"a": "1"}))
        fake_api.add(node("n1"))  # another resource: not in the pod stream
        fake_api.label("Pod", "new", {"a": "2"}, "default")
        fake_api.delete("Pod", "old", "default")

    t = _later(changes)
    seen = [(e["type"], e["object"].metadata.name, e["object"].metadata.labels)
            for e in k8s_watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv,
                                              timeout_seconds=1)]
    t.join()
    assert seen == [("ADDED", "new", {"a": "1"}), ("MODIFIED", "new", {"a": "2"}), ("DELETED", "old", {})]


def test_watch_without_resource_version_starts_with_current_objects(fake_api, kube_client):
    fake_api.add(namespace("a"))
    fake_api.add(namespace("b"))
    core = k8s.CoreV1Api(kube_client)
    events = list(k8s_watch.Watch().stream(core.list_namespace, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_timeout_sends_bookmark(fake_api, kube_client):
    fake_api.add(node("n1"))
    core = k8s.CoreV1Api(kube_client)
    rv = str(fake_api.resource_version)
    events = list(k8s_watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=1,
                                           allow_watch_bookmarks=True))
    assert [e["type"] for e in events] == ["BOOKMARK"]
    assert events[0]["raw_object"]["metadata"]["resourceVersion"] == rv


def test_too_old_resource_version_is_410_gone_and_relist_recovers(fake_api, kube_client):
    core = k8s.CoreV1Api(kube_client)
    fake_api.add(pod("default", "a"))
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    fake_api.add(pod("default", "b"))
    fake_api.compact()
    with pytest.raises(k8s.ApiException) as exc:
        list(k8s_watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1))
    assert exc.value.status == 410
    # The wire format: one ERROR event carrying the Status.
    resp = core.list_pod_for_all_namespaces(watch=True, resource_version=rv, _preload_content=False)
    lines = [line for line in resp.data.decode().splitlines() if line]
    import json
    assert json.loads(lines[0])["type"] == "ERROR" and json.loads(lines[0])["object"]["code"] == 410
    # A fresh list gives a resourceVersion the server can watch from again.
    listing = core.list_pod_for_all_namespaces()
    assert sorted(p.metadata.name for p in listing.items) == ["a", "b"]
    t = _later(lambda: fake_api.add(pod("default", "c")))
    events = list(k8s_watch.Watch().stream(core.list_pod_for_all_namespaces,
                                           resource_version=listing.metadata.resource_version, timeout_seconds=1))
    t.join()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "c")]


def test_history_window_expires_old_versions(kube_client):
    from doubles.apiserver_fake import FakeAPIServer

    with FakeAPIServer(history=2) as api:
        core = k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=api.url)))
        rv = str(api.resource_version)
        for i in range(4):
            api.add(node(f"n{i}"))
        with pytest.raises(k8s.ApiException) as exc:
            list(k8s_watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=1))
        assert exc.value.status == 410


def test_dropped_watch_breaks_the_clients_stream(fake_api, kube_client):
    core = k8s.CoreV1Api(kube_client)
    rv = str(fake_api.resource_version)
    t = _later(lambda: (fake_api.add(node("n1")), fake_api.wait_for_watches(1), time.sleep(0.2),
                        fake_api.drop_watches()))
    seen = []
    with pytest.raises((urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError)):
        for e in k8s_watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=20):
            seen.append(e["object"].metadata.name)
    t.join()
    assert seen == ["n1"]


def test_namespaced_watch_sees_only_its_namespace(fake_api, kube_client):
    net = k8s.NetworkingV1Api(kube_client)
    rv = str(fake_api.resource_version)
    t = _later(lambda: (fake_api.add(network_policy("a", "p1")), fake_api.add(network_policy("b", "p2")),
                        fake_api.add(pod("a", "not-a-policy"))))
    events = list(k8s_watch.Watch().stream(net.list_namespaced_network_policy, "a", resource_version=rv,
                                           timeout_seconds=1))
    t.join()
    assert [(e["type"], e["object"].metadata.namespace, e["object"].metadata.name) for e in events] == [
        ("ADDED", "a", "p1")]


def _lease_body(name: str, holder: str, rv: str | None = None) -> dict:
    meta = {"name": name, "namespace": "kube-system"}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}}


def test_lease_create_get_and_optimistic_replace(fake_api, kube_client):
    coord = k8s.CoordinationV1Api(kube_client)
    with pytest.raises(k8s.ApiException) as exc:
        coord.read_namespaced_lease("ctl", "kube-system")
    assert exc.value.status == 404

    made = coord.create_namespaced_lease("kube-system", _lease_body("ctl", "a"))
    assert made.spec.holder_identity == "a" and made.metadata.namespace == "kube-system"
    rv = made.metadata.resource_version
    with pytest.raises(k8s.ApiException) as exc:  # a second create loses
        coord.create_namespaced_lease("kube-system", _lease_body("ctl", "b"))
    assert exc.value.status == 409 and '"reason": "AlreadyExists"' in exc.value.body

    # Two writers replace the version both read: the first wins, the second gets 409 Conflict.
    won = coord.replace_namespaced_lease("ctl", "kube-system", _lease_body("ctl", "b", rv))
    assert won.spec.holder_identity == "b" and won.metadata.resource_version != rv
    with pytest.raises(k8s.ApiException) as exc:
        coord.replace_namespaced_lease("ctl", "kube-system", _lease_body("ctl", "c", rv))
    assert exc.value.status == 409 and '"reason": "Conflict"' in exc.value.body
    assert coord.read_namespaced_lease("ctl", "kube-system").spec.holder_identity == "b"
    assert won.metadata.uid == made.metadata.uid

    # A Lease update must say which version it replaces (the real Lease strategy).
    with pytest.raises(k8s.ApiException) as exc:
        coord.replace_namespaced_lease("ctl", "kube-system", _lease_body("ctl", "c"))
    assert exc.value.status == 422
    # ... and a PUT may create a missing one, unless it names a version.
    assert coord.replace_namespaced_lease("other", "kube-system", _lease_body("other", "x")).spec.holder_identity == "x"
    with pytest.raises(k8s.ApiException) as exc:
        coord.replace_namespaced_lease("gone", "kube-system", _lease_body("gone", "x", "5"))
    assert exc.value.status == 409
    with pytest.raises(k8s.ApiException) as exc:
        coord.replace_namespaced_lease("ctl", "kube-system", _lease_body("not-ctl", "x", rv))
    assert exc.value.status == 400

    assert [(w.verb, w.obj["spec"]["holderIdentity"]) for w in fake_api.writes] == [
        ("POST", "a"), ("PUT", "b"), ("PUT", "x")]
    assert [w.at for w in fake_api.writes] == sorted(w.at for w in fake_api.writes)


def test_injected_failure_answers_every_request_of_a_resource(fake_api, kube_client):
    coord, core = k8s.CoordinationV1Api(kube_client), k8s.CoreV1Api(kube_client)
    fake_api.fail("leases", 503)
    with pytest.raises(k8s.ApiException) as exc:
        coord.read_namespaced_lease("ctl", "kube-system")
    assert exc.value.status == 503
    assert core.list_node().items == []  # other resources still answer
    fake_api.fail("leases", None)
    with pytest.raises(k8s.ApiException) as exc:
        coord.read_namespaced_lease("ctl", "kube-system")
    assert exc.value.status == 404
