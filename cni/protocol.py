"""The CNI protocol on the agent side: the shim's wire format, request parsing and
validation, and result/error JSON for each cniVersion.

Used by `tortie.agent.cni_server`; the shim (`tortie.cni.shim`) is a separate
stdlib-only file that speaks the same framing.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tortie.datastore.fields import PORT_NAME
from tortie.errors import TortieError

MAGIC = b"TCNI1"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# CNI spec error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_LIMITED = 51
GENERIC = 999

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KNOWN_ARGS = frozenset(
    {"K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IgnoreUnknown"}
)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class CNIError(Exception):
    """A CNI error result: printed as `{"cniVersion","code","msg","details"}`."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    @classmethod
    def from_exception(cls, exc: BaseException) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        if isinstance(exc, TortieError):
            return cls(exc.cni_code, str(exc), type(exc).__name__)
        return cls(GENERIC, f"internal error: {exc}", type(exc).__name__)

    def to_json(self, cni_version: str) -> bytes:
        return _dumps({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


# ---- wire format -------------------------------------------------------------------


def encode_request(env: dict[str, str], stdin: bytes, plugin: str = "tortie") -> bytes:
    """The shim's request (used by tests and benchmarks that talk to the server directly)."""
    items = [f"{k}={v}".encode() for k, v in env.items() if k.startswith("CNI_")]
    items.append(f"_TORTIE_PLUGIN={plugin}".encode())
    block = b"\0".join(items)
    return MAGIC + len(block).to_bytes(4, "big") + block + len(stdin).to_bytes(4, "big") + stdin


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """(env, stdin) from one framed request; raises CNIError(DECODE_FAILURE)."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise CNIError(DECODE_FAILURE, "malformed request from the CNI shim")
    at = len(MAGIC)
    n = int.from_bytes(data[at:at + 4], "big")
    block = data[at + 4:at + 4 + n]
    at += 4 + n
    m = int.from_bytes(data[at:at + 4], "big")
    stdin = data[at + 4:at + 4 + m]
    if len(block) != n or len(stdin) != m:
        raise CNIError(DECODE_FAILURE, "truncated request from the CNI shim")
    env: dict[str, str] = {}
    for item in block.split(b"\0") if block else ():
        key, _, value = item.decode("utf-8", "replace").partition("=")
        env[key] = value
    return env, stdin


def encode_response(status: int, body: bytes) -> bytes:
    return bytes((status & 0xFF,)) + body


# ---- requests ----------------------------------------------------------------------


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS `K=V;K2=V2`; unknown keys are refused unless IgnoreUnknown is true."""
    args: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENV, f"CNI_ARGS: malformed item {part!r}")
        args[key] = value
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(set(args) - _KNOWN_ARGS)
    if unknown and not ignore:
        raise CNIError(INVALID_ENV, f"CNI_ARGS: unknown argument(s) {', '.join(unknown)}")
    return args


def _labels(config: dict) -> dict[str, str]:
    raw = ((config.get("args") or {}).get("cni") or {}).get("labels")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, list):  # [{"key": k, "value": v}, ...] as Calico accepts
        out = {}
        for item in raw:
            if not isinstance(item, dict) or "key" not in item:
                raise CNIError(INVALID_CONFIG, "args.cni.labels: items need key and value")
            out[str(item["key"])] = str(item.get("value", ""))
        return out
    raise CNIError(INVALID_CONFIG, "args.cni.labels: must be an object or a list")


def _ports(config: dict) -> tuple[dict, ...]:
    """`args.cni.ports`: the pod's named ports, [{name, protocol (default TCP), port or
    containerPort}], as WorkloadEndpoint spec.ports items (sorted, without repeats)."""
    raw = ((config.get("args") or {}).get("cni") or {}).get("ports")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CNIError(INVALID_CONFIG, "args.cni.ports: must be a list")
    out = set()
    for item in raw:
        port = item.get("port", item.get("containerPort")) if isinstance(item, dict) else None
        name = item.get("name") if isinstance(item, dict) else None
        protocol = (item.get("protocol") or "TCP") if isinstance(item, dict) else None
        if not (isinstance(name, str) and PORT_NAME.fullmatch(name)):
            raise CNIError(INVALID_CONFIG, f"args.cni.ports: {name!r} is not a port name (IANA_SVC_NAME)")
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise CNIError(INVALID_CONFIG, f"args.cni.ports: {protocol!r} is not TCP, UDP or SCTP")
        if type(port) is not int or not 1 <= port <= 65535:
            raise CNIError(INVALID_CONFIG, f"args.cni.ports: {name}: {port!r} is not a port number")
        out.add((name, protocol, port))
    return tuple({"name": n, "protocol": proto, "port": port} for n, proto, port in sorted(out))


# The least MTU a link must carry: IPv4 (RFC 791) and IPv6 (RFC 8200). Under 1280 the
# kernel takes IPv6 off the interface without a word, so a dual-stack pod would come up
# with its IPv6 address gone: refused instead.
MTU_MIN = {4: 68, 6: 1280}


def check_mtu(config: dict, ipv6: bool) -> int:
    """The network config's `mtu` for a pod with (`ipv6`) or without an IPv6 address; 0
    when it is not set (the kernel's default)."""
    raw = config.get("mtu")
    if raw is None or raw == 0:
        return 0
    value = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
    if type(value) is not int:
        raise CNIError(INVALID_CONFIG, f"mtu: {raw!r} is not a number")
    least = MTU_MIN[6 if ipv6 else 4]
    if not least <= value <= 65535:
        why = " (an IPv6 pool needs at least 1280, RFC 8200)" if ipv6 and value < least else ""
        raise CNIError(INVALID_CONFIG, f"mtu: {value} is outside {least}-65535{why}")
    return value


@dataclass(frozen=True)
class CNIRequest:
    command: str
    plugin: str  # "tortie" or "tortie-ipam": the name the shim ran as
    cni_version: str
    config: dict
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: str = ""
    args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    ports: tuple[dict, ...] = ()  # named ports from args.cni.ports

    @property
    def network_name(self) -> str:
        return str(self.config.get("name", ""))

    @property
    def handle(self) -> str:
        return f"{self.network_name}.{self.container_id}"

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def runtime_config(self) -> dict:
        return dict(self.config.get("runtimeConfig") or {})

    @property
    def prev_result(self) -> Result | None:
        prev = self.config.get("prevResult")
        return Result.from_json(prev) if isinstance(prev, dict) else None

    @property
    def ipam_config(self) -> dict:
        return dict(self.config.get("ipam") or {})

    @property
    def is_ipam(self) -> bool:
        return self.plugin.endswith("tortie-ipam")


def version_of(stdin: bytes) -> str:
    """Best-effort cniVersion to report errors in, before the config is validated."""
    try:
        v = json.loads(stdin).get("cniVersion")
    except Exception:
        return SUPPORTED_VERSIONS[-1]
    return v if v in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def parse_request(env: dict[str, str], stdin: bytes) -> CNIRequest:
    """Validate the CNI_* environment and the network config; raises CNIError."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CNIError(INVALID_ENV, f"CNI_COMMAND {command!r} is not a CNI verb")
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODE_FAILURE, "network config on stdin is not JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network config on stdin is not a JSON object")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    plugin = env.get("_TORTIE_PLUGIN", "tortie")
    if command in ("STATUS", "GC") and _version_key(version) < (1, 1, 0):
        raise CNIError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, got {version}")
    if command == "CHECK" and _version_key(version) < (0, 4, 0):
        raise CNIError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, got {version}")
    if not isinstance(config.get("name"), str) or not config["name"]:
        raise CNIError(INVALID_CONFIG, "network config: name is required")
    if not isinstance(config.get("type"), str) or not config["type"]:
        raise CNIError(INVALID_CONFIG, "network config: type is required")
    if command in ("VERSION", "STATUS", "GC"):
        return CNIRequest(command=command, plugin=plugin, cni_version=version, config=config,
                          path=env.get("CNI_PATH", ""))

    missing = [k for k in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH") if not env.get(k)]
    if command != "DEL" and not env.get("CNI_NETNS"):
        missing.append("CNI_NETNS")
    if missing:
        raise CNIError(INVALID_ENV, f"required environment variable(s) not set: {', '.join(missing)}")
    cid = env["CNI_CONTAINERID"]
    if not _CONTAINER_ID.match(cid):
        raise CNIError(INVALID_ENV, f"CNI_CONTAINERID {cid!r} is not a valid container id")
    ifname = env["CNI_IFNAME"]
    if len(ifname) > 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n"):
        raise CNIError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return CNIRequest(
        command=command, plugin=plugin, cni_version=version, config=config,
        container_id=cid, netns=env.get("CNI_NETNS", ""), ifname=ifname,
        path=env["CNI_PATH"], args=args, labels=_labels(config), ports=_ports(config),
    )


# ---- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: str  # CIDR, e.g. 10.0.0.5/32
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces

    @property
    def family(self) -> int:
        return ipaddress.ip_interface(self.address).version


@dataclass(frozen=True)
class RouteSpec:
    dst: str
    gw: str = ""


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    dns: dict = field(default_factory=dict)

    def chained_after(self, prev: Result | None) -> Result:
        """This result appended to a previous plugin's result (interface indices shifted)."""
        if prev is None:
            return self
        shift = len(prev.interfaces)
        ips = tuple(
            IPConfig(ip.address, ip.gateway, None if ip.interface is None else ip.interface + shift)
            for ip in self.ips
        )
        return Result(
            interfaces=prev.interfaces + self.interfaces,
            ips=prev.ips + ips,
            routes=prev.routes + tuple(r for r in self.routes if r not in prev.routes),
            dns=self.dns or prev.dns,
        )

    def to_dict(self, cni_version: str) -> dict:
        legacy = _version_key(cni_version) < (1, 0, 0)
        out: dict[str, Any] = {"cniVersion": cni_version}
        if self.interfaces:
            out["interfaces"] = []
            for itf in self.interfaces:
                d = {"name": itf.name}
                if itf.mac:
                    d["mac"] = itf.mac
                if itf.sandbox:
                    d["sandbox"] = itf.sandbox
                out["interfaces"].append(d)
        ips = []
        for ip in self.ips:
            d: dict[str, Any] = {}
            if legacy:
                d["version"] = str(ip.family)
            d["address"] = ip.address
            if ip.gateway:
                d["gateway"] = ip.gateway
            if ip.interface is not None:
                d["interface"] = ip.interface
            ips.append(d)
        out["ips"] = ips
        if self.routes:
            out["routes"] = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})} for r in self.routes]
        out["dns"] = dict(self.dns)
        return out

    def to_json(self, cni_version: str) -> bytes:
        return _dumps(self.to_dict(cni_version))

    @classmethod
    def from_json(cls, d: dict) -> Result:
        """Any supported version's result (prevResult); `version` in ips is ignored."""
        try:
            return cls(
                interfaces=tuple(
                    Interface(i["name"], i.get("mac", ""), i.get("sandbox", ""))
                    for i in d.get("interfaces") or ()
                ),
                ips=tuple(
                    IPConfig(ip["address"], ip.get("gateway", ""), ip.get("interface"))
                    for ip in d.get("ips") or ()
                ),
                routes=tuple(RouteSpec(r["dst"], r.get("gw", "")) for r in d.get("routes") or ()),
                dns=dict(d.get("dns") or {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise CNIError(DECODE_FAILURE, f"prevResult is malformed: {exc}") from None


def version_result(cni_version: str) -> bytes:
    return _dumps({"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)})
