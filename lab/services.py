"""Services in the lab: `tortie-lab svc add|del|show`, and the Lab methods behind them.

The lab's nodes run tortie's proxy (TORTIE_PROXY_MODE=tortie); the lab plays the API
server's part (`lab.svcops`, run in the control namespace): it allocates cluster IPs from
`CLUSTER_CIDR`, load-balancer addresses from the IPPool `lab-loadbalancer` (`LB_CIDR`,
allowedUses LoadBalancer) and node ports, and keeps each
Service's EndpointSlice current as pods come, go and change labels (`svc_sync`, called by
the pod commands while the lab has Services).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from tortie.errors import ValidationError

CLUSTER_CIDR = "10.96.0.0/16"  # the lab's serviceClusterIPs
LB_CIDR = "10.97.0.0/24"  # the lab's serviceLoadBalancerIPs, and its LoadBalancer IPPool
_PORT = re.compile(r"(\d+)(?:/(tcp|udp|sctp))?(?::(\d+))?", re.I)


def parse_svc_port(item: str, index: int, count: int) -> dict:
    """`PORT[/tcp|/udp|/sctp][:TARGETPORT]` as a Service port item."""
    m = _PORT.fullmatch(item)
    if not m or not 1 <= int(m[1]) <= 65535 or (m[3] and not 1 <= int(m[3]) <= 65535):
        raise ValidationError(f"{item!r}: want PORT[/tcp|/udp|/sctp][:TARGETPORT], ports 1-65535", field="port")
    proto = (m[2] or "tcp").upper()
    port = {"port": int(m[1]), "protocol": proto, "targetPort": int(m[3] or m[1])}
    if count > 1:
        port["name"] = f"{proto.lower()}-{m[1]}"
    return port


def service_spec(selector: str, ports: list[str], kind: str = "ClusterIP", etp: str | None = None,
                 affinity: str | None = None, external_ips: list[str] = ()) -> dict:
    sel = {}
    for item in filter(None, selector.split(",")):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(f"selector {item!r}: want k=v[,k=v]", field="selector")
        sel[k] = v
    spec: dict[str, Any] = {"type": kind, "selector": sel,
                            "ports": [parse_svc_port(p, i, len(ports)) for i, p in enumerate(ports)]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if affinity:
        spec["sessionAffinity"] = affinity
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    return spec


def lab_resources() -> list[dict]:
    """What `up` writes for Services: the IPPool load-balancer addresses come from."""
    return [{"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "lab-loadbalancer"},
             "spec": {"cidr": LB_CIDR, "allowedUses": ["LoadBalancer"], "disableBGPExport": True}}]


class LabServices:
    """The Service half of `tortie.lab.cluster.Lab` (a mixin: it uses the lab's `_dsops`)."""

    def _services_marker(self) -> str:
        from tortie.lab import state

        return os.path.join(state.lab_dir(self.name), "services")  # type: ignore[attr-defined]

    def svc_add(self, ref: str, selector: str, ports: list[str], *, kind: str = "ClusterIP",
                external_traffic_policy: str | None = None, affinity: str | None = None,
                external_ips: list[str] = ()) -> dict:
        """Create a Service (cluster IP, node ports, LB address allocated) and its
        EndpointSlice from the matching pods; the `svc show` document."""
        spec = service_spec(selector, ports, kind, external_traffic_policy, affinity, external_ips)
        with open(self._services_marker(), "a"):
            pass  # from now on the pod commands keep the slices current
        return self._dsops("add", ref, "--spec", json.dumps(spec), "--cluster-cidr", CLUSTER_CIDR,  # type: ignore[attr-defined]
                           module="tortie.lab.svcops")

    def svc_del(self, ref: str) -> None:
        self._dsops("del", ref, module="tortie.lab.svcops")  # type: ignore[attr-defined]

    def svc_show(self, ref: str) -> dict:
        return self._dsops("show", ref, module="tortie.lab.svcops")  # type: ignore[attr-defined]

    def svc_list(self) -> list[dict]:
        if not os.path.exists(self._services_marker()):
            return []
        return self._dsops("list", module="tortie.lab.svcops")  # type: ignore[attr-defined]

    def svc_sync(self) -> None:
        """Every Service's EndpointSlice from the pods as they are now (after a pod command)."""
        if os.path.exists(self._services_marker()):
            self._dsops("sync", module="tortie.lab.svcops")  # type: ignore[attr-defined]

    def svc_address(self, ref: str) -> str:
        """The cluster IP of `svc:NS/NAME` (a probe's destination)."""
        ip = self.svc_show(ref)["clusterIP"]
        if not ip or ip == "None":
            raise ValidationError(f"service {ref} has no cluster IP", field="dst")
        return ip


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    svc = sub.add_parser("svc", parents=[common], help="add, delete, show Services")
    ssub = svc.add_subparsers(dest="svc_cmd", required=True)
    add = ssub.add_parser("add", parents=[common])
    add.add_argument("svc", metavar="NAMESPACE/NAME")
    add.add_argument("--selector", required=True, help="k=v[,k=v]")
    add.add_argument("--port", action="append", required=True, help="PORT[/tcp|/udp|/sctp][:TARGETPORT]")
    add.add_argument("--type", default="ClusterIP", choices=("ClusterIP", "NodePort", "LoadBalancer"))
    add.add_argument("--external-traffic-policy", choices=("Cluster", "Local"))
    add.add_argument("--affinity", choices=("ClientIP",))
    add.add_argument("--external-ip", action="append", default=[])
    dele = ssub.add_parser("del", parents=[common])
    dele.add_argument("svc", metavar="NAMESPACE/NAME")
    show = ssub.add_parser("show", parents=[common])
    show.add_argument("svc", metavar="NAMESPACE/NAME")
    show.add_argument("-o", "--output", choices=("json", "text"), default="text")


def run(lab, args) -> int:
    if args.svc_cmd == "add":
        doc = lab.svc_add(args.svc, args.selector, args.port, kind=args.type,
                          external_traffic_policy=args.external_traffic_policy, affinity=args.affinity,
                          external_ips=args.external_ip)
        for k in ("nodePorts", "loadBalancerIP", "externalIPs", "endpoints"):
            if doc.get(k):
                print(f"{k}: {doc[k]}")
        print(doc["clusterIP"])  # last: scripts take it with tail -1
    elif args.svc_cmd == "del":
        lab.svc_del(args.svc)
        print(f"service {args.svc} deleted")
    else:
        doc = lab.svc_show(args.svc)
        print(json.dumps(doc, indent=2) if args.output == "json" else
              "\n".join(f"{k}: {v}" for k, v in doc.items()))
    return 0


__all__ = ["CLUSTER_CIDR", "LB_CIDR", "LabServices", "add_parser", "lab_resources", "parse_svc_port", "run",
           "service_spec"]
