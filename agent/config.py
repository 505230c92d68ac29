"""The agent's settings: environment variables (TORTIE_*) or a YAML/JSON file
(TORTIE_CONFIG_FILE) whose keys are the same names without the prefix, lower case."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field, replace

from tortie.agent import router_id
from tortie.datastore.etcd import EtcdConfig
from tortie.errors import ValidationError
from tortie.policy.host_rules import FAILSAFE_INBOUND, FAILSAFE_OUTBOUND, parse_ports


@dataclass(frozen=True)
class AgentConfig:
    nodename: str
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    node_ip: str | None = None  # IPv4 interface address with prefix, e.g. 10.99.0.11/24
    node_ip6: str | None = None  # IPv6 interface address with prefix: BGP over IPv6, IPv6 peers
    router_id: str | None = None  # an IPv4 address or "hash" (agent.router_id); None: derived
    as_number: int | None = None
    cni_socket: str = "/run/tortie/cni.sock"
    state_dir: str = "/run/tortie"
    health_host: str = "127.0.0.1"  # as Felix: the kubelet probes from the node itself
    health_port: int = 9099
    metrics_host: str = "0.0.0.0"  # Prometheus scrapes from elsewhere; set an address to narrow it
    metrics_port: int = 9091
    resync_interval: float = 90.0  # Felix's route refresh interval
    bgp_enabled: bool = True
    # the restart time our OPEN offers: how long peers keep our routes after we vanish
    bgp_graceful_restart: int = 120
    log_format: str | None = None
    # Calico's failsafeInbound/OutboundHostPorts: open on host endpoints whatever the
    # policies say ("tcp:22,udp:68", or "none"); the health port is added to the inbound ones
    failsafe_inbound_host_ports: str = FAILSAFE_INBOUND
    failsafe_outbound_host_ports: str = FAILSAFE_OUTBOUND
    # Which Service proxy runs on this node: tortie's own (nftables) or none (a cluster that
    # keeps kube-proxy: only the advertisement of Service addresses runs).
    proxy_mode: str = "none"

    @property
    def node_address(self) -> str | None:
        return self.node_ip.split("/")[0] if self.node_ip else None


_INT_FIELDS = {"as_number", "health_port", "metrics_port", "bgp_graceful_restart"}
_FLOAT_FIELDS = {"resync_interval"}
_BOOL_FIELDS = {"bgp_enabled"}
_KEYS = (
    "nodename", "node_ip", "node_ip6", "router_id", "as_number", "cni_socket", "state_dir", "health_host",
    "health_port", "metrics_host", "metrics_port", "resync_interval", "bgp_enabled", "bgp_graceful_restart", "log_format",
    "failsafe_inbound_host_ports", "failsafe_outbound_host_ports",
    "proxy_mode",
)
PROXY_MODES = ("tortie", "none")


def _coerce(key: str, value: str):
    try:
        if key in _INT_FIELDS:
            return int(value)
        if key in _FLOAT_FIELDS:
            return float(value)
    except ValueError:
        raise ValidationError(f"not a number: {value!r}", field=key) from None
    if key in _BOOL_FIELDS:
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValidationError(f"not a boolean: {value!r}", field=key)
    return value


def _autodetect_ipv4() -> str | None:
    """First global IPv4 address on an interface that is up (Calico's first-found)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        up = {link["index"] for link in ipr.get_links() if link["flags"] & 1}
        for addr in ipr.get_addr(family=socket.AF_INET):
            ip = addr.get_attr("IFA_ADDRESS")
            if addr["index"] in up and not ipaddress.ip_address(ip).is_loopback and addr["scope"] == 0:
                return f"{ip}/{addr['prefixlen']}"
    return None


def load(env: dict[str, str] | None = None) -> AgentConfig:
    env = dict(os.environ if env is None else env)
    values: dict = {}
    path = env.get("TORTIE_CONFIG_FILE")
    if path:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ValidationError(f"cannot read config file: {exc}", field="TORTIE_CONFIG_FILE") from exc
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        for k, v in data.items():
            if k.startswith("etcd_"):
                env.setdefault("TORTIE_" + k.upper(), str(v))
            elif k in _KEYS:
                values[k] = _coerce(k, v) if isinstance(v, str) else v
            else:
                raise ValidationError(f"unknown setting {k!r}", field=path)
    for k in _KEYS:
        if f"TORTIE_{k.upper()}" in env:
            values[k] = _coerce(k, env[f"TORTIE_{k.upper()}"])
    values.setdefault("nodename", socket.gethostname())
    cfg = AgentConfig(etcd=EtcdConfig.from_env(env), **values)
    for key in ("health_host", "metrics_host"):
        try:
            ipaddress.ip_address(getattr(cfg, key))
        except ValueError:
            raise ValidationError(f"not an IP address: {getattr(cfg, key)!r}", field=f"TORTIE_{key.upper()}") from None
    for key in ("failsafe_inbound_host_ports", "failsafe_outbound_host_ports"):
        parse_ports(getattr(cfg, key), f"TORTIE_{key.upper()}")
    if cfg.proxy_mode not in PROXY_MODES:
        raise ValidationError(f"must be one of {', '.join(PROXY_MODES)}, not {cfg.proxy_mode!r}",
                              field="TORTIE_PROXY_MODE")
    for key, version in (("node_ip", 4), ("node_ip6", 6)):
        value = getattr(cfg, key)
        try:
            if value and ipaddress.ip_interface(value).version != version:
                raise ValueError
        except ValueError:
            raise ValidationError(f"not an IPv{version} address: {value!r}", field=f"TORTIE_{key.upper()}") from None
    if cfg.router_id:
        router_id.check(cfg.router_id)
    if not cfg.node_ip and cfg.bgp_enabled:
        cfg = replace(cfg, node_ip=_autodetect_ipv4())
    return cfg
