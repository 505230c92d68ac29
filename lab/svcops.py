"""The lab's Service operations, run inside the lab's control namespace (as `dsops`).

A lab has no Kubernetes API server, so this module does what it and its controllers do for
a Service: allocate the cluster IP, node ports, the load-balancer address (`kube.lb_ipam`,
as tortie-controller would) and the health
check node port, and keep one EndpointSlice per Service (`<name>-lab`, managed-by
tortie-lab) listing the ready WorkloadEndpoints its selector matches. `sync` redoes the
slices after pods come, go or change labels. Each command prints one JSON document.

    add NS/NAME --spec JSON --cluster-cidr C     -> show document (LB address from the LoadBalancer pools)
    del NS/NAME | show NS/NAME | list | sync
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.kinds_service import NODE_PORT_RANGE, SERVICE_NAME_LABEL
from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound, TortieError, ValidationError
from tortie.kube import lb_ipam

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LAB = "tortie-lab"


def _free(net: str, used: set[str]) -> str:
    for ip in ipaddress.ip_network(net).hosts():
        if str(ip) not in used:
            return str(ip)
    raise ValidationError(f"no free address left in {net}", field="clusterIP")


def add(store: ResourceStore, ref: str, spec: dict, cluster_cidr: str) -> dict:
    ns, name = ref.split("/", 1)
    services = store.list("Service")
    used_ips = {a for s in services for a in (s["spec"].get("clusterIP"), *s["spec"].get("externalIPs", ()),
                                              *_lb_ips(s)) if a}
    used_ports = {(p["nodePort"], p["protocol"]) for s in services for p in s["spec"].get("ports", ())
                  if "nodePort" in p} | {(s["spec"]["healthCheckNodePort"], "TCP") for s in services
                                         if s["spec"].get("healthCheckNodePort")}
    spec = dict(spec)
    spec.setdefault("clusterIP", _free(cluster_cidr, used_ips))
    kind = spec.get("type", "ClusterIP")

    def node_port(proto: str) -> int:
        for port in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1):
            if (port, proto) not in used_ports:
                used_ports.add((port, proto))
                return port
        raise ValidationError("no free node port", field="nodePort")

    if kind in ("NodePort", "LoadBalancer"):
        spec["ports"] = [{**p, "nodePort": p.get("nodePort") or node_port(p.get("protocol", "TCP"))}
                         for p in spec["ports"]]
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}
    if kind == "LoadBalancer":
        if spec.get("externalTrafficPolicy") == "Local":
            spec["healthCheckNodePort"] = node_port("TCP")
        # as tortie-controller does: from the IPPools with allowedUses [LoadBalancer]
        lb = lb_ipam.choose(doc, store.list("IPPool"), used_ips)
        if lb is not None:
            doc["status"] = {"loadBalancer": {"ingress": [{"ip": lb, "ipMode": "VIP"}]}}
    store.create(doc)
    _sync_one(store, store.get("Service", name, ns))
    return show(store, ref)


def _lb_ips(svc: dict) -> list[str]:
    return [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress", ()) if i.get("ip")]


def _slice_name(svc: dict) -> str:
    return f"{svc['metadata']['name']}-lab"


def delete(store: ResourceStore, ref: str) -> dict:
    ns, name = ref.split("/", 1)
    svc = store.get("Service", name, ns)
    store.delete("Service", name, ns)
    try:
        store.delete("EndpointSlice", _slice_name(svc), ns)
    except NotFound:
        pass
    return {"deleted": ref}


def show(store: ResourceStore, ref: str) -> dict:
    ns, name = ref.split("/", 1)
    svc = store.get("Service", name, ns)
    try:
        eps = store.get("EndpointSlice", _slice_name(svc), ns)
    except NotFound:
        eps = {"endpoints": []}
    s = svc["spec"]
    lb = _lb_ips(svc)
    return {
        "name": ref, "type": s["type"], "clusterIP": s.get("clusterIP"),
        "ports": [{"port": p["port"], "protocol": p["protocol"], "targetPort": p["targetPort"]} for p in s["ports"]],
        "nodePorts": {str(p["port"]): p["nodePort"] for p in s["ports"] if "nodePort" in p},
        "loadBalancerIP": lb[0] if lb else None, "externalIPs": s.get("externalIPs", []),
        "externalTrafficPolicy": s.get("externalTrafficPolicy"), "sessionAffinity": s.get("sessionAffinity"),
        "healthCheckNodePort": s.get("healthCheckNodePort"),
        "endpoints": sorted(f"{(e.get('targetRef') or {}).get('namespace', ns)}/{e['targetRef']['name']}"
                            for e in eps["endpoints"] if e.get("targetRef")),
    }


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _sync_one(store: ResourceStore, svc: dict, weps: list[dict] | None = None) -> None:
    ns = svc["metadata"]["namespace"]
    selector = svc["spec"].get("selector")
    if selector is None:
        return  # no selector: endpoints are the user's to write
    weps = store.list("WorkloadEndpoint", ns) if weps is None else [w for w in weps
                                                                   if w["metadata"]["namespace"] == ns]
    endpoints = []
    for w in sorted(weps, key=lambda w: w["metadata"]["name"]):
        addrs = [n.split("/")[0] for n in w["spec"].get("ipNetworks", ()) if ":" not in n]
        if not addrs or not _matches(selector, w["metadata"].get("labels") or {}):
            continue
        endpoints.append({"addresses": [addrs[0]], "conditions": {"ready": True, "serving": True, "terminating": False},
                          "nodeName": w["spec"]["node"],
                          "targetRef": {"kind": "Pod", "namespace": ns, "name": w["spec"].get("pod")
                                        or w["metadata"]["name"]}})
    ports = [{"name": p.get("name", ""), "protocol": p["protocol"], "port": p["targetPort"]}
             for p in svc["spec"]["ports"] if isinstance(p["targetPort"], int)]
    doc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": _slice_name(svc), "namespace": ns,
                        "labels": {SERVICE_NAME_LABEL: svc["metadata"]["name"], MANAGED_BY: LAB}},
           "addressType": "IPv4", "endpoints": endpoints, "ports": ports}
    try:
        cur = store.get("EndpointSlice", _slice_name(svc), ns)
    except NotFound:
        cur = None
    if cur is not None and cur.get("endpoints") == endpoints and cur.get("ports") == ports:
        return
    store.apply(doc)


def sync(store: ResourceStore) -> dict:
    weps = store.list("WorkloadEndpoint")
    services = store.list("Service")
    for svc in services:
        _sync_one(store, svc, weps)
    return {"services": len(services)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tortie-lab-svcops")
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--prefix", default="/tortie/")
    ap.add_argument("op", choices=("add", "del", "show", "list", "sync"))
    ap.add_argument("ref", nargs="?")
    ap.add_argument("--spec")
    ap.add_argument("--cluster-cidr")
    args = ap.parse_args(argv)
    client = EtcdClient(EtcdConfig.from_env(endpoints=args.endpoints, prefix=args.prefix))
    store = ResourceStore(client)
    try:
        if args.op == "add":
            out = add(store, args.ref, json.loads(args.spec), args.cluster_cidr)
        elif args.op == "del":
            out = delete(store, args.ref)
        elif args.op == "show":
            out = show(store, args.ref)
        elif args.op == "list":
            out = [show(store, f"{s['metadata']['namespace']}/{s['metadata']['name']}")
                   for s in store.list("Service")]
        else:
            out = sync(store)
    except TortieError as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}), file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
