"""How `tortiectl get` prints resources: a table per kind, or YAML/JSON/names.

The YAML and JSON of several resources is a `kind: List`, which `tortiectl apply`
reads back, so `get -o yaml > f && apply -f f` round-trips.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import yaml

from tortie.ctl import policy_output
from tortie.datastore.kinds import VXLAN_DEFAULT_VNI

FORMATS = ("table", "wide", "yaml", "json", "name")

Row = Callable[[dict], tuple[str, ...]]


def _labels(res: dict) -> str:
    labels = res["metadata"].get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _yn(value) -> str:
    return "true" if value else "false"


def _pool(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    return (res["metadata"]["name"], s["cidr"], str(s["blockSize"]), _yn(s.get("natOutgoing")),
            _yn(s.get("disabled")), s.get("nodeSelector", "all()"))


def _pool_wide(res: dict) -> tuple[str, ...]:
    e = res["spec"].get("egress")
    egress = "-"
    if e and e.get("fromPeers") is not None:
        egress = f"table {e['table']} from peers {e['fromPeers']}"
        if e.get("prefixes"):
            egress += " for " + ",".join(e["prefixes"])
        if e.get("fallback") == "main":
            egress += " (fallback main)"
    elif e:
        hops = e.get("nextHops") or [{"address": e.get("nextHop"), "interface": e.get("interface")}]
        egress = f"table {e['table']} via " + ",".join(
            h["address"] + (f" dev {h['interface']}" if h.get("interface") else "") for h in hops)
        if e.get("fallback") == "main":
            egress += " (fallback main)"
        if e.get("address"):
            egress += f" as {e['address']}"
    return (*_pool(res), _bgp_export(res["spec"]), egress, _egress_state(res) if e else "-", _vxlan(res["spec"]))


def _vxlan(spec: dict) -> str:
    mode = spec.get("vxlanMode", "Never")
    return mode if mode == "Never" else f"{mode} (VNI {spec.get('vxlanVNI', VXLAN_DEFAULT_VNI)})"


def _bgp_export(spec: dict) -> str:
    """Whether the blocks are announced, and to which routers with what (spec.bgp)."""
    if spec.get("disableBGPExport"):
        return "false"
    b = spec.get("bgp") or {}
    out = [f"peers {b['peers']}"] if b.get("peers") else []
    out += [f"communities {','.join(b['communities'])}"] if b.get("communities") else []
    out += [f"prepend {b['asPathPrepend']}"] if b.get("asPathPrepend") else []
    return "true" + (f" ({'; '.join(out)})" if out else "")


def _egress_state(res: dict) -> str:
    """Per node, from the agents' published status: "up on 2/2 nodes", or the nodes where
    the pool's traffic is refused and why."""
    nodes = (res.get("status") or {}).get("egress") or {}
    if not nodes:
        return "unknown (no agent reports it)"
    down = {n: s for n, s in sorted(nodes.items()) if not s["up"]}
    learned = ""
    if (res["spec"].get("egress") or {}).get("fromPeers") is not None:
        # the next hops each node learned from the peers (not in the spec): show them
        learned = " (" + "; ".join(f"{n} via {s.get('nextHop') or 'nothing'}" for n, s in sorted(nodes.items())) + ")"
    if not down:
        held = sorted(n for n, s in nodes.items() if s.get("advertised"))
        return f"up on {len(nodes)}/{len(nodes)} nodes{learned}" + (
            f"; address announced by {', '.join(held)}" if held else "")
    first = next(iter(down.values()))["reason"]
    return f"DOWN on {', '.join(down)} of {len(nodes)} nodes: {first}{learned}"


def _ipam_config(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    return (res["metadata"]["name"], _yn(s.get("strictAffinity")), _yn(s.get("autoAllocateBlocks", True)),
            str(s.get("maxBlocksPerHost") or "unlimited"))


def _node(res: dict) -> tuple[str, ...]:
    bgp = res.get("spec", {}).get("bgp", {})
    return (res["metadata"]["name"], bgp.get("ipv4Address", "-"), bgp.get("ipv6Address", "-"),
            str(bgp.get("asNumber", "(default)")))


def _node_wide(res: dict) -> tuple[str, ...]:
    return (*_node(res), res.get("spec", {}).get("bgp", {}).get("routeReflectorClusterID", "-"), _labels(res))


def _peer_scope(s: dict) -> str:
    if s.get("node"):
        return f"node {s['node']}"
    return s.get("nodeSelector") or "all nodes"


def _bgp_peer(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    return (res["metadata"]["name"], s.get("peerIP") or f"selector: {s.get('peerSelector')}",
            str(s.get("asNumber", "(node's)")), _peer_scope(s))


def _bgp_config(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    mesh = s.get("nodeToNodeMeshEnabled")
    return (res["metadata"]["name"], str(s.get("asNumber", "-")), "-" if mesh is None else _yn(mesh),
            str(s.get("listenPort", "-")))


def _wep(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    return (res["metadata"]["name"], s["node"], s.get("pod") or s.get("workload") or "-",
            ",".join(s.get("ipNetworks", ())) or "-", s.get("interfaceName") or "-")


def _wep_wide(res: dict) -> tuple[str, ...]:
    return (*_wep(res), (res["spec"].get("containerID") or "-")[:12], _labels(res))


def _netpol(res: dict) -> tuple[str, ...]:
    from tortie.datastore.selector import from_k8s

    s = res["spec"]
    return (res["metadata"]["name"], str(from_k8s(s.get("podSelector"))), ",".join(s.get("policyTypes", ())))


def _namespace(res: dict) -> tuple[str, ...]:
    return (res["metadata"]["name"], _labels(res))


_CALICO_HEADERS = ("NAME", "TIER", "ORDER", "SELECTOR", "TYPES")


def _service(res: dict) -> tuple[str, ...]:
    s = res["spec"]
    ingress = ((res.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    external = [*(i["ip"] for i in ingress if i.get("ip")), *s.get("externalIPs", ())]
    ports = ",".join(f"{p['port']}{':' + str(p['nodePort']) if 'nodePort' in p else ''}/{p['protocol']}"
                     for p in s.get("ports", ()))
    return (res["metadata"]["name"], s["type"], s.get("clusterIP") or "-", ",".join(external) or "-", ports)


def _endpoint_slice(res: dict) -> tuple[str, ...]:
    addrs = [a for e in res.get("endpoints", ()) for a in e["addresses"]]
    ports = ",".join(str(p.get("port", "-")) for p in res.get("ports") or ())
    return (res["metadata"]["name"], res["addressType"], ports or "-",
            ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more" if len(addrs) > 3 else "") or "-")


# kind -> (headers, row, wide headers, wide row)
TABLES: dict[str, tuple[tuple[str, ...], Row, tuple[str, ...], Row]] = {
    "ippool": (("NAME", "CIDR", "BLOCKSIZE", "NAT", "DISABLED", "SELECTOR"), _pool,
               ("BGP-EXPORT", "EGRESS", "EGRESS-STATE", "VXLAN"), _pool_wide),
    "ipamconfig": (("NAME", "STRICT-AFFINITY", "AUTO-ALLOCATE", "MAX-BLOCKS-PER-HOST"), _ipam_config,
                   (), _ipam_config),
    "node": (("NAME", "IPV4", "IPV6", "ASN"), _node, ("RR-CLUSTER-ID", "LABELS"), _node_wide),
    "bgppeer": (("NAME", "PEER", "ASN", "NODES"), _bgp_peer, (), _bgp_peer),
    "bgpconfiguration": (("NAME", "ASN", "MESH", "LISTEN-PORT"), _bgp_config, (), _bgp_config),
    "workloadendpoint": (("NAME", "NODE", "POD", "NETWORKS", "INTERFACE"), _wep,
                         ("CONTAINER", "LABELS"), _wep_wide),
    "networkpolicy": (("NAME", "POD-SELECTOR", "POLICY-TYPES"), _netpol, ("ACTIVE-ON",),
                      lambda r: (*_netpol(r), policy_output.active_on(r))),
    "networkpolicy.tortie.io": (_CALICO_HEADERS, policy_output.calico_policy, ("ACTIVE-ON",),
                                lambda r: (*policy_output.calico_policy(r), policy_output.active_on(r))),
    "globalnetworkpolicy": (_CALICO_HEADERS, policy_output.calico_policy, ("ACTIVE-ON",),
                            lambda r: (*policy_output.calico_policy(r), policy_output.active_on(r))),
    "tier": (("NAME", "ORDER"), policy_output.tier, (), policy_output.tier),
    "hostendpoint": (("NAME", "NODE", "INTERFACE", "EXPECTED-IPS", "LABELS"), policy_output.host_endpoint, (),
                     policy_output.host_endpoint),
    "namespace": (("NAME", "LABELS"), _namespace, (), _namespace),
    "service": (("NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORTS"), _service, (), _service),
    "endpointslice": (("NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"), _endpoint_slice, (), _endpoint_slice),
}


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def as_list(resources: Sequence[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "List", "items": list(resources)}


def render(kind_key: str, resources: Sequence[dict], fmt: str, *, single: bool = False,
           namespaces: bool = False) -> str:
    """The text `get` prints. `single`: one named resource (not wrapped in a List)."""
    if fmt in ("yaml", "json"):
        doc = resources[0] if single and len(resources) == 1 else as_list(resources)
        if fmt == "json":
            return json.dumps(doc, indent=2, sort_keys=False)
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip("\n")
    if fmt == "name":
        return "\n".join(_name(r) for r in resources)
    headers, row, wide_headers, wide_row = TABLES[kind_key]
    if fmt == "wide":
        headers, row = headers + wide_headers, wide_row
    row = _tolerant(row, len(headers))
    if namespaces:
        headers = ("NAMESPACE", *headers)
        rows = [headers, *((r["metadata"].get("namespace", ""), *row(r)) for r in resources)]
    else:
        rows = [headers, *(row(r) for r in resources)]
    return table(rows)


def _tolerant(row: Row, width: int) -> Row:
    """A resource written behind the store's back (etcdctl) may lack fields: show, don't crash."""
    def safe(res: dict) -> tuple[str, ...]:
        try:
            return row(res)
        except (KeyError, TypeError, AttributeError):
            name = (res.get("metadata") or {}).get("name", "?") if isinstance(res, dict) else "?"
            return (str(name), "<invalid: see -o yaml>", *([""] * (width - 2)))
    return safe


def _kind(res: dict) -> str:
    """The kind's key: `networkpolicy.tortie.io` apart from the Kubernetes `networkpolicy`."""
    from tortie.datastore.kinds import kind_of

    try:
        return kind_of(res).key
    except KeyError:  # written behind the store's back: show what it says
        return str(res.get("kind", "")).lower()


def _name(res: dict) -> str:
    return f"{_kind(res)}/{res['metadata']['name']}"


def describe(res: dict) -> str:
    """`ippool/default` or `networkpolicy/ns1/deny-all`: how apply/delete name what they did."""
    ns = res["metadata"].get("namespace")
    return f"{_kind(res)}/{ns}/{res['metadata']['name']}" if ns else _name(res)

