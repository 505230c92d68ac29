"""tortie-controller: Kubernetes -> datastore mirroring and IPAM garbage collection.

One reflector thread per Kubernetes kind (Nodes, Namespaces, NetworkPolicies, Services,
EndpointSlices, Pods; `reflector.py`)
lists, then watches from the list's resourceVersion, and hands raw objects to the main
loop through one queue. A dropped stream is re-watched from the last resourceVersion
seen; `410 Gone` (history compacted) means a fresh list. A datastore Syncer thread does
the same for WorkloadEndpoints, which the CNI server creates and the controller labels
and gives the pod's named container ports.

The main loop is level-triggered: events only update the in-memory view of Kubernetes
and mark keys dirty; `_reconcile` (`reconcile.py`) then computes each dirty key's desired datastore
state (`mirror.py`), compares it with what is stored and writes only the difference,
each write a compare-and-swap on the revision it read. A failed write leaves the key
dirty for a retry. A full list of a kind also scans the datastore for copies of that
kind the controller once wrote and Kubernetes no longer has. A slow timer repeats
that scan (drift repair); another runs the IPAM garbage collector (`gc.py`).

Replicas elect a leader through a Lease (`leader.py`); every replica lists, watches and
keeps its view current (a hot standby), but only the leader writes: the datastore store
and IPAM are wrapped in a fence (`fence.py`) that refuses each write unless this replica leads at that
moment (fail closed: a replica that lost the Lease, or could not renew it before its
renew deadline, writes nothing more, even in the middle of a pass). A new leader starts
by comparing everything with the datastore.

Environment: TORTIE_ETCD_* (the datastore); TORTIE_K8S_API (a plain http URL, for
tests), else KUBECONFIG, else the in-cluster service account; TORTIE_CONTROLLER_RESYNC,
TORTIE_CONTROLLER_GC_INTERVAL and TORTIE_CONTROLLER_GC_GRACE in seconds;
TORTIE_CONTROLLER_HEALTH=host:port serves /liveness and /readiness (ready once in sync;
the body says whether this replica leads) and /metrics; TORTIE_CONTROLLER_LEADER_ELECT,
TORTIE_CONTROLLER_LEASE_NAME / _NAMESPACE, TORTIE_CONTROLLER_LEASE_DURATION,
TORTIE_CONTROLLER_RENEW_DEADLINE and TORTIE_CONTROLLER_RETRY_PERIOD (`leader.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client as k8s

from tortie.datastore import resources as res
from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.ipam import IPAM
from tortie.datastore.store import ResourceStore
from tortie.datastore.watch import Snapshot, Syncer, Update
from tortie.errors import TortieError, ValidationError
from tortie.health import Health
from tortie.kube import mirror
from tortie.kube.fence import IPAM_WRITES, STORE_WRITES, Fenced
from tortie.kube.gc import IPAMGarbageCollector
from tortie.kube.lb_assign import LoadBalancerAssigner
from tortie.kube.leader import LeaderElectionConfig, LeaderElector
from tortie.kube.podinfo import api_client
from tortie.kube.reconcile import KINDS, MIRRORED, ControllerReconcile
from tortie.kube.reflector import Changed, Listed, Reflector, Resync, WepChange
from tortie.log import get_logger
from tortie.metrics import Registry

log = get_logger("controller")


@dataclass(frozen=True)
class ControllerConfig:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    k8s_api: str | None = None  # plain http(s) URL without auth; else kubeconfig / in-cluster
    kubeconfig: str | None = None
    resync_interval: float = 300.0  # full datastore scan (drift repair)
    gc_interval: float = 300.0  # IPAM leak check
    gc_grace: float = 300.0  # a leaked pod address is released after this long
    watch_timeout: int = 300  # server-side watch timeout; the stream is renewed after it
    retry_interval: float = 1.0
    health: str | None = None  # "host:port" for /liveness, /readiness and /metrics; None: not served
    leader: LeaderElectionConfig = field(default_factory=LeaderElectionConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ControllerConfig:
        env = os.environ if env is None else env
        kw: dict[str, Any] = {"etcd": EtcdConfig.from_env(dict(env)),
                              "k8s_api": env.get("TORTIE_K8S_API") or None,
                              "kubeconfig": env.get("KUBECONFIG") or None,
                              "health": env.get("TORTIE_CONTROLLER_HEALTH") or None}
        if "leader" not in overrides:
            kw["leader"] = LeaderElectionConfig.from_env(env)
        for name, var in (("resync_interval", "TORTIE_CONTROLLER_RESYNC"),
                          ("gc_interval", "TORTIE_CONTROLLER_GC_INTERVAL"),
                          ("gc_grace", "TORTIE_CONTROLLER_GC_GRACE")):
            if env.get(var):
                try:
                    kw[name] = float(env[var])
                except ValueError:
                    raise ValidationError(f"{env[var]!r} is not a number of seconds", field=var) from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def kube_api_client(config: ControllerConfig) -> k8s.ApiClient:
    """An ApiClient from TORTIE_K8S_API, else the kubeconfig, else in-cluster config."""
    return api_client(config.k8s_api, config.kubeconfig)


def _what(args: tuple) -> str:
    """A short name for what a write touches, for the debug log."""
    first = args[0] if args else None
    if isinstance(first, Mapping):
        meta = first.get("metadata") or {}
        return "/".join(filter(None, (str(first.get("kind") or ""), meta.get("namespace"), meta.get("name"))))
    return "/".join(str(a) for a in args[:3] if isinstance(a, str))


# --- the controller ----------------------------------------------------------------------


@dataclass(frozen=True)
class WepInfo:
    namespace: str
    name: str
    pod: str
    labels: Mapping[str, str]
    ports: tuple[dict, ...] = ()  # `mirror.wep_ports`


class Controller(ControllerReconcile):
    def __init__(self, config: ControllerConfig, *, etcd: EtcdClient | None = None,
                 api: k8s.ApiClient | None = None) -> None:
        self.config = config
        self.etcd = etcd or EtcdClient(config.etcd)
        self._own_etcd = etcd is None
        self.api = api or kube_api_client(config)
        self.queue: queue.Queue = queue.Queue()
        self.health = Health()
        self.health.register("loop", deadline=30.0)
        self.health.register("datastore", deadline=max(120.0, 4 * config.retry_interval))
        self.metrics = Registry()
        self._m_writes = self.metrics.counter("tortie_controller_datastore_writes_total",
                                              "datastore writes this replica made, by operation")
        self._m_refused = self.metrics.counter("tortie_controller_writes_refused_total",
                                               "datastore writes refused because this replica did not lead")
        self._m_leader = self.metrics.gauge("tortie_controller_leader",
                                            "1 while this replica holds the lease and may write, else 0")
        for op in sorted(STORE_WRITES | IPAM_WRITES):  # every series exists before the first scrape,
            self._m_writes.inc(0, op=op)                # so the loop never adds one while it renders
        self._m_refused.inc(0)
        self.elector: LeaderElector | None = None
        if config.leader.enabled:
            self.health.register("leader-election", deadline=config.watch_timeout + 60.0)
            self.elector = LeaderElector(config.leader, self.api, on_round=self._on_election_round)
        self.metrics.collectors.append(
            lambda: self._m_leader.set(1 if self.leading() else 0, identity=self.identity))
        self.store = Fenced(ResourceStore(self.etcd), STORE_WRITES, self.leading, self._wrote)
        self.gc = IPAMGarbageCollector(Fenced(IPAM(self.etcd), IPAM_WRITES, self.leading, self._wrote),
                                       config.gc_grace)
        self._health_server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self.synced = threading.Event()  # every kind listed and reconciled once
        core, net = k8s.CoreV1Api(self.api), k8s.NetworkingV1Api(self.api)
        list_fns = {"Node": core.list_node, "Namespace": core.list_namespace,
                    "NetworkPolicy": net.list_network_policy_for_all_namespaces,
                    "Service": core.list_service_for_all_namespaces,
                    "EndpointSlice": k8s.DiscoveryV1Api(self.api).list_endpoint_slice_for_all_namespaces,
                    "Pod": core.list_pod_for_all_namespaces}
        self.lb = LoadBalancerAssigner(core)  # Services' load-balancer addresses (leader only)
        self.reflectors = {kind: Reflector(kind, list_fns[kind], self.queue, watch_timeout=config.watch_timeout,
                                           retry_interval=config.retry_interval, health=self.health)
                           for kind in KINDS}
        self._wep_prefix = self.etcd.config.prefix + res.kind_for("workloadendpoint").prefix()
        self._wep_syncer = Syncer(self.etcd, self._wep_prefix)
        # Kubernetes as last heard: raw objects (mirrored kinds), labels (nodes), pods.
        self.objects: dict[str, dict[tuple[str | None, str], dict]] = {k: {} for k in MIRRORED}
        self.nodes: dict[str, dict[str, str]] = {}
        self.pods: dict[tuple[str, str], mirror.PodInfo] = {}
        self.listed: set[str] = set()
        self.weps: dict[str, WepInfo] = {}  # full etcd key -> endpoint
        self.weps_by_pod: dict[tuple[str, str], set[str]] = {}
        self.weps_synced = False
        self.dirty: dict[str, set] = {k: set() for k in KINDS}
        self.scan: set[str] = set()  # kinds whose datastore copies to check for stale ones
        self.writes = 0
        self.resyncs = 0  # completed passes that compared every kind with the datastore
        self.gc_rounds = 0

    # --- leadership -----------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self.elector.identity if self.elector is not None else "leader-election-disabled"

    def leading(self) -> bool:
        """May this replica write now? Always, without leader election."""
        return self.elector is None or self.elector.is_leader()

    def _wrote(self, method: str, args: tuple) -> None:
        self._m_writes.inc(op=method)
        log.debug("datastore write", op=method, target=_what(args), identity=self.identity)

    def _on_election_round(self, error: str | None) -> None:
        if error is None:
            self.health.ok("leader-election")
        else:
            self.health.failed("leader-election", error)

    def leader_status(self) -> dict:
        if self.elector is None:
            return {"enabled": False, "leading": True}
        return {"enabled": True, "identity": self.identity, "leading": self.leading(),
                "holder": self.elector.holder or None, "lease": self.config.leader.lease}

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to return; safe from a signal handler or another thread."""
        self._stop.set()

    def request_resync(self) -> None:
        """Compare all mirrored state with the datastore on the next pass (any thread)."""
        self.queue.put(Resync())

    def run(self) -> None:
        log.info("controller starting", etcd=",".join(self.etcd.config.endpoints), prefix=self.etcd.config.prefix,
                 kubernetes=self.api.configuration.host)
        if self.config.health:
            self._serve_health(self.config.health)
        if self.elector is not None:
            self.elector.start()
        for r in self.reflectors.values():
            r.start()
        wep_thread = threading.Thread(target=self._pump_weps, name="wep syncer", daemon=True)
        wep_thread.start()
        now = time.monotonic()
        next_resync, next_gc, retry_at = now + self.config.resync_interval, now, None
        was_leading = False
        try:
            while not self._stop.is_set():
                self._drain(timeout=0.2)
                self.health.ok("loop")
                now = time.monotonic()
                leading = self.leading()
                if leading and not was_leading:
                    # A new term: whatever the last leader did or left undone, compare it all.
                    log.info("writing as leader", identity=self.identity)
                    self.scan |= set(KINDS)
                    next_gc, retry_at = now, None
                    self.gc.forget()  # leaks seen in an earlier term may have come and gone since
                elif was_leading and not leading:
                    log.warning("not leading: writes stop", identity=self.identity,
                                holder=self.elector.holder if self.elector else None)
                was_leading = leading
                if now >= next_resync:
                    self.scan |= set(KINDS)
                    next_resync = now + self.config.resync_interval
                if not leading:
                    self.health.ok("datastore")  # a standby writes nothing, so no write can be failing
                elif retry_at is None or now >= retry_at:
                    scanning = bool(self.scan)
                    retry_at = None if self._reconcile() else now + self.config.retry_interval
                    if retry_at is None:
                        self.health.ok("datastore")
                    if scanning and not self.scan and retry_at is None:
                        self.resyncs += 1
                if leading and "Service" in self.listed:
                    self.lb.assign(self.objects["Service"], lambda: self.store.list("IPPool"))
                # In sync: the leader once its first pass wrote the difference; a standby
                # once its view is complete and it knows it does not lead.
                decided = self.elector is None or self.elector.decided.is_set()
                if self._ready() and decided and retry_at is None and not self.synced.is_set() \
                        and leading == self.leading():
                    self.synced.set()
                    self.health.ready = True
                    log.info("in sync", leading=leading, nodes=len(self.nodes), pods=len(self.pods),
                             endpoints=len(self.weps), **{k.lower() + "s": len(v) for k, v in self.objects.items()})
                if leading and self._ready() and now >= next_gc:
                    self._collect()
                    next_gc = now + self.config.gc_interval
        finally:
            if self.elector is not None:  # the loop has ended: no write after this, so hand over
                self.elector.stop(release=True)
            for r in self.reflectors.values():
                r.stop()
            self._wep_syncer.stop()
            for r in self.reflectors.values():
                r.join()
            wep_thread.join(5)
            if self._health_server is not None:
                self._health_server.shutdown()
                self._health_server.server_close()
            if self._own_etcd:
                self.etcd.close()
            log.info("controller stopped")

    @property
    def health_port(self) -> int | None:
        return self._health_server.server_address[1] if self._health_server else None

    def _serve_health(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        health, controller = self.health, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    code, ctype, body = 200, "text/plain; version=0.0.4", controller.metrics.render().encode()
                else:
                    live, ready, detail = health.report()
                    ok = {"/liveness": live, "/readiness": ready}.get(path)
                    body = json.dumps({"ok": ok, "ready": ready, "leader": controller.leader_status(),
                                       "components": detail}).encode() + b"\n"
                    code, ctype = (404 if ok is None else 200 if ok else 503), "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass

        try:
            server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot serve health on {listen!r}: {exc}", field="TORTIE_CONTROLLER_HEALTH") from exc
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="health",
                         daemon=True).start()
        self._health_server = server
        log.info("health served", listen=f"{host or '0.0.0.0'}:{server.server_address[1]}")

    def _ready(self) -> bool:
        return self.listed >= set(KINDS) and self.weps_synced

    def _pump_weps(self) -> None:
        """Forward the endpoint syncer's events; should the syncer itself die (an error it
        does not retry), start a fresh one, whose first event is a full snapshot."""
        while True:
            for event in self._wep_syncer.iter_events():
                self.queue.put(WepChange(event))
            if self._stop.wait(self.config.retry_interval):
                return
            log.warning("workload endpoint syncer ended; starting a new one")
            self._wep_syncer = Syncer(self.etcd, self._wep_prefix)
            if self._stop.is_set():  # stop() came in between: run() may have stopped the old one
                return

    # --- events -> view + dirty keys ----------------------------------------------------

    def _drain(self, timeout: float) -> None:
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return
        batch = [item]
        while len(batch) < 10_000:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if isinstance(item, Listed):
                self._on_listed(item)
            elif isinstance(item, Changed):
                self._on_changed(item.kind, item.type, item.obj)
            elif isinstance(item, WepChange):
                self._on_wep(item.event)
            elif isinstance(item, Resync):
                self.scan |= set(KINDS)

    def _on_listed(self, ev: Listed) -> None:
        kind = ev.kind
        before = set(self._view_keys(kind))
        if kind in MIRRORED:
            self.objects[kind] = {mirror.object_key(o): o for o in ev.items}
        elif kind == "Node":
            self.nodes = {o["metadata"]["name"]: mirror.labels_of(o) for o in ev.items}
        else:
            self.pods = {p.key: p for p in map(mirror.pod_info, ev.items)}
        self.dirty[kind] |= before | set(self._view_keys(kind))
        self.listed.add(kind)
        self.scan.add(kind)

    def _view_keys(self, kind: str):
        if kind in MIRRORED:
            return self.objects[kind].keys()
        return self.nodes.keys() if kind == "Node" else self.pods.keys()

    def _on_changed(self, kind: str, type_: str, obj: dict) -> None:
        deleted = type_ == "DELETED"
        if kind in MIRRORED:
            key = mirror.object_key(obj)
            if deleted:
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = obj
        elif kind == "Node":
            key = obj["metadata"]["name"]
            if deleted:
                self.nodes.pop(key, None)
            else:
                self.nodes[key] = mirror.labels_of(obj)
        else:
            info = mirror.pod_info(obj)
            key = info.key
            if deleted:
                self.pods.pop(key, None)
            else:
                self.pods[key] = info
        self.dirty[kind].add(key)

    def _on_wep(self, event: Snapshot | Update) -> None:
        if isinstance(event, Snapshot):
            for key in list(self.weps):
                self._index_wep(key, None)
            for key, value in event.items.items():
                self._index_wep(key, value)
            self.weps_synced = True
        else:
            self._index_wep(event.key, event.value)

    def _index_wep(self, key: str, value: bytes | None) -> None:
        old = self.weps.pop(key, None)
        if old is not None:
            pod_key = (old.namespace, old.pod)
            self.weps_by_pod.get(pod_key, set()).discard(key)
            self.dirty["Pod"].add(pod_key)
        if value is None:
            return
        try:
            doc = json.loads(value)
            meta, spec = doc["metadata"], doc.get("spec") or {}
            info = WepInfo(meta.get("namespace") or "default", meta["name"], spec.get("pod") or "",
                           mirror.labels_of(doc), tuple(mirror.wep_ports(doc)))
            orchestrator = spec.get("orchestrator") or "k8s"
        except (ValueError, KeyError, TypeError):
            log.warning("undecodable workload endpoint skipped", key=key)
            return
        if not info.pod or orchestrator != "k8s":
            return  # not a Kubernetes pod's endpoint
        self.weps[key] = info
        self.weps_by_pod.setdefault((info.namespace, info.pod), set()).add(key)
        self.dirty["Pod"].add((info.namespace, info.pod))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tortie-controller", description=__doc__.split("\n")[0])
    parser.add_argument("--k8s-api", help="Kubernetes API URL (plain http, no auth); default TORTIE_K8S_API")
    parser.add_argument("--kubeconfig", help="default KUBECONFIG, else the in-cluster service account")
    parser.add_argument("--gc-interval", type=float, help="seconds between IPAM leak checks")
    parser.add_argument("--gc-grace", type=float, help="seconds a leaked pod address waits before release")
    parser.add_argument("--leader-elect", metavar="true|false",
                        help="elect a leader through a Lease; only it writes (default TORTIE_CONTROLLER_LEADER_ELECT, true)")
    parser.add_argument("--leader-elect-resource-name", help="the Lease's name (default tortie-controller)")
    parser.add_argument("--leader-elect-resource-namespace", help="the Lease's namespace (default kube-system)")
    parser.add_argument("--leader-elect-lease-duration", metavar="SECONDS",
                        help="how long standbys wait for a silent leader (whole seconds, default 15)")
    parser.add_argument("--leader-elect-renew-deadline", metavar="SECONDS",
                        help="the leader stops writing if it has not renewed for this long (default 10)")
    parser.add_argument("--leader-elect-retry-period", metavar="SECONDS",
                        help="between renewals and attempts to acquire (default 2)")
    args = parser.parse_args(argv)
    try:
        leader = LeaderElectionConfig.from_env(
            enabled=args.leader_elect, name=args.leader_elect_resource_name,
            namespace=args.leader_elect_resource_namespace, lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline, retry_period=args.leader_elect_retry_period)
        config = ControllerConfig.from_env(k8s_api=args.k8s_api, kubeconfig=args.kubeconfig,
                                           gc_interval=args.gc_interval, gc_grace=args.gc_grace, leader=leader)
        controller = Controller(config)
    except TortieError as exc:
        print(f"tortie-controller: {exc}", file=sys.stderr)
        return exc.exit_code
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop())
    try:
        controller.run()
    except TortieError as exc:
        log.error("controller failed", error=str(exc))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
