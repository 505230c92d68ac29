"""Leader election through a Lease on the fake API server: one leader, fail closed,
takeover within the lease duration, client-go's record."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from doubles.apiserver_fake import lease
from kubehelpers import wait_for
from kubernetes import client as k8s

from tortie.errors import ValidationError
from tortie.kube.controller import ControllerConfig
from tortie.kube.leader import LeaderElectionConfig, LeaderElector

NS, NAME = "kube-system", "tortie-controller"
FAST = dict(lease_duration=2, renew_deadline=1.5, retry_period=0.25)


@pytest.fixture
def electors(fake_api):
    made: list[LeaderElector] = []

    def make(identity: str, start: bool = True, **kw) -> LeaderElector:
        api = k8s.ApiClient(k8s.Configuration(host=fake_api.url))
        e = LeaderElector(LeaderElectionConfig(identity=identity, **{**FAST, **kw}), api)
        made.append(e)
        if start:
            e.start()
        return e

    yield make
    for e in made:
        e.stop(release=False)


def _lease_writes(fake_api) -> list[tuple[float, str, dict]]:
    return [(w.at, w.obj["spec"].get("holderIdentity") or "", w.obj["spec"])
            for w in fake_api.writes if w.resource == "leases"]


def test_settings_defaults_env_and_refusals():
    cfg = LeaderElectionConfig()
    assert (cfg.enabled, cfg.name, cfg.namespace) == (True, "tortie-controller", "kube-system")
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (15, 10, 2)
    env = {"TORTIE_CONTROLLER_LEASE_DURATION": "4", "TORTIE_CONTROLLER_RENEW_DEADLINE": "3",
           "TORTIE_CONTROLLER_RETRY_PERIOD": "0.5", "TORTIE_CONTROLLER_LEASE_NAME": "ctl",
           "TORTIE_CONTROLLER_LEASE_NAMESPACE": "tortie", "TORTIE_CONTROLLER_LEADER_ELECT": "false"}
    cfg = ControllerConfig.from_env(env).leader
    assert (cfg.enabled, cfg.name, cfg.namespace, cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (
        False, "ctl", "tortie", 4, 3, 0.5)
    # A flag wins over the environment.
    assert LeaderElectionConfig.from_env(env, lease_duration="6").lease_duration == 6
    refused = [({"TORTIE_CONTROLLER_RENEW_DEADLINE": "15"}, "TORTIE_CONTROLLER_RENEW_DEADLINE"),
               ({"TORTIE_CONTROLLER_RETRY_PERIOD": "9"}, "TORTIE_CONTROLLER_RETRY_PERIOD"),
               ({"TORTIE_CONTROLLER_LEASE_DURATION": "12.5"}, "TORTIE_CONTROLLER_LEASE_DURATION"),
               ({"TORTIE_CONTROLLER_LEASE_DURATION": "soon"}, "TORTIE_CONTROLLER_LEASE_DURATION"),
               ({"TORTIE_CONTROLLER_LEADER_ELECT": "maybe"}, "TORTIE_CONTROLLER_LEADER_ELECT"),
               ({"TORTIE_CONTROLLER_LEASE_NAMESPACE": "Kube_System"}, "TORTIE_CONTROLLER_LEASE_NAMESPACE"),
               ({"TORTIE_CONTROLLER_LEASE_NAME": "a/b"}, "TORTIE_CONTROLLER_LEASE_NAME")]
    for env, var in refused:
        with pytest.raises(ValidationError) as exc:
            LeaderElectionConfig.from_env(env)
        assert exc.value.field.startswith(var) and "\n" not in str(exc.value), env
    with pytest.raises(ValidationError) as exc:
        LeaderElectionConfig.from_env({}, renew_deadline="20")
    assert "--leader-elect-renew-deadline" in str(exc.value)


def test_first_replica_creates_the_lease_and_renews_it(fake_api, electors):
    a = electors("pod-a_1")
    wait_for(a.is_leader, timeout=5, what="a leads")
    first = fake_api.get("Lease", NAME, NS)["spec"]
    assert first["holderIdentity"] == "pod-a_1" and first["leaseDurationSeconds"] == 2
    assert first["leaseTransitions"] == 0 and first["acquireTime"] == first["renewTime"]
    renewed = datetime.fromisoformat(first["renewTime"])  # MicroTime: UTC, microseconds
    assert renewed.utcoffset() == timedelta(0) and abs(renewed.timestamp() - time.time()) < 5
    assert "." in first["renewTime"]
    wait_for(lambda: fake_api.get("Lease", NAME, NS)["spec"]["renewTime"] != first["renewTime"], timeout=2,
             what="a renewal")
    spec = fake_api.get("Lease", NAME, NS)["spec"]
    assert spec["acquireTime"] == first["acquireTime"] and spec["leaseTransitions"] == 0
    assert a.is_leader()


def test_one_leader_and_a_clean_stop_hands_over_at_once(fake_api, electors):
    a = electors("pod-a_1")
    wait_for(a.is_leader, timeout=5, what="a leads")
    b = electors("pod-b_2")
    wait_for(lambda: b.decided.is_set(), timeout=5, what="b's first round")
    for _ in range(8):  # two lease durations of rounds: b never leads while a renews
        assert a.is_leader() and not b.is_leader() and b.holder == "pod-a_1"
        time.sleep(0.25)
    assert {h for _, h, _ in _lease_writes(fake_api)} == {"pod-a_1"}

    stopped = time.monotonic()
    a.stop(release=True)
    assert not a.is_leader()
    wait_for(b.is_leader, timeout=2, what="b leads after a released the lease")
    assert time.monotonic() - stopped < 1.0  # not a lease duration: the release says so
    spec = fake_api.get("Lease", NAME, NS)["spec"]
    assert spec["holderIdentity"] == "pod-b_2" and spec["leaseTransitions"] == 1
    assert spec["leaseDurationSeconds"] == 2


def test_a_dead_leader_is_replaced_within_the_lease_duration(fake_api, electors):
    a = electors("pod-a_1")
    wait_for(a.is_leader, timeout=5, what="a leads")
    b = electors("pod-b_2")
    wait_for(lambda: b.decided.is_set(), timeout=5, what="b's first round")
    time.sleep(0.6)  # b has seen a renew a few times
    a.stop(release=False)  # gone without a word, as kill -9
    died = time.monotonic()
    wait_for(b.is_leader, timeout=5, what="b takes over")
    writes = _lease_writes(fake_api)
    took = next(at for at, h, _ in writes if h == "pod-b_2")
    last_renew = max(at for at, h, _ in writes if h == "pod-a_1")
    assert took - died < 2.0, f"takeover {took - died:.2f}s after the leader died"
    # b waited out at least the renew deadline after a's last renewal: by then a, fail
    # closed, had stopped writing.
    assert took - last_renew >= 1.5
    assert fake_api.get("Lease", NAME, NS)["spec"]["leaseTransitions"] == 1


def test_a_leader_that_sees_another_holder_stops_at_once(fake_api, electors):
    a = electors("pod-a_1")
    wait_for(a.is_leader, timeout=5, what="a leads")
    cur = fake_api.get("Lease", NAME, NS)
    cur["spec"]["holderIdentity"] = "intruder"
    fake_api.modify(cur)
    taken = time.monotonic()
    wait_for(lambda: not a.is_leader(), timeout=2, what="a steps down")
    assert time.monotonic() - taken < 0.25 + 0.2  # its next round, not its renew deadline
    # The intruder never renews: a takes the lease back once it expires, not before.
    wait_for(a.is_leader, timeout=5, what="a takes the expired lease back")
    assert time.monotonic() - taken >= 2.0 - 0.3


def test_a_leader_that_cannot_renew_stops_within_the_renew_deadline(fake_api, electors):
    a = electors("pod-a_1")
    wait_for(a.is_leader, timeout=5, what="a leads")
    time.sleep(0.3)
    last_ok = max(at for at, h, _ in _lease_writes(fake_api))
    fake_api.fail("leases", 503)
    wait_for(lambda: not a.is_leader(), timeout=3, what="a stops leading")
    stopped = time.monotonic()
    assert stopped - last_ok <= 1.5 + 0.1  # the renew deadline, counted from before that renewal
    assert stopped - last_ok >= 1.5 - 0.25 - 0.1
    fake_api.fail("leases", None)
    wait_for(a.is_leader, timeout=3, what="a leads again: nobody else took the lease")


def test_two_candidates_racing_for_a_free_lease_get_one_winner(fake_api, electors):
    fake_api.add(lease(NS, NAME, holder="", duration=1))  # released: free for the taking
    cands = [electors(f"pod-{i}_x", start=False) for i in range(4)]
    for c in cands:
        c.start()
    wait_for(lambda: sum(c.is_leader() for c in cands) == 1, timeout=5, what="a leader")
    for _ in range(6):
        assert sum(c.is_leader() for c in cands) == 1
        time.sleep(0.25)
    assert len({h for _, h, _ in _lease_writes(fake_api)}) == 1  # losers got 409, wrote nothing
