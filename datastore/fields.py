"""The validation mini-language of resources: readers that check and normalize one object.

`Fields(obj, path)` reads the fields of one object (`f.str`, `f.int`, `f.cidr`, `f.list`,
`f.obj_field`, ...), keeps the normalized value of each and, with `done()`, refuses any
field nobody asked for. Every ValidationError names the offending field by its path
(`spec.egress.table`, `spec.ipNetworks[1]`). Pure: no I/O, no knowledge of kinds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tortie.datastore import selector
from tortie.errors import ValidationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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


def ip_interface(value: Any, field: str, version: int) -> str:
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

# --- names and labels ----------------------------------------------------------------

DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
IFNAME = re.compile(r"[^\s/:]{1,15}")
# Kubernetes' IANA_SVC_NAME (a named container port): lowercase letters, digits and inner
# single dashes, 1-15 characters, at least one letter.
PORT_NAME = re.compile(r"(?=[a-z0-9-]{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")


def label_map(value: Any, field: str, values_too: bool = True) -> dict[str, str]:
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


def string(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValidationError("must be a string", field=where)
    return v
