"""The controller's writes: for every dirty key, the desired datastore state (`mirror.py`)
compared with what is stored and only the difference written, each write a
compare-and-swap on the revision it read; a failed write leaves the key dirty for a retry.
A full list of a kind (or the resync timer) first scans the datastore's copies of it for
drift and for copies Kubernetes no longer has. The IPAM garbage collector's round
(`gc.py`) and the removal of endpoints whose pods are gone run here too.
"""

from __future__ import annotations

from dataclasses import replace

from tortie.datastore import resources as res
from tortie.errors import Conflict, DatastoreUnavailable, NotFound, ValidationError
from tortie.kube import mirror
from tortie.kube.fence import NotLeader
from tortie.log import get_logger

log = get_logger("controller")

KINDS = ("Node", "Namespace", "NetworkPolicy", "Service", "EndpointSlice", "Pod")
MIRRORED = ("Namespace", "NetworkPolicy", "Service", "EndpointSlice")


class ControllerReconcile:
    """The reconcile half of `tortie.kube.controller.Controller` (a mixin: it works on the
    controller's view (`objects`, `nodes`, `pods`, `weps`), its `dirty` keys and `scan`
    kinds, its fenced `store` and `gc`)."""

    def _reconcile(self) -> bool:
        """Write the difference for every dirty key of the kinds listed so far; False if
        something must be retried (its key stays dirty)."""
        ok = True
        for kind in KINDS:
            if kind not in self.listed or (kind == "Pod" and not self.weps_synced):
                continue
            try:
                # After a list (or on the resync timer) one datastore read serves the whole pass.
                stored = self._scan_store(kind) if kind in self.scan else None
                self.scan.discard(kind)
                failures = 0
                for key in sorted(self.dirty[kind], key=str):
                    try:
                        self._sync(kind, key, stored)
                        self.dirty[kind].discard(key)
                    except NotLeader:
                        raise
                    except Conflict as exc:
                        log.info("write conflict; will retry", kind=kind, key=str(key), error=str(exc))
                        ok = False
                    except ValidationError as exc:  # Kubernetes accepted what tortie cannot: skip it
                        log.warning("object not mirrored", kind=kind, key=str(key), error=str(exc))
                        self.dirty[kind].discard(key)
                    except DatastoreUnavailable:
                        raise
                    except Exception as exc:
                        # One odd object must not hold up the others; several in a row are
                        # not about the objects: give up this pass and retry it.
                        failures += 1
                        if failures >= 3:
                            raise
                        log.warning("sync failed; will retry", kind=kind, key=str(key),
                                    error=f"{type(exc).__name__}: {exc}")
                        ok = False
            except NotLeader:  # the term ended mid-pass: what is left stays dirty for the next leader
                self._m_refused.inc()
                return False
            except Exception as exc:  # DatastoreUnavailable, or an error the adapter does not map
                error = f"{type(exc).__name__}: {exc}"
                log.warning("datastore write pass failed; will retry", kind=kind, error=error)
                log.debug("datastore write pass failed", exc_info=True)
                self.health.failed("datastore", error)
                return False
        return ok

    def _scan_store(self, kind: str) -> dict | None:
        """Read the datastore's copies of a kind at once; mark dirty every key whose copy
        differs from what Kubernetes says (drift) or that Kubernetes no longer has.
        Returns the copies by key, for the pass that follows (None for pods)."""
        if kind == "Pod":  # endpoints are in memory, kept current by the syncer
            self.dirty[kind] |= set(self.weps_by_pod) & set(self.pods)
            return None
        if kind == "Node":
            stored = {r["metadata"]["name"]: r for r in self.store.list("Node")}
            self.dirty[kind] |= {name for name, r in stored.items()
                                 if self.nodes.get(name) != mirror.labels_of(r)}
            self.dirty[kind] |= set(self.nodes) - set(stored)
            return stored
        stored = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in self.store.list(kind)}
        for key, r in stored.items():
            if mirror.is_mirrored(r) and key not in self.objects[kind]:
                self.dirty[kind].add(key)
        for key, obj in self.objects[kind].items():
            try:
                if not mirror.same(stored.get(key), res.validate(mirror.mirrored(obj, kind))):
                    self.dirty[kind].add(key)
            except ValidationError:
                self.dirty[kind].add(key)  # the sync logs it
        return stored

    def _stored(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.store.get(kind, name, namespace)
        except NotFound:
            return None

    def _sync(self, kind: str, key, listing: dict | None) -> None:
        if kind == "Pod":
            self._sync_pod(key)
            return
        if listing is not None:
            stored = listing.get(key)
        else:
            stored = self._stored(kind, key[1], key[0]) if kind in MIRRORED else self._stored(kind, key)
        if kind in MIRRORED:
            self._sync_mirrored(kind, key, stored)
        else:
            self._sync_node(key, stored)

    def _sync_mirrored(self, kind: str, key: tuple[str | None, str], stored: dict | None) -> None:
        obj = self.objects[kind].get(key)
        if obj is None:
            if stored is not None and mirror.is_mirrored(stored):
                self._delete(kind, stored)
            return
        desired = res.validate(mirror.mirrored(obj, kind))
        if mirror.same(stored, desired):
            return
        if stored is not None:  # replace exactly what was read
            desired["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
        self.store.apply(desired)
        self.writes += 1

    def _delete(self, kind: str, stored: dict) -> None:
        meta = stored["metadata"]
        try:
            self.store.delete(kind, meta["name"], meta.get("namespace"), resource_version=meta["resourceVersion"])
            self.writes += 1
        except NotFound:
            pass

    def _sync_node(self, name: str, stored: dict | None) -> None:
        labels = self.nodes.get(name)
        if labels is None:  # deleted from Kubernetes: its addresses and its record go
            self.gc.release_node(name)
            if stored is not None:
                self._delete("Node", stored)
            log.info("node removed", node=name)
            return
        if stored is not None and mirror.labels_of(stored) == labels:
            return
        self.store.apply(mirror.node_resource(name, labels, stored))
        self.writes += 1

    def _sync_pod(self, key: tuple[str, str]) -> None:
        pod = self.pods.get(key)
        if pod is None:
            return  # the CNI DEL removes its endpoints; the GC catches what it misses
        for wep_key in sorted(self.weps_by_pod.get(key, ())):
            wep = self.weps[wep_key]
            want = mirror.wep_labels(wep.labels, pod.labels)
            if want == dict(wep.labels) and pod.ports == wep.ports:
                continue
            stored = self._stored("WorkloadEndpoint", wep.name, wep.namespace)
            if stored is None:
                continue
            want = mirror.wep_labels(mirror.labels_of(stored), pod.labels)
            if want != mirror.labels_of(stored) or list(pod.ports) != mirror.wep_ports(stored):
                # guarded by its resourceVersion
                self.store.apply(mirror.with_ports(mirror.with_labels(stored, want), list(pod.ports)))
                self.writes += 1
            # The syncer will report the write; until then the index holds what was written.
            self.weps[wep_key] = replace(wep, labels=want, ports=pod.ports)

    def _collect(self) -> None:
        try:
            self._delete_stale_endpoints()
            self.gc.collect(set(self.pods), set(self.nodes))
            self.gc_rounds += 1
        except NotLeader:
            self._m_refused.inc()
        except Exception as exc:  # next round retries; the controller keeps running
            log.warning("IPAM garbage collection failed; next round will retry",
                        error=f"{type(exc).__name__}: {exc}")

    def _delete_stale_endpoints(self) -> None:
        orphans = [key for key, w in self.weps.items() if (w.namespace, w.pod) not in self.pods]
        for key in self.gc.stale_endpoints(orphans):
            wep = self.weps.get(key)
            if wep is None:
                continue
            stored = self._stored("WorkloadEndpoint", wep.name, wep.namespace)
            if stored is None or (stored.get("spec") or {}).get("pod") != wep.pod:
                continue
            try:
                self._delete("WorkloadEndpoint", stored)  # guarded by the revision just read
            except Conflict:
                continue  # rewritten meanwhile: someone still cares; the next round decides
            log.info("endpoint of a deleted pod removed", namespace=wep.namespace, endpoint=wep.name, pod=wep.pod)
