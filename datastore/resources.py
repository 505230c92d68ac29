"""Resources: kinds, validation, typed views and the store that keeps them in etcd.

A resource is the familiar Kubernetes shape -- apiVersion, kind, metadata, spec -- and is
stored as JSON under `resources/<kind>/<name>` (or `resources/<kind>/<namespace>/<name>`
for namespaced kinds) below the datastore prefix. `validate()` checks a resource and
returns it normalized (CIDRs canonical, defaults filled in), raising ValidationError
that names the offending field. The typed views (`IPPool.from_resource(d)`, ...) are
frozen dataclasses over a validated resource, for the code that acts on them.

`ResourceStore` writes every change as one compare-and-swap transaction: create only if
absent, replace only over the revision it read (or the resourceVersion the caller
gave), delete only what it read. `metadata.resourceVersion` is the key's etcd
mod_revision; it is filled in on read and never stored. IPPool writes also bump a
per-kind serial key in the same transaction, so the "pools may not overlap" check
cannot be raced by a concurrent create of another pool.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, ClassVar

from tortie.datastore import selector
from tortie.datastore.etcd import EtcdClient, Txn
from tortie.errors import AlreadyExists, Conflict, NotFound, ValidationError
from tortie.log import get_logger

log = get_logger("datastore")

API_VERSION = "tortie.io/v1"
RESOURCES = "resources/"
SERIALS = "meta/serial/"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- field readers: every error names the field ----------------------------------------


class Fields:
    """Reads one object of a resource; `done()` rejects fields nobody asked for."""

    def __init__(self, obj: Any, path: str, *, strict: bool = True) -> None:
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise ValidationError("must be an object", field=path)
        self.obj, self.path, self.strict = obj, path, strict
        self.out: dict[str, Any] = {}

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def raw(self, name: str, required: bool = False) -> Any:
        value = self.obj.get(name)
        if value is None and required:
            raise ValidationError("is required", field=self.at(name))
        return value

    def keep(self, name: str, value: Any) -> Any:
        if value is not None:
            self.out[name] = value
        return value

    def str(self, name: str, *, required: bool = False, default: str | None = None,
            pattern: re.Pattern | None = None, choices: Iterable[str] | None = None,
            max_len: int | None = None) -> str | None:
        value = self.raw(name, required)
        if value is None:
            return self.keep(name, default)
        if not isinstance(value, str):
            raise ValidationError(f"must be a string, not {type(value).__name__}", field=self.at(name))
        if choices is not None and value not in choices:
            raise ValidationError(f"must be one of {', '.join(choices)}", field=self.at(name))
        if max_len is not None and len(value) > max_len:
            raise ValidationError(f"must be at most {max_len} characters", field=self.at(name))
        if pattern is not None and not pattern.fullmatch(value):
            raise ValidationError(f"{value!r} is not valid", field=self.at(name))
        return self.keep(name, value)

    def bool(self, name: str, default: bool | None = None) -> bool | None:
        value = self.raw(name)
        if value is None:
            return self.keep(name, default)
        if not isinstance(value, bool):
            raise ValidationError("must be true or false", field=self.at(name))
        return self.keep(name, value)

    def int(self, name: str, lo: int, hi: int, *, required: bool = False,
            default: int | None = None) -> int | None:
        value = self.raw(name, required)
        if value is None:
            return self.keep(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("must be an integer", field=self.at(name))
        if not lo <= value <= hi:
            raise ValidationError(f"must be between {lo} and {hi}", field=self.at(name))
        return self.keep(name, value)

    def asn(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        """An AS number, as an integer or in asdot ("1.10") notation; stored as an integer."""
        value = self.raw(name, required)
        if isinstance(value, str) and re.fullmatch(r"\d+\.\d+", value):
            hi, lo = (int(x) for x in value.split("."))
            if hi > 0xFFFF or lo > 0xFFFF:
                raise ValidationError("asdot halves must be at most 65535", field=self.at(name))
            self.obj = {**self.obj, name: hi << 16 | lo}
        elif isinstance(value, str) and value.isdigit():
            self.obj = {**self.obj, name: int(value)}
        return self.int(name, 1, 0xFFFFFFFF, required=required, default=default)

    def seconds(self, name: str, lo: int, hi: int) -> int | None:
        """A duration: seconds as an integer, or Go-style "90s", "1m30s", "1h"; stored in seconds."""
        value = self.raw(name)
        if isinstance(value, str):
            m = _DURATION.fullmatch(value)
            if not m or not value:
                raise ValidationError(f"{value!r} is not a duration like 90s or 1m30s", field=self.at(name))
            self.obj = {**self.obj, name: sum(int(n or 0) * k for n, k in zip(m.groups(), (3600, 60, 1), strict=True))}
        return self.int(name, lo, hi)

    def cidr(self, name: str, *, required: bool = False, masked: bool = True) -> IPNetwork | None:
        value = self.str(name, required=required)
        if value is None:
            return None
        net = parse_cidr(value, self.at(name), masked=masked)
        self.out[name] = str(net)
        return net

    def ip(self, name: str, *, required: bool = False, version: int | None = None) -> str | None:
        value = self.str(name, required=required)
        if value is None:
            return None
        addr = parse_ip(value, self.at(name), version)
        self.out[name] = str(addr)
        return str(addr)

    def selector(self, name: str, default: str | None = None) -> str | None:
        value = self.str(name, default=default)
        if value is not None:
            selector.validate(value, self.at(name))
        return value

    def list(self, name: str, item: Callable[[Any, str], Any], *, required: bool = False) -> list | None:
        value = self.raw(name, required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValidationError("must be a list", field=self.at(name))
        return self.keep(name, [item(v, f"{self.at(name)}[{i}]") for i, v in enumerate(value)])

    def obj_field(self, name: str, fn: Callable[[Fields], None], *, required: bool = False) -> dict | None:
        value = self.raw(name, required)
        if value is None:
            return None
        sub = Fields(value, self.at(name))
        fn(sub)
        return self.keep(name, sub.done())

    def done(self) -> dict:
        if self.strict:
            unknown = sorted(set(self.obj) - set(self.out) - {k for k, v in self.obj.items() if v is None})
            if unknown:
                raise ValidationError(f"unknown field {unknown[0]!r}", field=self.at(unknown[0]))
        return self.out


def parse_cidr(value: str, field: str, *, masked: bool = True) -> IPNetwork:
    """A network. tortie's own resources must name it masked: "10.0.0.5/16" is refused
    rather than silently read as 10.0.0.0/16, since the user may have meant another
    prefix length. Kubernetes objects (masked=False) keep the API server's leniency."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not a CIDR: {exc}", field=field) from None
    if masked and ipaddress.ip_address(value.split("/")[0]) != net.network_address:
        raise ValidationError(f"{value!r} has host bits set (did you mean {net}?)", field=field)
    return net


def parse_ip(value: str, field: str, version: int | None = None):
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(f"{value!r} is not an IP address", field=field) from None
    if version is not None and addr.version != version:
        raise ValidationError(f"{value!r} is not an IPv{version} address", field=field)
    return addr


def _ip_interface(value: Any, field: str, version: int) -> str:
    """A node address with its subnet, "10.0.0.1/24" (a bare address means /32 or /128)."""
    if not isinstance(value, str):
        raise ValidationError("must be a string", field=field)
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValidationError(f"{value!r} is not an address or address/prefix", field=field) from None
    if iface.version != version:
        raise ValidationError(f"{value!r} is not an IPv{version} address", field=field)
    return str(iface)


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_COMMUNITY = re.compile(r"\d{1,10}:\d{1,10}(:\d{1,10})?")  # standard a:b or large a:b:c

# --- metadata ----------------------------------------------------------------------

DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_IFNAME = re.compile(r"[^\s/:]{1,15}")
# Kubernetes bookkeeping a user may paste from a cluster: dropped, not refused.
_K8S_IGNORED = ("generation", "managedFields", "selfLink", "ownerReferences", "finalizers",
                "generateName", "deletionTimestamp", "deletionGracePeriodSeconds")


def _labels(value: Any, field: str, values_too: bool = True) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValidationError("must be a map of strings", field=field)
    out = {}
    for key, val in value.items():
        where = f"{field}[{key}]"
        if not isinstance(key, str) or not isinstance(val, str):
            raise ValidationError("keys and values must be strings (quote numbers and booleans)", field=where)
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix))) \
                or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            raise ValidationError(f"{key!r} is not a valid label name", field=where)
        if values_too and val and (len(val) > 63 or not _LABEL_NAME.fullmatch(val)):
            raise ValidationError(f"{val!r} is not a valid label value", field=where)
        out[key] = val
    return out


def _metadata(kind: Kind, meta: Any) -> dict:
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in _K8S_IGNORED}
    f = Fields(meta, "metadata", strict=kind.api_version == API_VERSION)
    f.str("name", required=True, pattern=kind.name_pattern, max_len=253)
    if kind.namespaced:
        f.str("namespace", default="default", pattern=DNS_LABEL, max_len=63)
    elif f.raw("namespace") is not None:
        raise ValidationError(f"{kind.name} is not namespaced", field="metadata.namespace")
    if f.raw("labels") is not None:
        f.keep("labels", _labels(f.raw("labels"), "metadata.labels"))
    if f.raw("annotations") is not None:
        f.keep("annotations", _labels(f.raw("annotations"), "metadata.annotations", values_too=False))
    f.str("resourceVersion", pattern=re.compile(r"\d+"))
    f.str("uid")
    f.str("creationTimestamp")
    return f.done()


# --- kinds -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str  # as written in `kind:`
    api_version: str
    namespaced: bool
    spec: Callable[[Fields, dict], None]  # validates spec, given the validated metadata
    aliases: tuple[str, ...] = ()
    name_pattern: re.Pattern = DNS_SUBDOMAIN
    spec_required: bool = True
    serialized: bool = False  # writes of this kind are linearized by a serial key

    @property
    def key(self) -> str:
        """Lower-case singular: the key segment and the CLI's canonical name."""
        return self.name.lower()

    def prefix(self, namespace: str | None = None) -> str:
        base = f"{RESOURCES}{self.key}/"
        return f"{base}{namespace}/" if self.namespaced and namespace else base


def _pool_spec(f: Fields, meta: dict) -> None:
    net = f.cidr("cidr", required=True)
    v6 = net.version == 6
    lo, default = (116, 122) if v6 else (20, 26)
    size = f.int("blockSize", lo, 128 if v6 else 32, default=default)
    if size < net.prefixlen:
        raise ValidationError(f"must be at least the pool's prefix length /{net.prefixlen}",
                              field="spec.blockSize")
    f.bool("natOutgoing", False)
    f.bool("disabled", False)
    f.bool("disableBGPExport", False)
    f.selector("nodeSelector", default="all()")
    for mode in ("ipipMode", "vxlanMode"):  # accepted from Calico YAML, but tortie has no overlay
        f.str(mode, choices=("Never",))

    def egress(e: Fields) -> None:
        # Main (254), local (255), default (253) and unspec (0) belong to the kernel.
        table = e.int("table", 1, 0xFFFFFFFF, required=True)
        if table in (253, 254, 255):
            raise ValidationError("253-255 are the kernel's tables", field="spec.egress.table")
        e.ip("nextHop", required=True, version=net.version)
        e.str("interface", pattern=_IFNAME)

    f.obj_field("egress", egress)


def _ipam_config_spec(f: Fields, meta: dict) -> None:
    if meta["name"] != "default":
        raise ValidationError("the IPAMConfig must be named 'default'", field="metadata.name")
    f.bool("strictAffinity", False)
    f.bool("autoAllocateBlocks", True)
    f.int("maxBlocksPerHost", 0, 1 << 20, default=0)


def _node_spec(f: Fields, meta: dict) -> None:
    def bgp(b: Fields) -> None:
        for fam, version in (("ipv4Address", 4), ("ipv6Address", 6)):
            if b.raw(fam) is not None:
                b.keep(fam, _ip_interface(b.raw(fam), b.at(fam), version))
        b.asn("asNumber")
        b.ip("routeReflectorClusterID", version=4)

    def address(v: Any, where: str) -> dict:
        a = Fields(v, where)
        a.ip("address", required=True)
        a.str("type", choices=("InternalIP", "ExternalIP", "CalicoNodeIP"))
        return a.done()

    f.obj_field("bgp", bgp)
    f.list("addresses", address)


_PEER_IP = re.compile(r"(?P<ip>[0-9.]+|\[[0-9a-fA-F:.]+\]|[0-9a-fA-F:.]+?)(?::(?P<port>\d+))?")


def split_peer_ip(value: str, field: str = "spec.peerIP") -> tuple[str, int]:
    """"10.0.0.1", "10.0.0.1:1179", "fd00::1", "[fd00::1]:1179" -> (address, port)."""
    if value.count(":") > 1 and not value.startswith("["):
        return str(parse_ip(value, field)), 179  # a bare IPv6 address
    m = _PEER_IP.fullmatch(value)
    if not m:
        raise ValidationError(f"{value!r} is not IP or IP:port", field=field)
    port = int(m["port"] or 179)
    if not 1 <= port <= 65535:
        raise ValidationError("port must be 1-65535", field=field)
    return str(parse_ip(m["ip"].strip("[]"), field)), port


def _bgp_peer_spec(f: Fields, meta: dict) -> None:
    peer_ip = f.str("peerIP")
    if peer_ip is not None:
        split_peer_ip(peer_ip)
    f.asn("asNumber")
    f.str("node", pattern=DNS_SUBDOMAIN)
    f.selector("nodeSelector")
    f.selector("peerSelector")
    f.bool("keepOriginalNextHop")
    f.bool("passive")
    f.seconds("holdTime", 3, 65535)
    f.seconds("keepAliveTime", 1, 21845)
    f.str("password", max_len=80)  # TCP MD5 (RFC 2385) key
    f.list("acceptPrefixes", lambda v, where: str(parse_cidr(_string(v, where), where)))
    if f.raw("node") and f.raw("nodeSelector"):
        raise ValidationError("give node or nodeSelector, not both", field="spec.nodeSelector")
    if (peer_ip is None) == (f.raw("peerSelector") is None):
        raise ValidationError("give exactly one of peerIP and peerSelector", field="spec.peerIP")
    if peer_ip is not None and f.raw("asNumber") is None:
        raise ValidationError("is required with peerIP", field="spec.asNumber")


def _bgp_config_spec(f: Fields, meta: dict) -> None:
    if meta["name"] != "default" and not meta["name"].startswith("node."):
        raise ValidationError("must be 'default' or 'node.<nodename>'", field="metadata.name")
    # No defaults stored: a node.<name> configuration overrides only what it sets.
    f.asn("asNumber")
    f.bool("nodeToNodeMeshEnabled")
    f.int("listenPort", 1, 65535)
    f.str("logSeverityScreen", choices=("Debug", "Info", "Warning", "Error", "Fatal"))

    def cidr_item(v: Any, where: str) -> dict:
        c = Fields(v, where)
        c.cidr("cidr", required=True)
        return c.done()

    for name in ("serviceClusterIPs", "serviceExternalIPs", "serviceLoadBalancerIPs"):
        f.list(name, cidr_item)

    def community(v: Any, where: str) -> str:
        if not isinstance(v, str) or not _COMMUNITY.fullmatch(v):
            raise ValidationError(f"{v!r} is not a community (a:b) or large community (a:b:c)", field=where)
        return v

    f.list("communities", community)  # attached to every prefix this node exports


def _wep_spec(f: Fields, meta: dict) -> None:
    f.str("node", required=True, pattern=DNS_SUBDOMAIN)
    f.str("orchestrator", default="k8s")
    f.str("workload")
    f.str("pod")
    f.str("endpoint", default="eth0")
    f.str("containerID")
    f.str("interfaceName", pattern=_IFNAME)
    f.str("mac", pattern=re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}"))

    def net(v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise ValidationError("must be a CIDR string", field=where)
        return str(parse_cidr(v, where))

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("name")
        p.str("protocol", default="TCP", choices=("TCP", "UDP", "SCTP"))
        p.int("port", 1, 65535, required=True)
        return p.done()

    f.list("ipNetworks", net)
    f.list("profiles", lambda v, where: _string(v, where))
    f.list("ports", port)


def _string(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValidationError("must be a string", field=where)
    return v


_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _netpol_spec(f: Fields, meta: dict) -> None:
    """networking.k8s.io/v1 NetworkPolicy, with the API server's defaulting."""
    def label_selector(name: str, sub: Fields) -> None:
        if sub.raw(name) is not None:
            selector.from_k8s(sub.raw(name), sub.at(name))
            sub.keep(name, sub.raw(name))

    def peer(v: Any, where: str) -> dict:
        p = Fields(v, where)
        label_selector("podSelector", p)
        label_selector("namespaceSelector", p)

        def ip_block(b: Fields) -> None:
            net = b.cidr("cidr", required=True, masked=False)

            def inside(v: Any, where: str) -> str:
                ex = parse_cidr(_string(v, where), where, masked=False)
                if ex.version != net.version or not ex.subnet_of(net):
                    raise ValidationError(f"{ex} is not inside {net}", field=where)
                return str(ex)

            b.list("except", inside)

        p.obj_field("ipBlock", ip_block)
        if p.raw("ipBlock") is not None and (p.raw("podSelector") is not None or p.raw("namespaceSelector") is not None):
            raise ValidationError("ipBlock cannot be combined with selectors", field=f"{where}.ipBlock")
        if not p.out:
            raise ValidationError("needs podSelector, namespaceSelector or ipBlock", field=where)
        return p.done()

    def port(v: Any, where: str) -> dict:
        p = Fields(v, where)
        p.str("protocol", default="TCP", choices=("TCP", "UDP", "SCTP"))
        number = p.raw("port")
        if isinstance(number, str):
            p.str("port", pattern=_PORT_NAME, max_len=15)
        elif number is not None:
            p.int("port", 1, 65535)
        if p.raw("endPort") is not None:
            if not isinstance(number, int):
                raise ValidationError("needs a numeric port", field=f"{where}.endPort")
            p.int("endPort", number, 65535)
        return p.done()

    def rule(peers: str) -> Callable[[Any, str], dict]:
        def check(v: Any, where: str) -> dict:
            r = Fields(v, where)
            r.list(peers, peer)
            r.list("ports", port)
            return r.done()
        return check

    label_selector("podSelector", f)
    if f.raw("podSelector") is None:
        raise ValidationError("is required (use {} for all pods)", field="spec.podSelector")
    f.list("ingress", rule("from"))
    f.list("egress", rule("to"))
    types = f.list("policyTypes", lambda v, where: _string(v, where))
    if types is None:
        f.out["policyTypes"] = ["Ingress", *(["Egress"] if f.raw("egress") is not None else [])]
    elif not set(types) <= {"Ingress", "Egress"} or len(set(types)) != len(types):
        raise ValidationError("must be distinct values of Ingress, Egress", field="spec.policyTypes")


def _namespace_spec(f: Fields, meta: dict) -> None:
    f.list("finalizers", _string)


_WEP_NAME = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?")
KINDS: dict[str, Kind] = {
    k.key: k for k in (
        Kind("IPPool", API_VERSION, False, _pool_spec, ("ippools", "pool", "pools"), serialized=True),
        Kind("IPAMConfig", API_VERSION, False, _ipam_config_spec, ("ipamconfigs", "ipamconfiguration")),
        Kind("Node", API_VERSION, False, _node_spec, ("nodes", "no"), spec_required=False),
        Kind("BGPPeer", API_VERSION, False, _bgp_peer_spec, ("bgppeers", "peer", "peers")),
        Kind("BGPConfiguration", API_VERSION, False, _bgp_config_spec,
             ("bgpconfigurations", "bgpconfig", "bgpconfigs"), spec_required=False),
        Kind("WorkloadEndpoint", API_VERSION, True, _wep_spec,
             ("workloadendpoints", "wep", "weps"), name_pattern=_WEP_NAME),
        Kind("NetworkPolicy", "networking.k8s.io/v1", True, _netpol_spec,
             ("networkpolicies", "netpol", "netpols", "policy", "policies")),
        Kind("Namespace", "v1", False, _namespace_spec, ("namespaces", "ns"),
             name_pattern=DNS_LABEL, spec_required=False),
    )
}
_ALIASES = {a: k for k in KINDS.values() for a in (k.key, *k.aliases)}


def kind_for(name: str) -> Kind:
    """The kind for `IPPool`, `ippool`, `ippools`, `pool`, ... (case-insensitive)."""
    kind = _ALIASES.get(name.lower())
    if kind is None:
        raise ValidationError(
            f"unknown resource kind {name!r} (known: {', '.join(k.name for k in KINDS.values())})",
            field="kind")
    return kind


def validate(resource: Any) -> dict:
    """A checked, normalized copy of resource; ValidationError names the bad field."""
    if not isinstance(resource, Mapping):
        raise ValidationError("a resource must be a mapping with apiVersion, kind, metadata, spec")
    kind_name = resource.get("kind")
    if not isinstance(kind_name, str):
        raise ValidationError("is required", field="kind")
    kind = kind_for(kind_name)
    if kind.name != kind_name:
        raise ValidationError(f"{kind_name!r} is not a kind; did you mean {kind.name!r}?", field="kind")
    if resource.get("apiVersion") != kind.api_version:
        raise ValidationError(f"{kind.name} is {kind.api_version!r}, not {resource.get('apiVersion')!r}",
                              field="apiVersion")
    unknown = set(resource) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        field = sorted(unknown)[0]
        raise ValidationError(f"unknown field {field!r}", field=field)
    meta = _metadata(kind, resource.get("metadata"))
    if resource.get("spec") is None and kind.spec_required:
        raise ValidationError("is required", field="spec")
    spec = Fields(resource.get("spec"), "spec")
    kind.spec(spec, meta)
    return {"apiVersion": kind.api_version, "kind": kind.name, "metadata": meta, "spec": spec.done()}


# --- keys ---------------------------------------------------------------------------


def key_for(kind: Kind, name: str, namespace: str | None = None) -> str:
    """The key of one resource, relative to the datastore prefix."""
    if kind.namespaced:
        return f"{kind.prefix()}{namespace or 'default'}/{name}"
    return f"{kind.prefix()}{name}"


def parse_key(relative_key: str) -> tuple[Kind, str | None, str] | None:
    """(kind, namespace, name) of a resource key relative to the prefix, or None."""
    if not relative_key.startswith(RESOURCES):
        return None
    parts = relative_key[len(RESOURCES):].split("/")
    kind = KINDS.get(parts[0])
    if kind is None or len(parts) != (3 if kind.namespaced else 2):
        return None
    return (kind, parts[1], parts[2]) if kind.namespaced else (kind, None, parts[1])


def decode(value: bytes, mod_revision: int) -> dict:
    """A stored resource with its resourceVersion filled in."""
    res = json.loads(value)
    res["metadata"]["resourceVersion"] = str(mod_revision)
    return res


def _encode(res: dict) -> bytes:
    meta = {k: v for k, v in res["metadata"].items() if k != "resourceVersion"}
    return json.dumps({**res, "metadata": meta}, sort_keys=True, separators=(",", ":")).encode()


# --- typed views --------------------------------------------------------------------


class FrozenLabels(dict):
    """Labels of a view: read-only and hashable, so views can live in sets and dict keys."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _read_only(self, *args, **kwargs):
        raise TypeError("the labels of a view are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


@dataclass(frozen=True)
class View:
    """Common metadata of every typed view."""

    KIND: ClassVar[str] = ""
    name: str
    labels: Mapping[str, str]
    resource_version: int

    def __post_init__(self) -> None:
        if not isinstance(self.labels, FrozenLabels):
            object.__setattr__(self, "labels", FrozenLabels(self.labels))

    @classmethod
    def from_resource(cls, resource: Mapping):
        res = validate(resource)
        if res["kind"] != cls.KIND:
            raise ValidationError(f"expected a {cls.KIND}, got {res['kind']}", field="kind")
        meta, spec = res["metadata"], res["spec"]
        return cls(name=meta["name"], labels=FrozenLabels(meta.get("labels", {})),
                   resource_version=int(meta.get("resourceVersion", 0)), **cls._spec(meta, spec))

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Egress:
    table: int
    next_hop: str
    interface: str | None = None


@dataclass(frozen=True)
class IPPool(View):
    KIND: ClassVar[str] = "IPPool"
    cidr: str
    block_size: int
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = False
    node_selector: str = "all()"
    egress: Egress | None = None

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        e = spec.get("egress")
        return dict(cidr=spec["cidr"], block_size=spec["blockSize"], nat_outgoing=spec["natOutgoing"],
                    disabled=spec["disabled"], disable_bgp_export=spec["disableBGPExport"],
                    node_selector=spec["nodeSelector"],
                    egress=Egress(e["table"], e["nextHop"], e.get("interface")) if e else None)

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels may take blocks from this pool."""
        return selector.parse(self.node_selector).matches(node_labels)


@dataclass(frozen=True)
class IPAMConfig(View):
    KIND: ClassVar[str] = "IPAMConfig"
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0  # 0: no limit

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(strict_affinity=spec["strictAffinity"], auto_allocate_blocks=spec["autoAllocateBlocks"],
                    max_blocks_per_host=spec["maxBlocksPerHost"])


@dataclass(frozen=True)
class Node(View):
    KIND: ClassVar[str] = "Node"
    ipv4_address: str | None = None  # "10.0.0.1/24": the BGP address and its subnet
    ipv6_address: str | None = None
    as_number: int | None = None  # None: the cluster's default AS
    route_reflector_cluster_id: str | None = None
    addresses: tuple[str, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        bgp = spec.get("bgp", {})
        return dict(ipv4_address=bgp.get("ipv4Address"), ipv6_address=bgp.get("ipv6Address"),
                    as_number=bgp.get("asNumber"), route_reflector_cluster_id=bgp.get("routeReflectorClusterID"),
                    addresses=tuple(a["address"] for a in spec.get("addresses", ())))

    @property
    def ipv4(self) -> str | None:
        """The bare BGP IPv4 address."""
        return self.ipv4_address.split("/")[0] if self.ipv4_address else None

    @property
    def ipv6(self) -> str | None:
        return self.ipv6_address.split("/")[0] if self.ipv6_address else None


@dataclass(frozen=True)
class BGPPeer(View):
    KIND: ClassVar[str] = "BGPPeer"
    peer_ip: str | None = None  # bare address; None when peerSelector picks nodes as peers
    port: int = 179
    as_number: int | None = None
    node: str | None = None  # only this node peers; None with no nodeSelector: every node
    node_selector: str | None = None
    peer_selector: str | None = None
    keep_original_next_hop: bool = False
    passive: bool = False
    hold_time: int | None = None  # seconds
    keepalive_time: int | None = None
    password: str | None = None
    accept_prefixes: tuple[str, ...] = ()  # what may be imported from an external peer

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        ip, port = split_peer_ip(spec["peerIP"]) if "peerIP" in spec else (None, 179)
        return dict(peer_ip=ip, port=port, as_number=spec.get("asNumber"), node=spec.get("node"),
                    node_selector=spec.get("nodeSelector"), peer_selector=spec.get("peerSelector"),
                    keep_original_next_hop=spec.get("keepOriginalNextHop", False),
                    passive=spec.get("passive", False), hold_time=spec.get("holdTime"),
                    keepalive_time=spec.get("keepAliveTime"), password=spec.get("password"),
                    accept_prefixes=tuple(spec.get("acceptPrefixes", ())))

    def applies_to(self, node: Node) -> bool:
        """Whether `node` is one of the nodes that open this peering."""
        if self.node is not None:
            return self.node == node.name
        return selector.parse(self.node_selector).matches(node.labels)

    def peer_nodes(self, nodes: Iterable[Node]) -> list[Node]:
        """With peerSelector, the nodes this peering points at (else none)."""
        if self.peer_selector is None:
            return []
        sel = selector.parse(self.peer_selector)
        return [n for n in nodes if sel.matches(n.labels)]


@dataclass(frozen=True)
class BGPConfiguration(View):
    KIND: ClassVar[str] = "BGPConfiguration"
    as_number: int | None = None  # None: not set here (see `effective_bgp_config`)
    node_to_node_mesh: bool | None = None
    listen_port: int | None = None
    log_severity: str | None = None
    service_cluster_ips: tuple[str, ...] = ()
    service_external_ips: tuple[str, ...] = ()
    service_load_balancer_ips: tuple[str, ...] = ()
    communities: tuple[str, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        def cidrs(name: str) -> tuple[str, ...]:
            return tuple(c["cidr"] for c in spec.get(name, ()))
        return dict(as_number=spec.get("asNumber"), node_to_node_mesh=spec.get("nodeToNodeMeshEnabled"),
                    listen_port=spec.get("listenPort"), log_severity=spec.get("logSeverityScreen"),
                    service_cluster_ips=cidrs("serviceClusterIPs"),
                    service_external_ips=cidrs("serviceExternalIPs"),
                    service_load_balancer_ips=cidrs("serviceLoadBalancerIPs"),
                    communities=tuple(spec.get("communities", ())))


DEFAULT_AS = 64512
_BGP_DEFAULTS = BGPConfiguration(name="default", labels={}, resource_version=0, as_number=DEFAULT_AS,
                                 node_to_node_mesh=True, listen_port=179, log_severity="Info")


def effective_bgp_config(default: BGPConfiguration | None,
                         node: BGPConfiguration | None = None) -> BGPConfiguration:
    """Built-in defaults, overridden by `default`, overridden by `node.<name>`."""
    eff = _BGP_DEFAULTS
    for layer in (default, node):
        if layer is not None:
            eff = replace(eff, **{f.name: getattr(layer, f.name) for f in fields(layer)
                                  if getattr(layer, f.name) not in (None, ())
                                  and f.name not in ("name", "labels", "resource_version")})
    return eff


@dataclass(frozen=True)
class WorkloadEndpoint(View):
    KIND: ClassVar[str] = "WorkloadEndpoint"
    namespace: str = "default"
    node: str = ""
    orchestrator: str = "k8s"
    workload: str | None = None
    pod: str | None = None
    endpoint: str = "eth0"
    container_id: str | None = None
    interface_name: str | None = None  # the host side of the pod's veth
    mac: str | None = None
    ip_networks: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return dict(namespace=meta["namespace"], node=spec["node"], orchestrator=spec["orchestrator"],
                    workload=spec.get("workload"), pod=spec.get("pod"), endpoint=spec["endpoint"],
                    container_id=spec.get("containerID"), interface_name=spec.get("interfaceName"),
                    mac=spec.get("mac"), ip_networks=tuple(spec.get("ipNetworks", ())),
                    profiles=tuple(spec.get("profiles", ())))


@dataclass(frozen=True)
class Namespace(View):
    KIND: ClassVar[str] = "Namespace"

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        return {}


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port; a string is a named container port
    end_port: int | None = None  # with port: the range port..end_port


@dataclass(frozen=True)
class PolicyPeer:
    """One `from`/`to` entry: selectors (None: not given) or an ipBlock."""

    pod_selector: selector.Selector | None = None
    namespace_selector: selector.Selector | None = None
    cidr: str | None = None
    except_cidrs: tuple[str, ...] = ()

    def matches_pod(self, pod_labels: Mapping[str, str], pod_namespace: str,
                    namespace_labels: Mapping[str, str], policy_namespace: str) -> bool:
        """Kubernetes' rule: podSelector alone means pods of the policy's namespace;
        namespaceSelector alone, every pod of the matching namespaces; both, both."""
        if self.cidr is not None:
            return False  # ipBlock is about addresses, see `matches_address`
        if self.namespace_selector is None:
            if pod_namespace != policy_namespace:
                return False
        elif not self.namespace_selector.matches(namespace_labels):
            return False
        return self.pod_selector is None or self.pod_selector.matches(pod_labels)

    def matches_address(self, address: str) -> bool:
        if self.cidr is None:
            return False
        ip = ipaddress.ip_address(address)
        net = ipaddress.ip_network(self.cidr)
        return ip.version == net.version and ip in net and not any(
            ip in ipaddress.ip_network(c) for c in self.except_cidrs)


@dataclass(frozen=True)
class PolicyRule:
    peers: tuple[PolicyPeer, ...] = ()  # empty: from/to anywhere
    ports: tuple[PolicyPort, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True)
class NetworkPolicy(View):
    """A networking.k8s.io/v1 NetworkPolicy with its selectors parsed."""

    KIND: ClassVar[str] = "NetworkPolicy"
    namespace: str = "default"
    pod_selector: selector.Selector = selector.ALL
    policy_types: tuple[str, ...] = ("Ingress",)
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    @staticmethod
    def _spec(meta: dict, spec: dict) -> dict:
        def rules(items: list, peers: str) -> tuple[PolicyRule, ...]:
            return tuple(PolicyRule(
                peers=tuple(_policy_peer(p) for p in r.get(peers) or ()),
                ports=tuple(PolicyPort(p["protocol"], p.get("port"), p.get("endPort")) for p in r.get("ports") or ()),
            ) for r in items)
        return dict(namespace=meta["namespace"], pod_selector=selector.from_k8s(spec["podSelector"]),
                    policy_types=tuple(spec["policyTypes"]), ingress=rules(spec.get("ingress") or [], "from"),
                    egress=rules(spec.get("egress") or [], "to"))

    def selects(self, pod_labels: Mapping[str, str], pod_namespace: str) -> bool:
        """Whether the policy applies to this pod (then only what its rules allow gets in/out)."""
        return pod_namespace == self.namespace and self.pod_selector.matches(pod_labels)


def _policy_peer(p: dict) -> PolicyPeer:
    block = p.get("ipBlock")
    return PolicyPeer(
        pod_selector=selector.from_k8s(p["podSelector"]) if "podSelector" in p else None,
        namespace_selector=selector.from_k8s(p["namespaceSelector"]) if "namespaceSelector" in p else None,
        cidr=block["cidr"] if block else None,
        except_cidrs=tuple(block.get("except", ())) if block else (),
    )


VIEWS: dict[str, type[View]] = {
    v.KIND.lower(): v for v in (IPPool, IPAMConfig, Node, BGPPeer, BGPConfiguration, WorkloadEndpoint,
                                 NetworkPolicy, Namespace)
}


# --- the store ------------------------------------------------------------------------


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

    def apply(self, resource: Mapping) -> dict:
        """Create, or replace what is there (guarded by metadata.resourceVersion if given)."""
        return self._write(resource, "apply")

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
            serial_key = self.prefix + SERIALS + kind.key
            serial = self.client.get(serial_key)
            if check is not None:
                check(self.list(kind))
            txn.guard(serial_key, serial.mod_revision if serial else 0)
            txn.put(serial_key, str(int(serial.value) + 1 if serial else 1).encode())
        elif check is not None:
            check(self.list(kind))
        return self.client.transaction(txn)

    def _write(self, resource: Mapping, mode: str) -> dict:
        res = validate(resource)
        kind = KINDS[res["kind"].lower()]
        meta = res["metadata"]
        name, namespace = meta["name"], meta.get("namespace")
        key = self._key(kind, name, namespace)
        wanted_rev = meta.pop("resourceVersion", None)
        where = f"{kind.name} {name!r}" + (f" in namespace {namespace}" if kind.namespaced else "")
        for _ in range(self.retries):
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
    for other in pools:
        if other["metadata"]["name"] == new["metadata"]["name"]:
            continue
        theirs = ipaddress.ip_network(other["spec"]["cidr"])
        if theirs.version == net.version and net.overlaps(theirs):
            raise ValidationError(f"{net} overlaps IPPool {other['metadata']['name']!r} ({theirs})",
                                  field="spec.cidr")


CHECKS: dict[str, Callable[[dict, dict | None, list[dict]], None]] = {"ippool": _check_pool}


__all__ = [
    "API_VERSION", "KINDS", "BGPConfiguration", "BGPPeer", "Egress", "IPAMConfig", "IPPool", "Kind", "Namespace",
    "NetworkPolicy", "Node", "PolicyPeer", "PolicyPort", "PolicyRule",
    "ResourceStore", "View", "WorkloadEndpoint", "decode", "effective_bgp_config", "key_for", "kind_for",
    "parse_key", "split_peer_ip", "validate",
]
