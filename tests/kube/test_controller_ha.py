"""Controller replicas: only the Lease holder writes to the datastore.

In a thread: a standby writes nothing and says so on /readiness and /metrics; it takes
over when the lease is released and mirrors what it missed. As processes (slow): two
tortie-controller executables against one fake API server and one etcd, the leader killed
with SIGKILL (or frozen with SIGSTOP): exactly one writes at any moment, the other takes
over within the lease duration, and the datastore mirrors Kubernetes after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime

import pytest
from doubles.apiserver_fake import lease, namespace, node, pod
from kubehelpers import namespace_present, wait_for

from tortie.datastore.store import ResourceStore
from tortie.kube.leader import LeaderElectionConfig
from tortie.kube.mirror import MIRROR_ANNOTATION

NS, NAME = "kube-system", "tortie-controller"
LEASE, RENEW, RETRY = 2, 1.5, 0.25  # seconds: short, so the test is quick


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float:
    """The sum of a metric's series in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _mirrored_namespaces(store: ResourceStore) -> set[str]:
    return {r["metadata"]["name"] for r in store.list("Namespace")
            if (r["metadata"].get("annotations") or {}).get(MIRROR_ANNOTATION)}


def test_a_standby_writes_nothing_until_the_lease_is_free(etcd, fake_api, run_controller):
    store = ResourceStore(etcd)
    fake_api.add(lease(NS, NAME, holder="elsewhere", duration=3600))  # a leader that stays
    fake_api.add(namespace("prod"))
    ctl = run_controller(health="127.0.0.1:0",
                         leader=LeaderElectionConfig(lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY))
    code, body = _http(ctl.health_port, "/readiness")
    status = json.loads(body)
    assert code == 200 and status["leader"]["leading"] is False and status["leader"]["holder"] == "elsewhere"
    time.sleep(1.0)  # many loop turns with a dirty key and an empty datastore
    assert not namespace_present(store, "prod")
    metrics = _http(ctl.health_port, "/metrics")[1]
    assert _metric(metrics, "tortie_controller_leader") == 0
    assert _metric(metrics, "tortie_controller_datastore_writes_total") == 0

    # The holder releases the lease (client-go's ReleaseOnCancel): the standby takes over at
    # once and writes what it saw while waiting.
    held = fake_api.get("Lease", NAME, NS)
    held["spec"].update(holderIdentity="", leaseDurationSeconds=1)
    fake_api.modify(held)
    wait_for(lambda: namespace_present(store, "prod"), timeout=3, what="the new leader mirrors the namespace")
    status = json.loads(_http(ctl.health_port, "/readiness")[1])
    assert status["leader"]["leading"] is True and status["leader"]["holder"] == ctl.identity
    metrics = _http(ctl.health_port, "/metrics")[1]
    assert _metric(metrics, "tortie_controller_leader") == 1
    assert _metric(metrics, "tortie_controller_datastore_writes_total") >= 1

    # Another replica takes the lease: this one stops writing at once.
    taken = fake_api.get("Lease", NAME, NS)
    taken["spec"].update(holderIdentity="usurper", leaseDurationSeconds=3600)
    fake_api.modify(taken)
    wait_for(lambda: not ctl.leading(), timeout=1, what="stepped down")
    before = _metric(_http(ctl.health_port, "/metrics")[1], "tortie_controller_datastore_writes_total")
    fake_api.add(namespace("later"))
    time.sleep(1.0)
    assert not namespace_present(store, "later")
    assert _metric(_http(ctl.health_port, "/metrics")[1], "tortie_controller_datastore_writes_total") == before


# --- two processes ---------------------------------------------------------------------------


class Replica:
    """One tortie-controller process, its JSON log in a file."""

    def __init__(self, name: str, env: dict, log_path) -> None:
        exe = os.path.join(os.path.dirname(sys.executable), "tortie-controller")
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([exe], env={**env, "HOSTNAME": name}, stdout=subprocess.DEVNULL,
                                     stderr=self._log, start_new_session=True)

    def events(self) -> list[dict]:
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def event(self, name: str, component: str | None = None) -> dict | None:
        return next((e for e in self.events() if e["event"] == name
                     and component in (None, e.get("component"))), None)

    @property
    def identity(self) -> str | None:
        e = self.event("leader election starting")
        return e and e["identity"]

    @property
    def port(self) -> int | None:
        e = self.event("health served")
        return e and int(e["listen"].rpartition(":")[2])

    def writes(self) -> list[float]:
        """Wall-clock times of the datastore writes it logged."""
        return [_ts(e) for e in self.events() if e["event"] == "datastore write"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.fixture
def replicas(etcd_config, fake_api, tmp_path):
    env = {**os.environ, "TORTIE_K8S_API": fake_api.url, "TORTIE_ETCD_ENDPOINTS": etcd_config.endpoints[0],
           "TORTIE_ETCD_PREFIX": etcd_config.prefix, "TORTIE_LOG_FORMAT": "json", "TORTIE_LOG_LEVEL": "debug",
           "TORTIE_CONTROLLER_HEALTH": "127.0.0.1:0", "TORTIE_CONTROLLER_GC_INTERVAL": "3600",
           "TORTIE_CONTROLLER_LEASE_DURATION": str(LEASE), "TORTIE_CONTROLLER_RENEW_DEADLINE": str(RENEW),
           "TORTIE_CONTROLLER_RETRY_PERIOD": str(RETRY)}
    started = [Replica(n, env, tmp_path / f"{n}.log") for n in ("replica-a", "replica-b")]
    try:
        yield started
    finally:
        for r in started:
            r.stop()


class Churn:
    """Kubernetes changes all the time: a namespace added every 100 ms, older ones deleted."""

    def __init__(self, fake_api) -> None:
        self.api, self.n = fake_api, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.n += 1
            self.api.add(namespace(f"churn-{self.n}", {"n": str(self.n)}))
            if self.n % 3 == 0:
                self.api.delete("Namespace", f"churn-{self.n - 2}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _running(etcd, fake_api, replicas) -> tuple[ResourceStore, Replica, Replica, Churn]:
    """A node, a pod with its endpoint, both replicas in sync, then the churn starts."""
    store = ResourceStore(etcd)
    fake_api.add(node("node1", {"rack": "r1"}))
    fake_api.add(pod("default", "web", {"app": "web"}))
    fake_api.add(namespace("default"))
    store.create({"apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
                  "metadata": {"name": "node1-k8s-web-eth0", "namespace": "default"},
                  "spec": {"node": "node1", "pod": "web", "containerID": "c1"}})
    leader, standby = _leader_and_standby(fake_api, replicas)
    return store, leader, standby, Churn(fake_api)


def _leader_and_standby(fake_api, replicas) -> tuple[Replica, Replica]:
    wait_for(lambda: all(r.event("in sync", "controller") for r in replicas), timeout=30,
             what="both replicas in sync")
    holder = fake_api.get("Lease", NAME, NS)["spec"]["holderIdentity"]
    leader = next(r for r in replicas if r.identity == holder)
    standby = next(r for r in replicas if r is not leader)
    assert leader.event("in sync", "controller")["leading"] is True
    assert standby.event("in sync", "controller")["leading"] is False
    return leader, standby


def _takeover(fake_api, old: Replica, new: Replica) -> tuple[float, float]:
    """(when the new replica first wrote the Lease, when the old one last did), monotonic."""
    writes = [(w.at, w.obj["spec"].get("holderIdentity")) for w in fake_api.writes if w.resource == "leases"]
    took = next(at for at, holder in writes if holder == new.identity)
    return took, max(at for at, holder in writes if holder == old.identity and at < took)


def _converges(store: ResourceStore, fake_api, etcd) -> None:
    want = {n["metadata"]["name"] for n in fake_api.objects("Namespace")}
    wait_for(lambda: _mirrored_namespaces(store) == want, timeout=10, what="namespaces mirrored exactly")
    for name in want:
        assert (store.get("Namespace", name)["metadata"].get("labels") or {}) == \
            (fake_api.get("Namespace", name)["metadata"].get("labels") or {})


@pytest.mark.slow
def test_leader_killed_one_writer_and_takeover_within_the_lease(etcd, fake_api, replicas):
    store, leader, standby, churn = _running(etcd, fake_api, replicas)
    try:
        time.sleep(1.5)
        assert leader.writes() and not standby.writes()  # the leader mirrors the churn, the standby nothing
        killed_wall, killed = time.time(), time.monotonic()
        os.killpg(leader.proc.pid, signal.SIGKILL)
        leader.proc.wait(5)
        dead_wall = time.time()  # no write of the leader's can be logged after this
        fake_api.label("Pod", "web", {"app": "web", "v": "2"}, "default")  # changed while nobody leads
        wait_for(lambda: fake_api.get("Lease", NAME, NS)["spec"]["holderIdentity"] == standby.identity,
                 timeout=LEASE + 3, what="the standby takes over")
        time.sleep(1.0)
    finally:
        churn.stop()
    took, last_renew = _takeover(fake_api, leader, standby)
    print(f"takeover {took - killed:.3f}s after SIGKILL; {took - last_renew:.3f}s after the last renewal")
    assert took - killed < LEASE, f"takeover {took - killed:.2f}s after the kill, lease {LEASE}s"
    assert took - last_renew >= RENEW  # the dead leader's renew deadline had passed

    # One writer at any time: the dead leader's writes all came before the kill, the
    # survivor's all after it started leading, and it did write.
    started = next(_ts(e) for e in standby.events() if e["event"] == "started leading")
    assert started > killed_wall
    assert leader.writes() and max(leader.writes()) < dead_wall
    assert standby.writes() and min(standby.writes()) >= started
    # The datastore mirrors Kubernetes: the churn, and the pod label changed in the gap.
    _converges(store, fake_api, etcd)
    wait_for(lambda: store.get("WorkloadEndpoint", "node1-k8s-web-eth0", "default")["metadata"].get("labels")
             == {"app": "web", "v": "2"}, timeout=5, what="pod labels changed in the gap reach the endpoint")
    metrics = _http(standby.port, "/metrics")[1]
    assert _metric(metrics, "tortie_controller_leader") == 1


@pytest.mark.slow
def test_a_frozen_leader_writes_nothing_after_it_thaws(etcd, fake_api, replicas):
    """SIGSTOP: the leader neither dies nor renews (a long pause). The standby takes over.
    Then the Lease API stops answering and the old leader is thawed with work queued: it
    cannot learn that it lost, and writes nothing because its renew deadline is past; the
    new leader, unable to renew, stops writing at its own deadline. Fail closed on both."""
    store, leader, standby, churn = _running(etcd, fake_api, replicas)
    try:
        time.sleep(1.0)
        leader.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: _state(leader.proc.pid) == "T", timeout=2, what="the leader stopped")
        frozen_wall = time.time()  # nothing it logs can be stamped later until SIGCONT
        wait_for(lambda: fake_api.get("Lease", NAME, NS)["spec"]["holderIdentity"] == standby.identity,
                 timeout=LEASE + 3, what="the standby takes over")
        time.sleep(1.0)  # the new leader writes the churn; the frozen one's watches queue it
        outage = time.time()
        fake_api.fail("leases", 503)
        leader.proc.send_signal(signal.SIGCONT)
        time.sleep(RENEW + 1.0)
        outage_end = time.time()
        fake_api.fail("leases", None)
        wait_for(lambda: leader.event("stopped leading"), timeout=5, what="the thawed leader steps down")
        time.sleep(1.0)
    finally:
        churn.stop()
    assert not [t for t in leader.writes() if t > frozen_wall], "the thawed leader wrote"
    assert [t for t in standby.writes() if frozen_wall < t < outage], "the new leader did not write"
    # The new leader's writes after its last renewal before the outage: none past the
    # renew deadline, although the churn went on.
    renewed = max(w.wall for w in fake_api.writes if w.resource == "leases" and w.wall < outage
                  and w.obj["spec"].get("holderIdentity") == standby.identity)
    assert [t for t in standby.writes() if renewed < t < renewed + RENEW], "no write during the outage"
    late = [t for t in standby.writes() if renewed + RENEW <= t < outage_end]
    assert not late, f"writes {[round(t - renewed, 3) for t in late]}s after the last renewal"
    status = json.loads(_http(leader.port, "/readiness")[1])
    assert status["leader"]["leading"] is False and status["leader"]["holder"] == standby.identity
    assert _metric(_http(leader.port, "/metrics")[1], "tortie_controller_leader") == 0
    _converges(store, fake_api, etcd)
