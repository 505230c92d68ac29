"""Leader election for tortie-controller replicas through a coordination.k8s.io/v1 Lease.

client-go's semantics (tools/leaderelection): the Lease's spec is the record
(holderIdentity, leaseDurationSeconds, acquireTime, renewTime, leaseTransitions); every
change is a PUT carrying the resourceVersion that was read, so of two replicas racing for
it one gets 409 Conflict and knows the other won. A candidate never trusts the holder's
clock: it times a lease from when it saw the record change, and takes it over once
`leaseDurationSeconds` pass without a change. The holder renews every retry period.

Fail closed: the holder counts itself leader only until `renew deadline` after the start
of its last successful renewal (monotonic clock), and a 409, or a record naming someone
else, ends its term at once. `is_leader()` reads that deadline at every call, so a
holder that is paused, partitioned or slow stops writing on its own, before any other
replica can take over. Why that is enough: a candidate that sees the record change at t
starts the lease at no earlier than t - (leaseDuration - renewDeadline), so it can take
over at t + renewDeadline at the earliest, after the holder's deadline (the renewal
started before t). It also starts the lease no later than the moment of its previous look
that still saw the old record; polling every retry period (< leaseDuration -
renewDeadline, as the defaults are), that is before the holder's last renewal, so a
holder that dies is replaced within leaseDuration of its death. Replicas must share the
durations (one Deployment).

On a clean stop the holder releases the Lease (holder cleared, duration 1 s) so a standby
takes over at once, as client-go's ReleaseOnCancel does.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s

from tortie.errors import ValidationError
from tortie.log import get_logger

log = get_logger("leader-election")

JITTER_FACTOR = 1.2  # client-go's: the renew deadline must exceed 1.2 retry periods
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def default_identity(env: Mapping[str, str] | None = None) -> str:
    """The pod's name (HOSTNAME) plus a random suffix: a restarted replica is a new
    candidate, never mistaken for its former self still holding the lease."""
    env = os.environ if env is None else env
    return f"{env.get('HOSTNAME') or socket.gethostname()}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaderElectionConfig:
    enabled: bool = True
    name: str = "tortie-controller"
    namespace: str = "kube-system"
    lease_duration: float = 15.0  # kube-controller-manager's defaults: 15 s / 10 s / 2 s
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = ""  # empty: default_identity()

    def __post_init__(self) -> None:
        env = SETTING
        if not _DNS_SUBDOMAIN.match(self.name):
            raise ValidationError(f"{self.name!r} is not a valid Lease name", field=env["name"])
        if not _DNS_LABEL.match(self.namespace):
            raise ValidationError(f"{self.namespace!r} is not a valid namespace", field=env["namespace"])
        if self.lease_duration < 1 or float(self.lease_duration) != int(self.lease_duration):
            raise ValidationError(f"{self.lease_duration} must be a whole number of seconds, at least 1 "
                                  "(Lease.spec.leaseDurationSeconds)", field=env["lease_duration"])
        if not 0 < self.renew_deadline < self.lease_duration:
            raise ValidationError(f"{self.renew_deadline} must be more than 0 and less than the lease "
                                  f"duration ({self.lease_duration:g})", field=env["renew_deadline"])
        if not 0 < self.retry_period * JITTER_FACTOR < self.renew_deadline:
            raise ValidationError(f"{self.retry_period} must be more than 0 and less than the renew deadline "
                                  f"/ {JITTER_FACTOR} ({self.renew_deadline / JITTER_FACTOR:g})",
                                  field=env["retry_period"])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LeaderElectionConfig:
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for key, (var, _) in _NAMES.items():
            text = env.get(var)
            if text:
                kw[key] = _parse(key, var, text)
        for key, value in overrides.items():  # command-line flags: as text, or already typed
            if value is not None:
                kw[key] = _parse(key, _NAMES[key][1], value) if isinstance(value, str) else value
        return cls(**kw)

    @property
    def lease(self) -> str:
        return f"{self.namespace}/{self.name}"


# Each setting's environment variable and command-line flag (kube-controller-manager's names).
_NAMES = {"enabled": ("TORTIE_CONTROLLER_LEADER_ELECT", "--leader-elect"),
          "name": ("TORTIE_CONTROLLER_LEASE_NAME", "--leader-elect-resource-name"),
          "namespace": ("TORTIE_CONTROLLER_LEASE_NAMESPACE", "--leader-elect-resource-namespace"),
          "lease_duration": ("TORTIE_CONTROLLER_LEASE_DURATION", "--leader-elect-lease-duration"),
          "renew_deadline": ("TORTIE_CONTROLLER_RENEW_DEADLINE", "--leader-elect-renew-deadline"),
          "retry_period": ("TORTIE_CONTROLLER_RETRY_PERIOD", "--leader-elect-retry-period")}
SETTING = {key: f"{var} ({flag})" for key, (var, flag) in _NAMES.items()}  # names errors point at


def _parse(key: str, var: str, text: str) -> Any:
    if key == "enabled":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValidationError(f"{text!r} is not true or false", field=var)
    if key in ("name", "namespace"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValidationError(f"{text!r} is not a number of seconds", field=var) from None


def _micro_time(t: float) -> str:
    """metav1.MicroTime (RFC 3339 with six fraction digits). The client re-renders it with
    isoformat(), which drops the fraction of a whole second that the server's parser
    wants: never send one."""
    when = datetime.fromtimestamp(t, UTC)
    if when.microsecond == 0:
        when = when.replace(microsecond=1)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Runs the election in a thread of its own; `is_leader()` from any thread.

    `on_change(leading, reason)` is called from the election thread on every change of role.
    """

    def __init__(self, config: LeaderElectionConfig, api: k8s.ApiClient, *,
                 on_change: Callable[[bool, str], None] | None = None,
                 on_round: Callable[[str | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self.coord = k8s.CoordinationV1Api(api)
        self.on_change = on_change
        self.on_round = on_round  # None after a round the API answered, else the error
        self.clock = clock
        self.decided = threading.Event()  # the first round is over: the role is known
        self.holder = ""  # the holder as last seen ("" none)
        self.transitions = 0  # the Lease's leaseTransitions as last seen
        self._lock = threading.Lock()
        self._leading = False
        self._valid_until = 0.0  # monotonic: leading ends here unless renewed
        self._current: dict | None = None  # the Lease as last read or written
        self._seen_rv: str | None = None
        self._expires = 0.0  # monotonic: the holder's lease as we time it
        self._last_look: float | None = None  # when our latest answered GET was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader election", daemon=True)

    # --- the role -------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True only while this replica holds the Lease and its renew deadline has not
        passed: checked before every datastore write."""
        with self._lock:
            return self._leading and self.clock() < self._valid_until

    def _lead(self, valid_until: float) -> None:
        with self._lock:
            was = self._leading
            self._leading, self._valid_until = True, valid_until
        if not was:
            log.info("started leading", identity=self.identity, lease=self.config.lease,
                     transitions=self.transitions)
            if self.on_change is not None:
                self.on_change(True, "acquired")

    def _step_down(self, reason: str) -> None:
        with self._lock:
            was = self._leading
            self._leading, self._valid_until = False, 0.0
        if was:
            log.warning("stopped leading", identity=self.identity, lease=self.config.lease, reason=reason)
            if self.on_change is not None:
                self.on_change(False, reason)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        log.info("leader election starting", identity=self.identity, lease=self.config.lease,
                 lease_duration=self.config.lease_duration, renew_deadline=self.config.renew_deadline,
                 retry_period=self.config.retry_period)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """End the election; with release, give the Lease up if held (call only once this
        replica has stopped writing)."""
        self._stop.set()
        self._thread.join(self.config.renew_deadline + 5)
        if release and self.is_leader():
            self._step_down("stopping")
            self._release()
        else:
            self._step_down("stopping")

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            error = None
            try:
                self._round(started)
            except Exception as exc:  # API unreachable or refusing: keep trying; the deadline guards
                error = f"{type(exc).__name__}: {_brief(exc)}"
                log.warning("leader election round failed", identity=self.identity, lease=self.config.lease,
                            error=error, leading=self.is_leader())
            if self._leading and not self.is_leader():
                self._step_down("renew deadline passed")
            self.decided.set()
            if self.on_round is not None:
                self.on_round(error)
            wake = started + self.config.retry_period
            if not self._leading and self.holder and self._expires > self.clock():
                wake = min(wake, self._expires)  # try the moment the holder's lease runs out
            self._stop.wait(max(0.0, wake - self.clock()))

    # --- one round: client-go's tryAcquireOrRenew ----------------------------------------------

    def _timeout(self) -> float:
        """A request never outlives the renew deadline (the holder's: what is left of it)."""
        if self.is_leader():
            return max(0.05, min(self.config.renew_deadline, self._valid_until - self.clock()))
        return self.config.renew_deadline

    def _round(self, started: float) -> None:
        cfg = self.config
        if self._current is not None and self.holder not in ("", self.identity) and self.clock() >= self._expires:
            # The holder's lease ran out as we time it: claim it with the version we saw,
            # without another look first (a renewal since then makes this a 409).
            self._write(started, self._current, self._taken_over(self._current.get("spec") or {}))
            return
        try:
            resp = self.coord.read_namespaced_lease(cfg.name, cfg.namespace, _preload_content=False,
                                                    _request_timeout=self._timeout())
            current = json.loads(resp.data)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        seen = self.clock()
        self._current = current
        if current is None:
            now = _micro_time(time.time())
            self._write(started, None, {"holderIdentity": self.identity, "leaseDurationSeconds": int(cfg.lease_duration),
                                        "acquireTime": now, "renewTime": now, "leaseTransitions": 0})
            return
        spec = current.get("spec") or {}
        rv = current["metadata"]["resourceVersion"]
        duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
        if rv != self._seen_rv:
            # Changed since our last look, so written after that look was sent; and at the
            # latest when this answer came, so the holder's renewal began before it.
            base = seen if self._last_look is None else max(self._last_look, seen - max(0.0, duration - cfg.renew_deadline))
            self._seen_rv, self._expires = rv, base + duration
        self._last_look = started
        holder = spec.get("holderIdentity") or ""
        self.transitions = int(spec.get("leaseTransitions") or 0)
        if holder != self.holder:
            log.info("new leader observed", identity=self.identity, leader=holder or None, lease=cfg.lease)
            self.holder = holder
        now = time.time()
        if holder == self.identity:  # ours: renew, keeping when and how often it changed hands
            new = {**spec, "renewTime": _micro_time(now), "leaseDurationSeconds": int(cfg.lease_duration)}
        elif holder and self.clock() < self._expires:
            self._step_down(f"the lease is held by {holder}")
            return
        else:  # free, released or expired: take it over
            new = self._taken_over(spec)
        self._write(started, current, new)

    def _taken_over(self, spec: dict) -> dict:
        now = _micro_time(time.time())
        new = {**spec, "holderIdentity": self.identity, "leaseDurationSeconds": int(self.config.lease_duration),
               "acquireTime": now, "renewTime": now, "leaseTransitions": int(spec.get("leaseTransitions") or 0) + 1}
        new.pop("preferredHolder", None)  # coordinated election's fields: not ours to keep
        new.pop("strategy", None)
        return new

    def _write(self, started: float, current: dict | None, spec: dict) -> None:
        cfg = self.config
        meta = {"name": cfg.name, "namespace": cfg.namespace}
        if current is not None:
            meta = {**current["metadata"], **meta}  # keeps resourceVersion: the optimistic lock
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
        try:
            if current is None:
                resp = self.coord.create_namespaced_lease(cfg.namespace, body, _preload_content=False,
                                                          _request_timeout=self._timeout())
            else:
                resp = self.coord.replace_namespaced_lease(cfg.name, cfg.namespace, body, _preload_content=False,
                                                           _request_timeout=self._timeout())
        except k8s.ApiException as exc:
            if exc.status == 409:  # someone else wrote first: they won
                self._step_down("lost the lease (409 Conflict)")
                self._seen_rv = self._current = None  # look again, and time the winner's lease from then
                return
            raise
        stored = json.loads(resp.data)
        self._current, self._seen_rv = stored, stored["metadata"]["resourceVersion"]
        self.holder, self.transitions = self.identity, int(spec.get("leaseTransitions") or 0)
        self._lead(started + cfg.renew_deadline)

    def _release(self) -> None:
        cfg = self.config
        try:
            resp = self.coord.read_namespaced_lease(cfg.name, cfg.namespace, _preload_content=False,
                                                    _request_timeout=cfg.renew_deadline)
            current = json.loads(resp.data)
            spec = current.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            now = _micro_time(time.time())
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": current["metadata"],
                    "spec": {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": now,
                             "renewTime": now}}
            self.coord.replace_namespaced_lease(cfg.name, cfg.namespace, body, _preload_content=False,
                                                _request_timeout=cfg.renew_deadline)
            log.info("lease released", identity=self.identity, lease=cfg.lease)
        except Exception as exc:  # the others take over when it expires
            log.warning("could not release the lease", identity=self.identity, lease=cfg.lease,
                        error=f"{type(exc).__name__}: {_brief(exc)}")


def _brief(exc: BaseException) -> str:
    if isinstance(exc, k8s.ApiException):
        return f"{exc.status} {exc.reason}"
    return str(exc)[:200]


__all__ = ["LeaderElectionConfig", "LeaderElector", "default_identity"]
