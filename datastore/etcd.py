"""The etcd adapter: the one place that imports the etcd client.

Thin and synchronous (gRPC underneath); asyncio callers run it in a thread. Every
write that can race goes through `transaction()`, guarded by mod_revisions
(0 means "the key must not exist"), so callers build compare-and-swap on it and
`update()` wraps the read-modify-write loop with bounded retries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import etcd3
import grpc
import grpc._common
from etcd3 import etcdrpc
from etcd3 import exceptions as etcd_exc

from tortie.errors import Conflict, DatastoreUnavailable, ValidationError
from tortie.log import get_logger

# gRPC's blocking calls wait on a condition in slices of MAXIMUM_WAIT_TIMEOUT (0.1 s), only
# so that a main thread blocked in one still sees Ctrl-C. Every answer and cancel()
# notifies the condition, and a call's own timeout still bounds the wait; the agent blocks
# in gRPC from worker threads (the syncer's watch, to_thread calls), and tortiectl's calls
# time out in seconds. With the slice, a watching agent woke 10 times a second for
# nothing: about half of its idle CPU.
grpc._common.MAXIMUM_WAIT_TIMEOUT = 60.0

log = get_logger("datastore")

DEFAULT_PREFIX = "/tortie/"
# gRPC's default reconnect backoff grows to 120 s: a channel that saw etcd gone for a
# while kept failing every call for up to two minutes after etcd was back (issue 12).
# Try again at most a second apart; keepalive pings (etcd accepts one per 5 s) find a
# connection that went silent, such as a watch stream to a host that vanished.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
)
_UNAVAILABLE = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.InternalServerError,
)


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to authenticate: endpoints plus optional TLS client cert."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 5.0
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> EtcdConfig:
        """TORTIE_ETCD_ENDPOINTS (comma separated), TORTIE_ETCD_CA/_CERT/_KEY, TORTIE_ETCD_PREFIX."""
        env = os.environ if env is None else env
        kw: dict = {}
        if env.get("TORTIE_ETCD_ENDPOINTS"):
            kw["endpoints"] = tuple(e.strip() for e in env["TORTIE_ETCD_ENDPOINTS"].split(",") if e.strip())
        for name in ("ca", "cert", "key"):
            if env.get(f"TORTIE_ETCD_{name.upper()}"):
                kw[name] = env[f"TORTIE_ETCD_{name.upper()}"]
        if env.get("TORTIE_ETCD_PREFIX"):
            kw["prefix"] = env["TORTIE_ETCD_PREFIX"]
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(kw.get("endpoints"), str):
            kw["endpoints"] = tuple(e.strip() for e in kw["endpoints"].split(",") if e.strip())
        return cls(**kw)


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0


@dataclass
class Txn:
    """An atomic multi-key write: every guard must hold or nothing is written."""

    guards: list[tuple[str, int]] = field(default_factory=list)  # (key, mod_revision; 0 = absent)
    quiet: list[tuple[str, int]] = field(default_factory=list)  # (prefix, revision): see unchanged_since
    puts: list[tuple[str, bytes]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)

    def guard(self, key: str, mod_revision: int) -> Txn:
        self.guards.append((key, mod_revision))
        return self

    def unchanged_since(self, prefix: str, revision: int) -> Txn:
        """Guard: no key under `prefix` was written after `revision` (a key deleted since
        does not count: it is not there to compare)."""
        self.quiet.append((prefix, revision))
        return self

    def put(self, key: str, value: bytes) -> Txn:
        self.puts.append((key, value))
        return self

    def delete(self, key: str) -> Txn:
        self.deletes.append(key)
        return self


def is_endpoints_failed(exc: BaseException) -> bool:
    """The etcd client's way of saying every endpoint is benched after a failure."""
    return isinstance(exc, ValueError) and "failed node" in str(exc)


def _refused_as_too_large(exc: grpc.RpcError, size: int) -> None:
    """A write etcd refused for its size (over --max-request-bytes, or over gRPC's message
    limit) is the caller's error, said in one line."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in details:
        raise ValidationError(f"etcd refused a write of {size} bytes as too large "
                              "(its default limit is 1.5 MiB a request)") from None


def _parse_endpoint(url: str) -> tuple[str, int, bool]:
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"bad etcd endpoint {url!r} (want http[s]://host:port)", field="etcd-endpoints")
    return parts.hostname, parts.port or 2379, parts.scheme == "https"


class EtcdClient:
    """Synchronous etcd v3 access with tortie's error mapping."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        creds = None
        if config.ca or config.cert or config.key:
            if not config.ca:
                raise ValidationError("a client certificate needs the CA too", field="etcd-ca")
            try:
                creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(config.ca, config.key, config.cert)
            except OSError as exc:
                raise ValidationError(f"cannot read TLS file: {exc}", field="etcd-ca") from exc
        endpoints = []
        for url in config.endpoints:
            host, port, secure = _parse_endpoint(url)
            if secure and creds is None:
                creds = grpc.ssl_channel_credentials()
            endpoints.append((host, port, secure))
        if not endpoints:
            raise ValidationError("no etcd endpoints given", field="etcd-endpoints")
        # The client benches a failed endpoint for time_retry seconds and then refuses every
        # call with a bare ValueError. With one endpoint there is nothing to fail over to,
        # so never bench it: the next call simply tries again.
        retry = 0.0 if len(endpoints) == 1 else 1.0
        endpoints = [
            etcd3.Endpoint(host, port, secure=secure, creds=creds if secure else None, time_retry=retry,
                           opts=list(CHANNEL_OPTIONS))
            for host, port, secure in endpoints
        ]
        self.raw = etcd3.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=config.timeout, failover=len(endpoints) > 1
        )

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- error mapping -------------------------------------------------------------

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise DatastoreUnavailable(
                f"etcd unreachable at {','.join(self.config.endpoints)}: {type(exc).__name__}"
            ) from exc
        except ValueError as exc:
            if not is_endpoints_failed(exc):
                raise
            raise DatastoreUnavailable(
                f"etcd unreachable at {','.join(self.config.endpoints)}: every endpoint failed recently"
            ) from exc
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise DatastoreUnavailable(
                    f"etcd unreachable at {','.join(self.config.endpoints)}: {code.name}"
                ) from exc
            raise

    # --- reads ----------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        value, meta = self._call(self.raw.get, key)
        if value is None:
            return None
        return KV(key, value, meta.mod_revision, meta.create_revision)

    def get_prefix(self, prefix: str, page: int = 500) -> tuple[list[KV], int]:
        """All keys under prefix and the store revision they were read at (for a watch).

        Read in pages at one revision: a single Range reply is capped at gRPC's 4 MB, so a
        page that comes back too large is asked for again in smaller pieces.
        """
        start, end = prefix.encode(), etcd3.utils.prefix_range_end(prefix.encode())
        kvs: list[KV] = []
        revision = 0
        while True:
            req = etcdrpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
            try:
                resp = self._call(self.raw.kvstub.Range, req, self.raw.timeout,
                                  credentials=self.raw.call_credentials, metadata=self.raw.metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or page == 1:
                    raise
                page = max(1, page // 4)
                continue
            revision = revision or resp.header.revision
            kvs.extend(KV(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return kvs, revision
            start = resp.kvs[-1].key + b"\0"

    def revision(self) -> int:
        return self.get_prefix("\0\0nothing")[1]

    def ping(self, timeout: float) -> int:
        """One linearizable read with its own deadline (a frozen etcd or a lost quorum
        answers nothing: DatastoreUnavailable after `timeout`); the store revision."""
        req = etcdrpc.RangeRequest(key=self.config.prefix.encode(), limit=1, keys_only=True)
        resp = self._call(self.raw.kvstub.Range, req, timeout,
                          credentials=self.raw.call_credentials, metadata=self.raw.metadata)
        return resp.header.revision

    # --- writes ---------------------------------------------------------------------

    def put(self, key: str, value: bytes) -> int:
        resp = self._call(self.raw.put, key, value)
        return resp.header.revision

    def delete(self, key: str) -> bool:
        return bool(self._call(self.raw.delete, key))

    def delete_prefix(self, prefix: str) -> int:
        resp = self._call(self.raw.delete_prefix, prefix)
        return resp.deleted

    def transaction(self, txn: Txn) -> tuple[bool, int]:
        """Apply txn atomically; (succeeded, revision after). Failed guards write nothing."""
        compare = []
        for key, rev in txn.guards:
            compare.append(etcdrpc.Compare(
                result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD,
                key=key.encode(), mod_revision=rev,
            ))
        for prefix, rev in txn.quiet:
            compare.append(etcdrpc.Compare(
                result=etcdrpc.Compare.LESS, target=etcdrpc.Compare.MOD, key=prefix.encode(),
                range_end=etcd3.utils.prefix_range_end(prefix.encode()), mod_revision=rev + 1,
            ))
        ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k.encode(), value=v)) for k, v in txn.puts]
        ops += [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=k.encode()))
                for k in txn.deletes]
        req = etcdrpc.TxnRequest(compare=compare, success=ops, failure=[])
        try:
            resp = self._call(self.raw.kvstub.Txn, req, self.raw.timeout,
                              credentials=self.raw.call_credentials, metadata=self.raw.metadata)
        except grpc.RpcError as exc:
            _refused_as_too_large(exc, req.ByteSize())
            raise
        return resp.succeeded, resp.header.revision

    def cas(self, key: str, mod_revision: int, value: bytes | None) -> tuple[bool, int]:
        """Put (or delete, value None) key only if its mod_revision is still mod_revision."""
        txn = Txn().guard(key, mod_revision)
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
        return self.transaction(txn)

    def update(
        self,
        key: str,
        fn: Callable[[KV | None], bytes | None],
        retries: int = 50,
    ) -> bytes | None:
        """Read-modify-write under compare-and-swap, retried on conflict.

        fn gets the current KV (or None) and returns the new value, None to delete,
        or raises to abort (nothing written). Returns what was written.
        """
        for attempt in range(retries):
            cur = self.get(key)
            new = fn(cur)
            if cur is None and new is None:
                return None
            ok, _ = self.cas(key, cur.mod_revision if cur else 0, new)
            if ok:
                return new
            time.sleep(min(0.001 * (2 ** min(attempt, 6)), 0.05))
        raise Conflict(f"gave up on {key} after {retries} conflicting writes")

    def lease(self, ttl: int):
        return self._call(self.raw.lease, ttl)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Unguarded bulk put, in transactions under etcd's limits (128 ops, 1.5 MiB a request)."""
        batch: list[tuple[str, bytes]] = []
        size = 0
        for key, value in items:
            if batch and (len(batch) == 100 or size + len(key) + len(value) > 1_000_000):
                self.transaction(Txn(puts=batch))
                batch, size = [], 0
            batch.append((key, value))
            size += len(key) + len(value)
        if batch:
            self.transaction(Txn(puts=batch))


def connect(config: EtcdConfig | None = None) -> EtcdClient:
    return EtcdClient(config or EtcdConfig.from_env())


__all__: Sequence[str] = ("KV", "EtcdClient", "EtcdConfig", "Txn", "connect")
