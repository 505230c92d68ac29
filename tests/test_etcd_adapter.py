import pytest

from tortie.datastore.etcd import EtcdClient, EtcdConfig, Txn
from tortie.errors import DatastoreUnavailable, ValidationError


def test_cas_guards_on_mod_revision(etcd, etcd_prefix):
    key = etcd_prefix + "k"
    ok, rev = etcd.cas(key, 0, b"one")
    assert ok
    assert not etcd.cas(key, 0, b"two")[0]  # exists now: create-only guard fails
    cur = etcd.get(key)
    assert cur.value == b"one" and cur.mod_revision == rev
    assert etcd.cas(key, rev, b"two")[0]
    assert not etcd.cas(key, rev, b"three")[0]  # stale revision
    assert etcd.get(key).value == b"two"


def test_transaction_is_all_or_nothing(etcd, etcd_prefix):
    a, b = etcd_prefix + "a", etcd_prefix + "b"
    etcd.put(a, b"x")
    ok, _ = etcd.transaction(Txn().guard(a, 0).put(b, b"y"))
    assert not ok and etcd.get(b) is None


@pytest.mark.parametrize("size", [(3 << 19) + 1024, 2 << 20])  # over etcd's 1.5 MiB; over gRPC's limit
def test_write_too_large_for_etcd_is_one_clear_error(etcd, etcd_prefix, size):
    with pytest.raises(ValidationError, match="too large"):
        etcd.transaction(Txn().put(etcd_prefix + "big", b"x" * size))
    assert etcd.get(etcd_prefix + "big") is None


def test_unchanged_since_guards_every_key_under_a_prefix(etcd, etcd_prefix):
    under, other = etcd_prefix + "weps/", etcd_prefix + "out"
    etcd.put(under + "a", b"1")
    _, rev = etcd.get_prefix(under)
    assert etcd.transaction(Txn().unchanged_since(under, rev).put(other, b"ok"))[0]
    etcd.put(under + "b", b"2")  # a key written since
    assert not etcd.transaction(Txn().unchanged_since(under, rev).put(other, b"no"))[0]
    assert etcd.get(other).value == b"ok"


def test_update_retries_and_returns_written(etcd, etcd_prefix):
    key = etcd_prefix + "counter"
    for _ in range(5):
        etcd.update(key, lambda kv: str(int(kv.value) + 1 if kv else 1).encode())
    assert etcd.get(key).value == b"5"


def test_unreachable_etcd_is_a_clear_error():
    client = EtcdClient(EtcdConfig(endpoints=("http://127.0.0.1:1",), timeout=0.5))
    with pytest.raises(DatastoreUnavailable, match="etcd unreachable"):
        client.get("/x")


def test_get_prefix_pages_past_the_grpc_message_limit(etcd, etcd_prefix):
    # 6 MB under one prefix: one unpaged Range would exceed gRPC's 4 MB reply limit.
    value = b"x" * 60_000
    etcd.put_many((f"{etcd_prefix}big/{i:04d}", value) for i in range(100))
    kvs, rev = etcd.get_prefix(etcd_prefix + "big/", page=7)
    assert [kv.key for kv in kvs] == [f"{etcd_prefix}big/{i:04d}" for i in range(100)]
    assert all(kv.value == value for kv in kvs) and rev >= max(kv.mod_revision for kv in kvs)
    assert len(etcd.get_prefix(etcd_prefix + "big/")[0]) == 100
