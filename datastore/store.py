"""`ResourceStore`: resources kept in etcd, every write one compare-and-swap transaction.

Create only if absent, replace only over the revision it read (or the resourceVersion the
caller gave), delete only what it read. `metadata.resourceVersion` is the key's etcd
mod_revision; it is filled in on read (`decode`) and never stored. Writes of a serialized
kind (IPPool) also bump the kind's serial key in the same transaction, so the "pools may
not overlap" check cannot be raced by a concurrent create of another pool.
"""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial

from tortie.datastore import keys
from tortie.datastore.etcd import EtcdClient, Txn
from tortie.datastore.kinds import VXLAN_DEFAULT_VNI, Kind, key_for, kind_for, kind_of, validate
from tortie.datastore.resources import VIEWS
from tortie.errors import AlreadyExists, Conflict, NotFound, ValidationError
from tortie.log import get_logger

log = get_logger("datastore")


def decode(value: bytes, mod_revision: int) -> dict:
    """A stored resource with its resourceVersion filled in."""
    res = json.loads(value)
    res["metadata"]["resourceVersion"] = str(mod_revision)
    return res


# etcd refuses a request over 1.5 MiB (its default --max-request-bytes): a resource stays
# well below, so that one transaction can carry it and its guards.
MAX_RESOURCE_BYTES = 1 << 20


def _encode(res: dict) -> bytes:
    meta = {k: v for k, v in res["metadata"].items() if k != "resourceVersion"}
    data = json.dumps({**res, "metadata": meta}, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_RESOURCE_BYTES:
        raise ValidationError(f"{res['kind']} {meta.get('name')!r} is {len(data)} bytes stored; "
                              f"at most {MAX_RESOURCE_BYTES} (1 MiB)")
    return data


class ResourceStore:
    """get/list/create/replace/apply/delete of resources, each write one CAS transaction."""

    def __init__(self, client: EtcdClient, retries: int = 20) -> None:
        self.client = client
        self.prefix = client.config.prefix
        self.retries = retries

    def _key(self, kind: Kind, name: str, namespace: str | None) -> str:
        return self.prefix + key_for(kind, name, namespace)

    # reads

    def get(self, kind: str | Kind, name: str, namespace: str | None = None) -> dict:
        kind = kind if isinstance(kind, Kind) else kind_for(kind)
        kv = self.client.get(self._key(kind, name, namespace))
        if kv is None:
            where = f" in namespace {namespace or 'default'}" if kind.namespaced else ""
            raise NotFound(f"{kind.name} {name!r}{where} not found")
        return decode(kv.value, kv.mod_revision)

    def list(self, kind: str | Kind, namespace: str | None = None) -> list[dict]:
        """Every resource of a kind (in one namespace, or in all when namespace is None)."""
        return self.list_at(kind, namespace)[0]

    def list_at(self, kind: str | Kind, namespace: str | None = None) -> tuple[list[dict], int]:
        """Like list, with the etcd revision the list was read at."""
        kind = kind if isinstance(kind, Kind) else kind_for(kind)
        kvs, revision = self.client.get_prefix(self.prefix + kind.prefix(namespace))
        out = []
        for kv in kvs:
            try:
                out.append(decode(kv.value, kv.mod_revision))
            except (ValueError, KeyError, TypeError):
                log.warning("undecodable resource skipped", key=kv.key)
        out.sort(key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"]["name"]))
        return out, revision

    def views(self, kind: str | Kind, namespace: str | None = None) -> list:
        """Typed views of every valid resource of a kind; invalid ones are logged and skipped."""
        kind = kind if isinstance(kind, Kind) else kind_for(kind)
        view = VIEWS[kind.key]
        out = []
        for res in self.list(kind, namespace):
            try:
                out.append(view.from_resource(res))
            except ValidationError as exc:
                log.warning("invalid resource skipped", kind=kind.name, name=res["metadata"].get("name"),
                            error=str(exc))
        return out

    # writes

    def create(self, resource: Mapping) -> dict:
        return self._write(resource, "create")

    def replace(self, resource: Mapping) -> dict:
        return self._write(resource, "replace")

    def apply(self, resource: Mapping, *, likely_new: bool = False) -> dict:
        """Create, or replace what is there (guarded by metadata.resourceVersion if given).

        `likely_new`: try the create first, without reading the key (one etcd round trip
        instead of two: a CNI ADD writing its pod's endpoint); a resource that is there
        after all is then read and replaced as usual."""
        return self._write(resource, "apply", likely_new=likely_new)

    def delete(self, kind: str | Kind, name: str, namespace: str | None = None,
               resource_version: str | int | None = None) -> dict:
        kind = kind if isinstance(kind, Kind) else kind_for(kind)
        key = self._key(kind, name, namespace)
        for _ in range(self.retries):
            cur = self.get(kind, name, namespace)
            rev = int(cur["metadata"]["resourceVersion"])
            if resource_version is not None and int(resource_version) != rev:
                raise Conflict(f"{kind.name} {name!r} changed (resourceVersion {rev}, not {resource_version})")
            txn = Txn().guard(key, rev).delete(key)
            if self._serialize(kind, txn)[0]:
                log.info("resource deleted", kind=kind.name, name=name, namespace=namespace)
                return cur
        raise Conflict(f"gave up deleting {kind.name} {name!r} after {self.retries} conflicting writes")

    def _serialize(self, kind: Kind, txn: Txn, check: Callable[[list[dict]], None] | None = None) -> tuple[bool, int]:
        """Run txn; for serialized kinds, also guard-and-bump the kind's serial key, having
        shown `check` every resource of the kind at that serial."""
        if kind.serialized:
            serial_key = self.prefix + keys.serial_key(kind.key)
            serial = self.client.get(serial_key)
            if check is not None:
                check(self.list(kind))
            txn.guard(serial_key, serial.mod_revision if serial else 0)
            txn.put(serial_key, str(int(serial.value) + 1 if serial else 1).encode())
        elif check is not None:
            check(self.list(kind))
        return self.client.transaction(txn)

    def _write(self, resource: Mapping, mode: str, likely_new: bool = False) -> dict:
        res = validate(resource)
        kind = kind_of(res)
        meta = res["metadata"]
        name, namespace = meta["name"], meta.get("namespace")
        key = self._key(kind, name, namespace)
        wanted_rev = meta.pop("resourceVersion", None)
        where = f"{kind.name} {name!r}" + (f" in namespace {namespace}" if kind.namespaced else "")
        blind = likely_new and wanted_rev is None and not kind.serialized and kind.key not in CHECKS
        if kind.key == "ippool":
            _check_pool_nodes(res, self.views("Node"))
        elif kind.key == "endpointslice":
            _check_slice_addresses(res, self.list("IPPool"), self.views("Node"))
        for _ in range(self.retries):
            if blind:  # guarded by "absent": a create that fails is simply a replace below
                blind = False
                new_meta = {**meta, "uid": str(uuid.uuid4()),
                            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                created = {**res, "metadata": new_meta}
                ok, revision = self.client.transaction(Txn().guard(key, 0).put(key, _encode(created)))
                if ok:
                    log.info("resource written", kind=kind.name, name=name, namespace=namespace, created=True)
                    return {**created, "metadata": {**new_meta, "resourceVersion": str(revision)}}
            cur_kv = self.client.get(key)
            cur = decode(cur_kv.value, cur_kv.mod_revision) if cur_kv else None
            if cur is None and mode == "replace":
                raise NotFound(f"{where} not found")
            if cur is not None and mode == "create":
                raise AlreadyExists(f"{where} already exists")
            if cur is not None and wanted_rev is not None and int(wanted_rev) != cur_kv.mod_revision:
                raise Conflict(f"{where} was changed since resourceVersion {wanted_rev} "
                               f"(now {cur_kv.mod_revision}); get it again and reapply")
            if cur is None:
                if wanted_rev is not None and mode != "create":
                    raise NotFound(f"{where} not found (it had resourceVersion {wanted_rev})")
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            else:  # the store's bookkeeping survives a replace
                meta["uid"] = cur["metadata"].get("uid", meta.get("uid"))
                meta["creationTimestamp"] = cur["metadata"].get("creationTimestamp")
                meta = {k: v for k, v in meta.items() if v is not None}
                res["metadata"] = meta
            txn = Txn().guard(key, cur_kv.mod_revision if cur_kv else 0).put(key, _encode(res))
            check = CHECKS.get(kind.key)
            ok, revision = self._serialize(kind, txn, partial(check, res, cur) if check else None)
            if ok:
                log.info("resource written", kind=kind.name, name=name, namespace=namespace,
                         created=cur is None)
                return {**res, "metadata": {**meta, "resourceVersion": str(revision)}}
        raise Conflict(f"gave up writing {where} after {self.retries} conflicting writes")


def _check_pool(new: dict, old: dict | None, pools: list[dict]) -> None:
    """Pools may not overlap; a pool's cidr and blockSize are fixed once blocks are carved."""
    if old is not None:
        for field in ("cidr", "blockSize"):
            if old["spec"].get(field) != new["spec"][field]:
                raise ValidationError(f"cannot change from {old['spec'].get(field)} (delete and recreate "
                                      "the pool once it is empty)", field=f"spec.{field}")
    net = ipaddress.ip_network(new["spec"]["cidr"])
    mine = (new["spec"].get("egress") or {}).get("address")
    for other in pools:
        if other["metadata"]["name"] == new["metadata"]["name"]:
            continue
        theirs = ipaddress.ip_network(other["spec"]["cidr"])
        if theirs.version == net.version and net.overlaps(theirs):
            raise ValidationError(f"{net} overlaps IPPool {other['metadata']['name']!r} ({theirs})",
                                  field="spec.cidr")
        # An egress address inside a pool could be handed to a pod (and would be routed as one).
        if mine and ipaddress.ip_address(mine) in theirs:
            raise ValidationError(f"{mine} is inside IPPool {other['metadata']['name']!r} ({theirs})",
                                  field="spec.egress.address")
        # One VXLAN device per family on every node: the pools that use it share its VNI.
        if _vni(new) and _vni(other) and theirs.version == net.version and _vni(new) != _vni(other):
            raise ValidationError(f"{_vni(new)} differs from IPPool {other['metadata']['name']!r}'s "
                                  f"{_vni(other)} (VXLAN pools of a family share the node's device)",
                                  field="spec.vxlanVNI")
        if (addr := (other["spec"].get("egress") or {}).get("address")) and ipaddress.ip_address(addr) in net:
            raise ValidationError(f"{net} holds {addr}, the egress address of IPPool "
                                  f"{other['metadata']['name']!r}", field="spec.cidr")


def _vni(pool: dict) -> int | None:
    """The VNI of a pool that uses VXLAN (None for one that does not)."""
    spec = pool["spec"]
    if spec.get("vxlanMode", "Never") == "Never":
        return None
    return spec.get("vxlanVNI", VXLAN_DEFAULT_VNI)


def _check_pool_nodes(pool: dict, nodes: list) -> None:
    """A pool holding a node's own address would hand it to a pod: refused. What the
    datastore cannot know -- the other hosts on a node's subnet, nodes not registered
    yet -- is a warning."""
    net = ipaddress.ip_network(pool["spec"]["cidr"])
    known = 0
    for node in nodes:
        for addr in (node.ipv4_address, node.ipv6_address, *node.addresses):
            if not addr:
                continue
            iface = ipaddress.ip_interface(addr)
            known += iface.version == net.version
            if iface.version != net.version:
                continue
            if iface.ip in net:
                raise ValidationError(f"{net} holds {iface.ip}, an address of node {node.name}", field="spec.cidr")
            if iface.network.overlaps(net):
                log.warning("pool overlaps a node's subnet: other hosts there may use its addresses",
                            pool=pool["metadata"]["name"], cidr=str(net), node=node.name, subnet=str(iface.network))
    if not known:
        log.warning(f"no node in the datastore has an IPv{net.version} address yet: pool not checked against "
                    "node addresses", pool=pool["metadata"]["name"], cidr=str(net))
    _check_egress_next_hop(pool, nodes)


def _check_egress_next_hop(pool: dict, nodes: list) -> None:
    """An egress next hop on no subnet a node is known to have is most likely a typo (the
    pool's traffic would be refused on every node): a warning, since a node may have
    uplinks the datastore does not list."""
    e = pool["spec"].get("egress") or {}
    hops = [h["address"] for h in e.get("nextHops") or ()] or ([e["nextHop"]] if e.get("nextHop") else [])
    subnets = [ipaddress.ip_interface(a).network for n in nodes
               for a in (n.ipv4_address, n.ipv6_address, *n.addresses) if a and "/" in a]
    for hop in hops:
        ip = ipaddress.ip_address(hop)
        if not any(ip in s for s in subnets):
            log.warning("egress next hop is on no subnet of any known node: where it is not reachable the "
                        "pool's traffic is refused", pool=pool["metadata"]["name"], next_hop=hop,
                        subnets=sorted({str(s) for s in subnets}))


def _check_slice_addresses(eps: dict, pools: list[dict], nodes: list) -> None:
    """An endpoint is a pod (inside a pool) or a host-network pod (a node's address): any
    other address is most likely a typo that would send the Service's traffic off the cluster."""
    nets = [ipaddress.ip_network(p["spec"]["cidr"]) for p in pools
            if "Workload" in p["spec"].get("allowedUses", ("Workload",))]
    hosts = {ipaddress.ip_interface(a).ip for n in nodes
             for a in (n.ipv4_address, n.ipv6_address, *n.addresses) if a}
    for i, endpoint in enumerate(eps.get("endpoints", ())):
        for j, addr in enumerate(endpoint["addresses"]):
            ip = ipaddress.ip_address(addr)
            if ip not in hosts and not any(ip in net for net in nets):
                raise ValidationError(f"{addr} is outside every workload IPPool and is no node's address",
                                      field=f"endpoints[{i}].addresses[{j}]")


CHECKS: dict[str, Callable[[dict, dict | None, list[dict]], None]] = {"ippool": _check_pool}


__all__ = ["ResourceStore", "decode"]
