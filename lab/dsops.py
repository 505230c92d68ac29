"""The lab's datastore operations, run inside the lab's control namespace.

etcd listens only on the lab's underlay, which the machine's root namespace cannot
reach (by design: nothing of the lab lives there), so the lab runs these as a short
child process in `<lab>-ctl`: `ip netns exec <lab>-ctl python -m tortie.lab.dsops ...`.
Each prints one JSON document on stdout.

Keys follow docs/architecture.md: `<prefix>resources/<kind>/<name>`, namespaced kinds
`<prefix>resources/<kind>/<namespace>/<name>`.
"""

from __future__ import annotations

import argparse
import json
import sys

from tortie.datastore.etcd import KV, EtcdClient, EtcdConfig
from tortie.errors import NotFound, TortieError, ValidationError

API_VERSION = "tortie.io/v1"


def _resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _create_if_absent(client: EtcdClient, key: str, resource: dict) -> bool:
    ok, _ = client.cas(key, 0, json.dumps(resource).encode())
    return ok


def bootstrap(client: EtcdClient, prefix: str, cidr: str, block_size: int) -> dict:
    """The default IPPool and IPAMConfig, unless they exist already."""
    pool = _resource("IPPool", "default-ipv4", {
        "cidr": cidr, "blockSize": block_size, "natOutgoing": False, "disabled": False,
    })
    ipam = _resource("IPAMConfig", "default", {"strictAffinity": False, "autoAllocateBlocks": True})
    return {
        "ippool": _create_if_absent(client, f"{prefix}resources/ippool/default-ipv4", pool),
        "ipamconfig": _create_if_absent(client, f"{prefix}resources/ipamconfig/default", ipam),
    }


def find_wep(client: EtcdClient, prefix: str, namespace: str, pod: str) -> KV | None:
    """The WorkloadEndpoint of pod namespace/pod (its key name need not be the pod name)."""
    kvs, _ = client.get_prefix(f"{prefix}resources/workloadendpoint/{namespace}/")
    for kv in kvs:
        try:
            res = json.loads(kv.value)
        except ValueError:
            continue
        spec = res.get("spec", {})
        if spec.get("pod") == pod or (not spec.get("pod") and res.get("metadata", {}).get("name") == pod):
            return kv
    return None


def set_labels(client: EtcdClient, prefix: str, namespace: str, pod: str,
               add: dict[str, str], remove: list[str]) -> dict[str, str]:
    """Set and remove labels on the pod's WorkloadEndpoint under compare-and-swap."""
    kv = find_wep(client, prefix, namespace, pod)
    if kv is None:
        raise NotFound(f"no WorkloadEndpoint for pod {namespace}/{pod}")
    result: dict[str, str] = {}

    def change(cur: KV | None) -> bytes:
        if cur is None:
            raise NotFound(f"WorkloadEndpoint of {namespace}/{pod} vanished")
        res = json.loads(cur.value)
        labels = dict(res.setdefault("metadata", {}).get("labels") or {})
        labels.update(add)
        for k in remove:
            labels.pop(k, None)
        res["metadata"]["labels"] = labels
        result.clear()
        result.update(labels)
        return json.dumps(res).encode()

    client.update(kv.key, change)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tortie-lab-dsops")
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--prefix", default="/tortie/")
    sub = ap.add_subparsers(dest="op", required=True)
    b = sub.add_parser("bootstrap")
    b.add_argument("--cidr", required=True)
    b.add_argument("--block-size", type=int, required=True)
    w = sub.add_parser("wep")
    w.add_argument("namespace")
    w.add_argument("pod")
    lb = sub.add_parser("label")
    lb.add_argument("namespace")
    lb.add_argument("pod")
    lb.add_argument("--set", action="append", default=[], metavar="K=V")
    lb.add_argument("--remove", action="append", default=[], metavar="K")
    args = ap.parse_args(argv)
    config = EtcdConfig.from_env({}, endpoints=args.endpoints, prefix=args.prefix)
    try:
        with EtcdClient(config) as client:
            if args.op == "bootstrap":
                out = bootstrap(client, args.prefix, args.cidr, args.block_size)
            elif args.op == "wep":
                kv = find_wep(client, args.prefix, args.namespace, args.pod)
                out = json.loads(kv.value) if kv else None
            else:
                add = {}
                for item in args.set:
                    k, sep, v = item.partition("=")
                    if not sep or not k:
                        raise ValidationError(f"label {item!r}: want k=v", field="label")
                    add[k] = v
                out = set_labels(client, args.prefix, args.namespace, args.pod, add, args.remove)
    except TortieError as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}), file=sys.stderr)
        return exc.exit_code
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
