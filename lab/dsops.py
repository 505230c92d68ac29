"""The lab's datastore operations, run inside the lab's control namespace.

etcd listens only on the lab's underlay, which the machine's root namespace cannot
reach (by design: nothing of the lab lives there), so the lab runs these as a short
child process in `<lab>-ctl`: `ip netns exec <lab>-ctl python -m tortie.lab.dsops ...`.
Each prints one JSON document on stdout.

Writes go through `datastore.store.ResourceStore` (validation, compare-and-swap).
"""

from __future__ import annotations

import argparse
import json
import sys

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.store import ResourceStore
from tortie.errors import AlreadyExists, Conflict, NotFound, TortieError, ValidationError

API_VERSION = "tortie.io/v1"


def _create_if_absent(store: ResourceStore, resource: dict) -> bool:
    try:
        store.create(resource)
    except AlreadyExists:
        return False
    return True


def bootstrap(store: ResourceStore, cidr: str | None, block_size: int, extra: list[dict] = ()) -> dict:
    """The default IPPool (none without `cidr`: an IPv6-only lab) and IPAMConfig (and
    `extra` resources), unless they exist already."""
    pool = {"apiVersion": API_VERSION, "kind": "IPPool", "metadata": {"name": "default-ipv4"},
            "spec": {"cidr": cidr, "blockSize": block_size, "natOutgoing": False, "disabled": False}}
    ipam = {"apiVersion": API_VERSION, "kind": "IPAMConfig", "metadata": {"name": "default"},
            "spec": {"strictAffinity": False, "autoAllocateBlocks": True}}
    out = {"ippool": bool(cidr) and _create_if_absent(store, pool), "ipamconfig": _create_if_absent(store, ipam)}
    for res in extra:
        out[f"{res['kind'].lower()}/{res['metadata']['name']}"] = _create_if_absent(store, res)
    return out


def find_wep(store: ResourceStore, namespace: str, pod: str) -> dict | None:
    """The WorkloadEndpoint of pod namespace/pod (its resource name need not be the pod name)."""
    for res in store.list("WorkloadEndpoint", namespace):
        spec = res.get("spec", {})
        if spec.get("pod") == pod or (not spec.get("pod") and res["metadata"].get("name") == pod):
            return res
    return None


def set_labels(store: ResourceStore, namespace: str, pod: str,
               add: dict[str, str], remove: list[str], retries: int = 20) -> dict[str, str]:
    """Set and remove labels on the pod's WorkloadEndpoint, guarded by its resourceVersion."""
    for _ in range(retries):
        res = find_wep(store, namespace, pod)
        if res is None:
            raise NotFound(f"no WorkloadEndpoint for pod {namespace}/{pod}")
        labels = dict(res["metadata"].get("labels") or {})
        labels.update(add)
        for k in remove:
            labels.pop(k, None)
        res["metadata"]["labels"] = labels
        try:
            store.replace(res)  # carries resourceVersion: a concurrent change is a Conflict
        except Conflict:
            continue
        return labels
    raise Conflict(f"gave up labelling {namespace}/{pod} after {retries} conflicting writes")


def pool_versions(store: ResourceStore, names: list[str]) -> dict[str, int]:
    """The IP version of each named IPPool (a pod's pools, sorted into ipv4_pools and
    ipv6_pools); NotFound names the first that does not exist."""
    out = {}
    for name in names:
        try:
            cidr = store.get("IPPool", name)["spec"]["cidr"]
        except NotFound:
            raise NotFound(f"no IPPool {name!r}") from None
        out[name] = 6 if ":" in cidr else 4
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tortie-lab-dsops")
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--prefix", default="/tortie/")
    sub = ap.add_subparsers(dest="op", required=True)
    b = sub.add_parser("bootstrap")
    b.add_argument("--cidr", help="the default IPv4 pool's CIDR (none: no IPv4 pool)")
    b.add_argument("--block-size", type=int, default=26)
    b.add_argument("--resource", action="append", default=[], type=json.loads, metavar="JSON",
                   help="another resource to create if absent")
    w = sub.add_parser("wep")
    w.add_argument("namespace")
    w.add_argument("pod")
    lb = sub.add_parser("label")
    lb.add_argument("namespace")
    lb.add_argument("pod")
    lb.add_argument("--set", action="append", default=[], metavar="K=V")
    lb.add_argument("--remove", action="append", default=[], metavar="K")
    sub.add_parser("members", help="each member's id and the leader it follows")
    pv = sub.add_parser("pool-versions", help="the IP version of each named pool")
    pv.add_argument("pools", nargs="+")
    args = ap.parse_args(argv)
    # TLS files (TORTIE_ETCD_CA/_CERT/_KEY) come from the environment the lab gives us.
    config = EtcdConfig.from_env(endpoints=args.endpoints, prefix=args.prefix)
    try:
        with EtcdClient(config) as client:
            store = ResourceStore(client)
            if args.op == "members":
                out = client.member_status()
            elif args.op == "bootstrap":
                out = bootstrap(store, args.cidr, args.block_size, args.resource)
            elif args.op == "pool-versions":
                out = pool_versions(store, args.pools)
            elif args.op == "wep":
                out = find_wep(store, args.namespace, args.pod)
            else:
                add = {}
                for item in args.set:
                    k, sep, v = item.partition("=")
                    if not sep or not k:
                        raise ValidationError(f"label {item!r}: want k=v", field="label")
                    add[k] = v
                out = set_labels(store, args.namespace, args.pod, add, args.remove)
    except TortieError as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}), file=sys.stderr)
        return exc.exit_code
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
