"""The etcd adapter: the one place that imports the etcd client.

Thin and synchronous (gRPC underneath); asyncio callers run it in a thread. Every
write that can race goes through `transaction()`, guarded by mod_revisions
(0 means "the key must not exist"), so callers build compare-and-swap on it and
`update()` wraps the read-modify-write loop with bounded retries.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# gRPC's C core writes its own lines to stderr (a refused TLS handshake: a dozen per
# second); the adapter says the same in one line of its own. GRPC_VERBOSITY set by the
# operator still wins. Read when gRPC loads, so before the import.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

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
    """The etcd client's way of saying every endpoint is benched after a failure (kept for
    callers of older versions: tortie's adapter never benches all members any more)."""
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


# Failover between members (issue 12). The library's MultiEndpointEtcd3Client moves to
# another member only when one of its own wrappers (get, put, ...) sees the error, never
# retries, and benches every member that failed recently with a bare ValueError. tortie
# calls the gRPC stubs directly (transactions, paged reads, the watch), so a dead member
# was never left: the agent kept calling it until it came back. The adapter therefore
# picks the member itself: each call goes to the current member; a member that is gone
# (UNAVAILABLE) or holds the call past its share of the deadline (frozen, or without a
# leader) is benched for BENCH seconds and the call goes on to the next one, until the
# call's own deadline. Nothing is refused without trying a member.
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BENCH = 1.0  # seconds a failed member is passed over while another one is there
MIN_ATTEMPT = 0.5  # the least share of a call's deadline one member gets
ROUND_PAUSE = 0.05  # after every member failed once in a row: no busy loop while none answers


@dataclass
class _Member:
    url: str
    endpoint: etcd3.Endpoint  # owns the gRPC channel
    failed_at: float = -1e9
    stubs: dict = field(default_factory=dict)

    def kv(self):
        stub = self.stubs.get("kv")
        if stub is None:
            stub = self.stubs["kv"] = etcdrpc.KVStub(self.endpoint.channel)
        return stub

    def maintenance(self):
        stub = self.stubs.get("maintenance")
        if stub is None:
            stub = self.stubs["maintenance"] = etcdrpc.MaintenanceStub(self.endpoint.channel)
        return stub


def _transient(exc: grpc.RpcError) -> bool:
    """The member is gone or cannot answer now (no leader, an election): try another.
    etcd answers a call whose deadline ran out inside the server with UNKNOWN "context
    deadline exceeded" (seen when a leader died under a forwarded write)."""
    code = exc.code() if hasattr(exc, "code") else None
    if code in _FAILOVER_CODES:
        return True
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.UNKNOWN and "context deadline exceeded" in details


def _details(exc: grpc.RpcError) -> str:
    return " ".join(((exc.details() if hasattr(exc, "details") else "") or "").split())


def _refused(exc: grpc.RpcError) -> bool:
    """The member refused the connection itself (a TLS handshake, or a TLS server closing
    a plaintext one): trying it again within the same call cannot help."""
    d = _details(exc).lower()
    return "failed to connect" in d and any(
        s in d for s in ("handshake", "unwrap failed", "tsi_", "ssl", "socket closed"))


class EtcdClient:
    """Synchronous etcd v3 access with tortie's error mapping and failover between members."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        creds = None
        if config.ca or config.cert or config.key:
            if not config.ca:
                raise ValidationError("a client certificate needs the CA too", field="etcd-ca")
            if bool(config.cert) != bool(config.key):
                raise ValidationError("a client certificate needs its key and the key its certificate",
                                      field="etcd-cert" if not config.cert else "etcd-key")
            try:
                creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(config.ca, config.key, config.cert)
            except OSError as exc:
                raise ValidationError(f"cannot read TLS file: {exc}", field="etcd-ca") from exc
        parsed = []
        for url in config.endpoints:
            host, port, secure = _parse_endpoint(url)
            if secure and creds is None:
                creds = grpc.ssl_channel_credentials()
            parsed.append((url, host, port, secure))
        if not parsed:
            raise ValidationError("no etcd endpoints given", field="etcd-endpoints")
        # time_retry 0: the library never benches a member; the adapter does (see above).
        # An IPv6 host goes in brackets: the library joins host and port as they are.
        self._members = [
            _Member(url, etcd3.Endpoint(f"[{host}]" if ":" in host else host, port, secure=secure, creds=creds if secure else None,
                                        time_retry=0.0, opts=list(CHANNEL_OPTIONS)))
            for url, host, port, secure in parsed
        ]
        self._lock = threading.Lock()
        # Start on a random member, so that many agents spread over the cluster.
        self._current = random.randrange(len(self._members))
        self.raw = etcd3.MultiEndpointEtcd3Client(
            endpoints=[m.endpoint for m in self._members], timeout=config.timeout, failover=len(parsed) > 1
        )
        self._follow()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- members ---------------------------------------------------------------------

    @property
    def member(self) -> str:
        """The endpoint calls go to now."""
        return self._members[self._current].url

    def _follow(self) -> None:
        """The library's own calls (leases) go to the member the adapter uses."""
        self.raw._current_endpoint_label = self._members[self._current].endpoint.netloc

    def _pick(self) -> _Member:
        with self._lock:
            now = time.monotonic()
            n = len(self._members)
            for step in range(n):
                m = self._members[(self._current + step) % n]
                if now - m.failed_at >= BENCH:
                    break
            else:  # all benched: the one benched longest ago
                m = min(self._members, key=lambda x: x.failed_at)
            i = self._members.index(m)
            if i != self._current:
                self._current = i
                self._follow()
                log.debug("etcd member in use", endpoint=m.url)
            return m

    def failed(self, which: grpc.Channel | str | None = None) -> None:
        """A call found a member gone (None: the current one; else its channel or URL):
        bench it, so the next call goes to another member. The syncer calls this for its
        watch stream."""
        if len(self._members) == 1:
            return
        with self._lock:
            for i, m in enumerate(self._members):
                if (which is None and i == self._current) or which in (m.endpoint.channel, m.url):
                    fresh = time.monotonic() - m.failed_at >= BENCH
                    m.failed_at = time.monotonic()
                    if fresh:
                        log.info("etcd member failed; trying another", endpoint=m.url)
                    return

    def channel(self) -> grpc.Channel:
        """The channel of the member to use now (for streams: the syncer's watch)."""
        return self._pick().endpoint.channel

    # --- error mapping -------------------------------------------------------------

    def _unavailable(self, why: str | grpc.RpcError) -> DatastoreUnavailable:
        if isinstance(why, grpc.RpcError):
            why = self._why(why)
        return DatastoreUnavailable(f"etcd unreachable at {','.join(self.config.endpoints)}: {why}")

    def _why(self, exc: grpc.RpcError) -> str:
        """The gRPC status and, for a refused connection, what to check, in one line."""
        code = exc.code() if hasattr(exc, "code") else None
        name = code.name if code is not None else type(exc).__name__
        low = _details(exc).lower()
        secure = any(url.startswith("https") for url in self.config.endpoints)
        if "certificate_verify_failed" in low:
            return f"{name}: etcd's certificate is not signed by the CA given (--etcd-ca, TORTIE_ETCD_CA)"
        if _refused(exc) and secure and not self.config.cert:
            return (f"{name}: etcd refused the TLS connection; no client certificate was given "
                    "(--etcd-cert/--etcd-key, TORTIE_ETCD_CERT/_KEY)")
        if _refused(exc) and not secure:
            return f"{name}: etcd closed the connection; does it want TLS (https:// endpoints and a CA)?"
        if _refused(exc):
            return f"{name}: etcd refused the TLS connection (is the client certificate signed by its CA?)"
        if code == grpc.StatusCode.UNKNOWN and low:
            return f"{name}: {low[:120]}"
        return name

    def _call(self, fn: Callable, *args, **kwargs):
        """A call through the library (leases): its errors mapped, no failover."""
        try:
            return fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            self.failed()
            raise self._unavailable(type(exc).__name__) from exc
        except ValueError as exc:
            if not is_endpoints_failed(exc):
                raise
            raise self._unavailable("every endpoint failed recently") from exc
        except grpc.RpcError as exc:
            if _transient(exc):
                raise self._unavailable(exc) from exc
            raise

    def rpc(self, method: str, req, timeout: float | None = None, *, stub: str = "kv") -> tuple[object, bool]:
        """One unary call with failover: (reply, whether an earlier attempt failed on the
        way, so that a write may have been applied by it)."""
        budget = self.config.timeout if timeout is None else timeout
        if len(self._members) == 1:  # nothing to fail over to: as fast as a plain call
            m = self._members[0]
            try:
                return getattr(getattr(m, stub)(), method)(req, budget, metadata=self.raw.metadata), False
            except grpc.RpcError as exc:
                if _transient(exc) or exc.code() == grpc.StatusCode.INTERNAL:
                    raise self._unavailable(exc) from exc
                raise
        deadline = time.monotonic() + budget
        share = max(budget / len(self._members), MIN_ATTEMPT)
        failures = 0
        refused: set[str] = set()
        while True:
            m = self._pick()
            left = deadline - time.monotonic()
            try:
                reply = getattr(getattr(m, stub)(), method)(req, min(left, share), metadata=self.raw.metadata)
                return reply, failures > 0
            except grpc.RpcError as exc:
                if not _transient(exc):
                    if exc.code() == grpc.StatusCode.INTERNAL:
                        raise self._unavailable(exc) from exc
                    raise
                self.failed(m.url)
                failures += 1
                if _refused(exc):
                    refused.add(m.url)
                left = deadline - time.monotonic()
                if left <= 0.01 or len(refused) == len(self._members):
                    raise self._unavailable(exc) from exc
                if failures % len(self._members) == 0:
                    time.sleep(min(ROUND_PAUSE, left))

    def member_status(self, timeout: float = 1.0) -> list[dict]:
        """Each member's own word: {endpoint, id, leader, term, error} (for the lab's status)."""
        out = []
        for m in self._members:
            try:
                r = m.maintenance().Status(etcdrpc.StatusRequest(), timeout, metadata=self.raw.metadata)
                out.append({"endpoint": m.url, "id": f"{r.header.member_id:x}", "leader": f"{r.leader:x}",
                            "term": r.raftTerm, "error": None})
            except grpc.RpcError as exc:
                out.append({"endpoint": m.url, "id": None, "leader": None, "term": None, "error": self._why(exc)})
        return out

    # --- reads ----------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        resp, _ = self.rpc("Range", etcdrpc.RangeRequest(key=key.encode()))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(key, kv.value, kv.mod_revision, kv.create_revision)

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
                resp, _ = self.rpc("Range", req)
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
        resp, _ = self.rpc("Range", req, timeout)
        return resp.header.revision

    # --- writes ---------------------------------------------------------------------

    # Unguarded puts and deletes are idempotent: a retry on another member after an
    # attempt that may have been applied changes nothing.

    def put(self, key: str, value: bytes | str) -> int:
        value = value.encode() if isinstance(value, str) else value
        resp, _ = self.rpc("Put", etcdrpc.PutRequest(key=key.encode(), value=value))
        return resp.header.revision

    def delete(self, key: str) -> bool:
        resp, _ = self.rpc("DeleteRange", etcdrpc.DeleteRangeRequest(key=key.encode()))
        return resp.deleted > 0

    def delete_prefix(self, prefix: str) -> int:
        req = etcdrpc.DeleteRangeRequest(key=prefix.encode(), range_end=etcd3.utils.prefix_range_end(prefix.encode()))
        resp, _ = self.rpc("DeleteRange", req)
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
            resp, retried = self.rpc("Txn", req)
        except grpc.RpcError as exc:
            _refused_as_too_large(exc, req.ByteSize())
            raise
        if retried and not resp.succeeded and (txn.puts or txn.deletes) and (txn.guards or txn.quiet):
            # An attempt that failed on the way (its member died, or it timed out waiting
            # for an election) may have been applied all the same; then the retry finds its
            # own write and fails the guards. Read back: our exact values in place (and the
            # deleted keys gone) mean the first attempt landed.
            landed = self._landed(txn)
            if landed:
                log.info("a transaction retried after a failed member had been applied", revision=landed)
                return True, landed
        return resp.succeeded, resp.header.revision

    def _landed(self, txn: Txn) -> int:
        """The revision that holds every write of txn, or 0."""
        revision = 0
        for key, value in txn.puts:
            kv = self.get(key)
            if kv is None or kv.value != value:
                return 0
            revision = max(revision, kv.mod_revision)
        if any(self.get(key) is not None for key in txn.deletes):
            return 0
        return revision or self.revision()

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
