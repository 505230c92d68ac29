"""The etcd adapter against a real three-member cluster on loopback (issue 12, item 1):
it fails over between members when one dies (the leader too), says down within its
deadline when the quorum is lost and works again at once when it returns; the syncer's
watch moves to a live member; over TLS, clients without the lab CA's certificate, with
another CA's, or in plaintext are refused, each in one line that says what to check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tortie.datastore.etcd import EtcdClient, EtcdConfig, Txn
from tortie.datastore.monitor import DatastoreMonitor
from tortie.datastore.watch import Snapshot, Syncer, Update, wait_in_sync
from tortie.errors import DatastoreUnavailable
from tortie.lab.etcd_server import EtcdCluster
from tortie.lab.pki import issue, make_ca

pytestmark = pytest.mark.slow  # three etcd members started, killed and restarted

PREFIX = "/failover/"
DEADLINE = 1.5  # the CNI server's etcd deadline


@pytest.fixture(scope="module")
def cluster():
    with EtcdCluster(3) as c:
        yield c


@pytest.fixture
def members(cluster):
    """The cluster, every member running again after the test."""
    yield cluster
    for m in cluster.members:
        if m.proc is None or m.proc.poll() is not None:
            cluster.restart(m.name)


def client_for(cluster, timeout: float = DEADLINE, **kw) -> EtcdClient:
    return EtcdClient(EtcdConfig(endpoints=cluster.endpoints, prefix=PREFIX, timeout=timeout, **kw))


def leader(cluster, client: EtcdClient) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for s in client.member_status():
            if s["id"] and s["id"] == s["leader"]:
                return next(m.name for m in cluster.members if m.endpoint == s["endpoint"])
        time.sleep(0.1)
    raise AssertionError(f"no leader: {client.member_status()}")


def use(client: EtcdClient, cluster, name: str) -> None:
    """Point the client at one member (as if it had started there)."""
    client._current = [m.name for m in cluster.members].index(name)
    client._follow()


class Writer(threading.Thread):
    """Compare-and-swap writes of one key, one after the other, each timed."""

    def __init__(self, client: EtcdClient, key: str) -> None:
        super().__init__(daemon=True)
        self.client, self.key = client, key
        self.calls: list[tuple[float, str]] = []  # (seconds, outcome)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                kv = self.client.get(self.key)
                ok, _ = self.client.transaction(Txn().guard(self.key, kv.mod_revision if kv else 0)
                                                .put(self.key, repr(t0).encode()))
                outcome = "ok" if ok else "conflict"
            except DatastoreUnavailable as exc:
                outcome = str(exc)
            self.calls.append((time.monotonic() - t0, outcome))
            self.halt.wait(0.02)

    def stop(self) -> list[tuple[float, str]]:
        self.halt.set()
        self.join(10)
        return self.calls


@pytest.mark.parametrize("victim", ["leader", "follower in use"])
def test_a_dead_member_fails_no_call(members, victim):
    client = client_for(members)
    lead = leader(members, client)
    if victim == "leader":
        name = lead
        use(client, members, next(m.name for m in members.members if m.name != lead))
    else:  # the member the client talks to
        name = next(m.name for m in members.members if m.name != lead)
        use(client, members, name)
    writer = Writer(client, PREFIX + victim.replace(" ", "-"))
    writer.start()
    time.sleep(0.3)
    members.member(name).kill()
    time.sleep(2.5)
    calls = writer.stop()
    assert [o for _, o in calls if o != "ok"] == []
    assert len(calls) > 10
    slowest = max(t for t, _ in calls)
    print(f"{victim} killed: {len(calls)} calls, slowest {slowest:.2f}s")
    assert slowest < DEADLINE, slowest  # an election is over well within one call's deadline
    assert client.member != members.member(name).endpoint or victim == "leader"


def test_quorum_loss_is_unavailable_within_the_deadline_and_heals(members):
    client = client_for(members)
    lead = leader(members, client)
    others = [m for m in members.members if m.name != lead]
    for m in others:
        m.kill()
    t0 = time.monotonic()
    with pytest.raises(DatastoreUnavailable, match="etcd unreachable"):
        client.put(PREFIX + "q", b"1")
    took = time.monotonic() - t0
    assert took < DEADLINE + 0.3, took
    for m in others:
        m._log.close()
        m.launch()
    back = time.monotonic()
    while True:
        try:
            client.put(PREFIX + "q", b"2")
            break
        except DatastoreUnavailable:
            assert time.monotonic() - back < 5.0, "not writable 5 s after the quorum returned"
    print(f"quorum lost: unavailable after {took:.2f}s; writable {time.monotonic() - back:.2f}s after restart")
    assert client.get(PREFIX + "q").value == b"2"


def test_syncer_resumes_on_another_member(members):
    client = client_for(members, timeout=5.0)
    writer = client_for(members, timeout=5.0)
    syncer = Syncer(client, PREFIX + "w/")
    events = syncer.iter_events()
    assert isinstance(next(events), Snapshot)
    assert wait_in_sync(syncer)
    watched = client.member
    got: list[str] = []
    done = threading.Event()

    def consume() -> None:
        for ev in events:
            if isinstance(ev, Update):
                got.append(ev.key)
                if len(got) == 2:
                    done.set()

    threading.Thread(target=consume, daemon=True).start()
    writer.put(PREFIX + "w/before", b"1")
    next(m for m in members.members if m.endpoint == watched).kill()
    writer.put(PREFIX + "w/after", b"2")
    try:
        assert done.wait(5), got
    finally:
        syncer.stop()
    assert got == [PREFIX + "w/before", PREFIX + "w/after"]
    assert client.member != watched


def test_monitor_stays_up_while_a_leader_is_elected(members):
    client = client_for(members)
    monitor = DatastoreMonitor(client, interval=0.2, interval_down=0.2)
    downs: list[str | None] = []
    monitor.on_change = lambda up, error: downs.append(error) if not up else None
    lead = leader(members, client)
    use(client, members, lead)

    import asyncio

    async def watch(seconds: float) -> None:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.3)
        members.member(lead).kill()
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(watch(3.0))
    assert downs == [] and monitor.up


def test_a_write_applied_before_its_member_died_is_recognised(members):
    """The read-back behind a retried transaction: our exact values in place mean the
    earlier attempt landed; another value (someone else's write) means it did not."""
    client = client_for(members)
    key = PREFIX + "landed"
    txn = Txn().guard(key, 0).put(key, b"mine")
    ok, rev = client.transaction(txn)
    assert ok and client._landed(txn) == rev
    assert not client.transaction(txn)[0]  # the same write again fails its guard
    client.put(key, b"theirs")
    assert client._landed(txn) == 0


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster():
    with EtcdCluster(3, tls=True) as c:
        yield c


def ctl(cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "TORTIE_ETCD_ENDPOINTS": ",".join(cluster.endpoints), "TORTIE_ETCD_PREFIX": PREFIX,
            **env}
    return subprocess.run([sys.executable, "-c", "import sys; from tortie.ctl.main import main; sys.exit(main())",
                           *args], capture_output=True, text=True, env=full, timeout=30)


def test_tls_client_with_the_lab_certificate_works(tls_cluster):
    cert, key = tls_cluster.pki.client
    client = client_for(tls_cluster, ca=tls_cluster.pki.ca, cert=cert, key=key)
    client.put(PREFIX + "tls", b"1")
    assert client.get(PREFIX + "tls").value == b"1"
    r = ctl(tls_cluster, "get", "ippools", TORTIE_ETCD_CA=tls_cluster.pki.ca, TORTIE_ETCD_CERT=cert,
            TORTIE_ETCD_KEY=key)
    assert r.returncode == 0, r.stderr


def test_tls_refuses_other_clients_in_one_line(tls_cluster, tmp_path):
    cert, key = tls_cluster.pki.client
    other = make_ca(str(tmp_path / "other"), cn="other-ca")
    ocert, okey = issue(other, "client", server=False)
    plain = tuple(e.replace("https://", "http://") for e in tls_cluster.endpoints)
    cases = {
        "no client certificate": ({"ca": tls_cluster.pki.ca}, "no client certificate was given"),
        "a client certificate of another CA": ({"ca": tls_cluster.pki.ca, "cert": ocert, "key": okey},
                                               "refused the TLS connection"),
        "etcd's certificate not of our CA": ({"ca": other.ca, "cert": cert, "key": key}, "not signed by the CA"),
        "plaintext": ({"endpoints": plain}, "does it want TLS"),
    }
    for what, (kw, says) in cases.items():
        kw = {"endpoints": tls_cluster.endpoints, **kw}
        client = EtcdClient(EtcdConfig(prefix=PREFIX, timeout=5.0, **kw))
        t0 = time.monotonic()
        with pytest.raises(DatastoreUnavailable) as err:
            client.get(PREFIX + "tls")
        took = time.monotonic() - t0
        assert says in str(err.value) and "\n" not in str(err.value), (what, str(err.value))
        assert took < 1.0, (what, took)  # refused at once, not retried until the deadline
    # tortiectl without a certificate: one line on stderr, the exit code of an unreachable datastore
    r = ctl(tls_cluster, "get", "ippools", TORTIE_ETCD_CA=tls_cluster.pki.ca)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "no client certificate was given" in r.stderr, r.stderr
    assert r.stderr.startswith("tortiectl: etcd unreachable"), r.stderr
