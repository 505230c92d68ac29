"""Kubernetes object -> tortie resource, pure: no I/O, so every rule is unit-testable.

What the controller keeps in the datastore, and how it is derived:

- Namespaces, NetworkPolicies, Services and EndpointSlices: the object as the user wrote it (kind, apiVersion,
  name, namespace, labels, annotations, spec), without the API server's bookkeeping
  (status, managedFields, uid, resourceVersion, ...; a Service keeps
  status.loadBalancer.ingress, which the proxy serves). Each mirrored copy carries the
  annotation `tortie.io/mirrored-from: kubernetes`, so a resync deletes only what the
  controller wrote and never a policy a user applied with tortiectl.
- Nodes: only metadata.labels of the tortie Node come from Kubernetes; the rest (the
  agent's spec.bgp, addresses) is left as it is.
- WorkloadEndpoints: metadata.labels are the pod's labels, plus any labels under the
  system prefixes (`tortie.io/`, `projectcalico.org/`) the endpoint already has;
  spec.ports are the pod's named container ports (`pod_ports`: what NetworkPolicy's
  named ports resolve against); unnamed ones are left out, as Calico does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tortie.datastore.resources import API_VERSION

MIRROR_ANNOTATION = "tortie.io/mirrored-from"
MIRROR_SOURCE = "kubernetes"
# Annotations that are client bookkeeping, not intent; the first is a copy of the object.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",
                        "deployment.kubernetes.io/revision")
SYSTEM_LABEL_PREFIXES = ("tortie.io/", "projectcalico.org/")
# Written by the datastore on every write; not part of what the object says.
_STORE_META = ("resourceVersion", "uid", "creationTimestamp")

MIRRORED_KINDS = {"Namespace": "v1", "NetworkPolicy": "networking.k8s.io/v1", "Service": "v1",
                  "EndpointSlice": "discovery.k8s.io/v1"}
NAMESPACED_KINDS = ("NetworkPolicy", "Service", "EndpointSlice")
_SLICE_FIELDS = ("addressType", "endpoints", "ports")


@dataclass(frozen=True)
class PodInfo:
    """What the controller remembers of a pod."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    node: str | None = None
    ports: tuple[dict, ...] = ()  # `pod_ports`

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    meta = obj.get("metadata") or {}
    return PodInfo(meta.get("namespace") or "default", meta["name"], dict(meta.get("labels") or {}),
                   (obj.get("spec") or {}).get("nodeName"), tuple(pod_ports(obj)))


def pod_ports(obj: Mapping[str, Any]) -> list[dict]:
    """A pod's named container ports (`spec.containers[*].ports[*]` with a name), as
    WorkloadEndpoint `spec.ports` items {name, protocol, port}, sorted, without repeats.
    `obj` is the pod as the API serializes it (camelCase keys)."""
    out = set()
    for container in (obj.get("spec") or {}).get("containers") or ():
        for p in (container or {}).get("ports") or ():
            if p.get("name") and p.get("containerPort"):
                out.add((p["name"], p.get("protocol") or "TCP", int(p["containerPort"])))
    return [{"name": n, "protocol": proto, "port": port} for n, proto, port in sorted(out)]


def wep_ports(wep: Mapping[str, Any] | None) -> list[dict]:
    """A stored WorkloadEndpoint's ports, in `pod_ports`' form (to compare with it)."""
    items = ((wep or {}).get("spec") or {}).get("ports") or ()
    return sorted(({"name": p["name"], "protocol": p.get("protocol") or "TCP", "port": p["port"]}
                   for p in items if p.get("name")), key=lambda p: (p["name"], p["protocol"], p["port"]))


def with_ports(wep: Mapping[str, Any], ports: list[dict]) -> dict:
    """A copy of a WorkloadEndpoint with spec.ports replaced (removed when empty)."""
    spec = {k: v for k, v in (wep.get("spec") or {}).items() if k != "ports"}
    if ports:
        spec["ports"] = [dict(p) for p in ports]
    return {**wep, "spec": spec}


def object_key(obj: Mapping[str, Any]) -> tuple[str | None, str]:
    """(namespace or None, name) of a Kubernetes object."""
    meta = obj.get("metadata") or {}
    return meta.get("namespace"), meta["name"]


def mirrored(obj: Mapping[str, Any], kind: str) -> dict:
    """The datastore copy of a Namespace or NetworkPolicy."""
    meta = obj.get("metadata") or {}
    out_meta: dict[str, Any] = {"name": meta["name"]}
    if kind in NAMESPACED_KINDS:
        out_meta["namespace"] = meta.get("namespace") or "default"
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS}
    annotations[MIRROR_ANNOTATION] = MIRROR_SOURCE
    out_meta["annotations"] = annotations
    out = {"apiVersion": MIRRORED_KINDS[kind], "kind": kind, "metadata": out_meta}
    if kind == "EndpointSlice":  # no spec: its content is top-level
        return {**out, **{k: obj[k] for k in _SLICE_FIELDS if obj.get(k) is not None}}
    out["spec"] = dict(obj.get("spec") or {})
    lb = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")
    if kind == "Service" and lb:  # the addresses a load balancer (or tortie) gave it
        out["status"] = {"loadBalancer": {"ingress": lb}}
    return out


def is_mirrored(resource: Mapping[str, Any]) -> bool:
    """Whether the controller wrote this datastore resource (and so may delete it)."""
    annotations = (resource.get("metadata") or {}).get("annotations") or {}
    return annotations.get(MIRROR_ANNOTATION) == MIRROR_SOURCE


def same(stored: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether a stored resource already says what desired says, ignoring the store's
    bookkeeping. `desired` must be normalized the way the store normalizes (validate())."""
    if stored is None:
        return False
    return _comparable(stored) == _comparable(desired)


def _comparable(resource: Mapping[str, Any]) -> dict:
    meta = {k: v for k, v in (resource.get("metadata") or {}).items() if k not in _STORE_META}
    return {**resource, "metadata": meta}


def node_resource(name: str, labels: Mapping[str, str], current: Mapping[str, Any] | None) -> dict:
    """The tortie Node with Kubernetes' labels: the current one with its labels replaced
    (spec untouched, resourceVersion kept as the write guard), or a new one."""
    if current is None:
        return {"apiVersion": API_VERSION, "kind": "Node", "metadata": {"name": name, "labels": dict(labels)},
                "spec": {}}
    return with_labels(current, labels)


def wep_labels(current: Mapping[str, str], pod_labels: Mapping[str, str]) -> dict[str, str]:
    """A WorkloadEndpoint's labels: the pod's, plus the system labels the endpoint has."""
    out = {k: v for k, v in current.items() if k.startswith(SYSTEM_LABEL_PREFIXES)}
    out.update(pod_labels)
    return out


def with_labels(resource: Mapping[str, Any], labels: Mapping[str, str]) -> dict:
    """A copy of resource with metadata.labels replaced (removed when empty)."""
    meta = {k: v for k, v in (resource.get("metadata") or {}).items() if k != "labels"}
    if labels:
        meta["labels"] = dict(labels)
    return {**resource, "metadata": meta}


def labels_of(resource: Mapping[str, Any] | None) -> dict[str, str]:
    return dict(((resource or {}).get("metadata") or {}).get("labels") or {})


__all__ = [
    "MIRRORED_KINDS",
    "MIRROR_ANNOTATION",
    "PodInfo",
    "is_mirrored",
    "labels_of",
    "mirrored",
    "node_resource",
    "object_key",
    "pod_info",
    "pod_ports",
    "same",
    "wep_labels",
    "wep_ports",
    "with_labels",
    "with_ports",
]
