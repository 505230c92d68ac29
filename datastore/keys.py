"""The datastore's key layout: the one place where an etcd key string is built or parsed.

Every key is relative to the datastore prefix (default `/tortie/`); callers join the two.

    resources/<kind>/<name>                  cluster-wide kinds
    resources/<kind>/<namespace>/<name>      namespaced kinds (networkpolicy, workloadendpoint)
    ipam/blocks/<cidr, / as ->
    ipam/affinity/<node>/<cidr, / as ->
    ipam/handles/<handle>
    meta/serial/<kind>                       bumped by every write of a serialized kind
    status/bgp/<node>                        each node's BGP status document
"""

from __future__ import annotations

RESOURCES = "resources/"
IPAM = "ipam/"
IPAM_BLOCKS = "ipam/blocks/"
IPAM_AFFINITY = "ipam/affinity/"
IPAM_HANDLES = "ipam/handles/"
SERIALS = "meta/serial/"
BGP_STATUS = "status/bgp/"


def cidr_part(cidr: str) -> str:
    """A CIDR as one key segment (`10.0.0.0/26` -> `10.0.0.0-26`)."""
    return cidr.replace("/", "-")


def cidr_from_part(part: str) -> str:
    return part.replace("-", "/")


def resource_prefix(kind: str, namespace: str | None = None) -> str:
    """Keys of one kind (`kind` is the lower-case singular), or of one namespace of it."""
    base = f"{RESOURCES}{kind}/"
    return f"{base}{namespace}/" if namespace else base


def resource_key(kind: str, name: str, namespace: str | None = None) -> str:
    """One resource; `namespace` only for namespaced kinds."""
    return f"{resource_prefix(kind, namespace)}{name}"


def parse_resource(key: str) -> tuple[str, str | None, str] | None:
    """(kind, namespace or None, name) of a resource key, or None for any other key."""
    if not key.startswith(RESOURCES):
        return None
    parts = key[len(RESOURCES):].split("/")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None


def block_key(cidr: str) -> str:
    return IPAM_BLOCKS + cidr_part(cidr)


def affinity_prefix(node: str | None = None) -> str:
    return f"{IPAM_AFFINITY}{node}/" if node else IPAM_AFFINITY


def affinity_key(node: str, cidr: str) -> str:
    return f"{IPAM_AFFINITY}{node}/{cidr_part(cidr)}"


def parse_affinity(key: str) -> tuple[str, str] | None:
    """(node, block cidr) of an affinity key, or None."""
    if not key.startswith(IPAM_AFFINITY):
        return None
    node, sep, part = key[len(IPAM_AFFINITY):].partition("/")
    return (node, cidr_from_part(part)) if sep and node and part else None


def handle_key(handle: str) -> str:
    return IPAM_HANDLES + handle


def serial_key(kind: str) -> str:
    return SERIALS + kind


def bgp_status_key(node: str) -> str:
    return BGP_STATUS + node


def parse_bgp_status(key: str) -> str | None:
    """The node of a BGP status key, or None."""
    return key[len(BGP_STATUS):] or None if key.startswith(BGP_STATUS) else None
