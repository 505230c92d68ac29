"""The resource commands of `tortiectl`: apply, create, replace, get, delete, label, and
node status / version. Each is `fn(ctx, args) -> exit code`.

Files are read and every document validated before anything is written, so a typo in
the third document of a file does not leave the first two applied.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tortie import __version__
from tortie.ctl import output, policy_output, statusdocs
from tortie.datastore import keys, selector
from tortie.datastore import resources as res
from tortie.errors import Conflict, NotFound, TortieError, ValidationError

STALE_AFTER = 30.0  # seconds without a status update: the agent is probably not running


# --- reading files ---------------------------------------------------------------------


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        return "<stdin>", _text("<stdin>", stdin.read()) if stdin is not None else sys.stdin.read()
    try:
        return path, _text(path, Path(path).read_bytes())
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}", field="-f") from None


# A byte order mark names its encoding (YAML allows UTF-16 and UTF-32 with one); UTF-32
# first, since its little-endian mark begins with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _text(name: str, data: bytes) -> str:
    """The file's text: UTF-8, or what its byte order mark says; anything else is refused
    (guessing Latin-1 would store mangled names)."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{name}: not {encoding.upper().removesuffix('-SIG')} text (byte "
                              f"0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None


def _expand(paths: list[str]) -> Iterator[str]:
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
            if not files:
                raise ValidationError(f"no .yaml, .yml or .json files in {path}", field="-f")
            yield from map(str, files)
        else:
            yield path


def load(paths: list[str]) -> list[tuple[str, dict]]:
    """(where, document) for every resource in the files; `kind: List` is unpacked."""
    docs: list[tuple[str, dict]] = []
    for path in _expand(paths):
        name, text = _read(path)
        try:
            loaded = list(yaml.safe_load_all(text))
        except RecursionError:
            raise ValidationError(f"{name}: nested too deeply to be a resource") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            raise ValidationError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        for i, doc in enumerate(loaded, 1):
            if doc is None:
                continue
            where = f"{name}, document {i}"
            if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") \
                    and "items" in doc:
                items = doc["items"] or []
                if not isinstance(items, list):
                    raise ValidationError(f"{where}: items must be a list")
                docs += [(f"{where}, item {j}", item) for j, item in enumerate(items, 1)]
            else:
                docs.append((where, doc))
    if not docs:
        raise ValidationError("no resources in the given files", field="-f")
    return docs


def _validated(paths: list[str]) -> list[tuple[str, dict]]:
    out = []
    for where, doc in load(paths):
        try:
            out.append((where, res.validate(doc)))
        except RecursionError:
            raise ValidationError(f"{where}: nested too deeply to be a resource") from None
        except ValidationError as exc:
            name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
            label = f" ({doc.get('kind')}/{name})" if name else ""
            raise ValidationError(f"{where}{label}: {exc}") from None
    return out


def _same(current: dict, wanted: dict) -> bool:
    """Whether applying `wanted` would change nothing the user controls."""
    def mine(r: dict) -> tuple:
        meta = r["metadata"]
        body = {k: v for k, v in r.items() if k != "metadata"}  # spec, or an EndpointSlice's fields
        return (body, meta.get("labels") or {}, meta.get("annotations") or {})
    return mine(current) == mine(wanted)


# --- apply / create / replace / delete ---------------------------------------------------


def _each(ctx, items: list[tuple[str, Any]], do) -> int:
    """Run do(item) for every item; report each error and go on; the first error's code wins."""
    rc = 0
    for where, item in items:
        try:
            print(do(item), file=ctx.out)
        except TortieError as exc:
            print(f"tortiectl: {where}: {exc}", file=ctx.err)
            rc = rc or exc.exit_code
    return rc


def cmd_apply(ctx, args) -> int:
    def apply(r: dict) -> str:
        try:
            current = ctx.store.get(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace"))
        except NotFound:
            current = None
        if current is not None and _same(current, r):  # nothing to write, nothing to lose
            return f"{output.describe(r)} unchanged"
        ctx.store.apply(r)
        return f"{output.describe(r)} {'configured' if current else 'created'}"
    return _each(ctx, _validated(args.filename), apply)


def cmd_create(ctx, args) -> int:
    def create(r: dict) -> str:
        ctx.store.create(r)
        return f"{output.describe(r)} created"
    return _each(ctx, _validated(args.filename), create)


def cmd_replace(ctx, args) -> int:
    def replace(r: dict) -> str:
        ctx.store.replace(r)
        return f"{output.describe(r)} replaced"
    return _each(ctx, _validated(args.filename), replace)


def cmd_delete(ctx, args) -> int:
    targets: list[tuple[str, tuple[res.Kind, str, str | None]]] = []
    if args.filename:
        if args.kind:
            raise ValidationError("give -f FILE or KIND NAME..., not both")
        for where, doc in load(args.filename):
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) \
                    or not isinstance(doc.get("kind"), str):
                raise ValidationError(f"{where}: needs kind and metadata.name")
            kind = res.kind_for(doc["kind"])
            targets.append((where, (kind, meta["name"], meta.get("namespace") or args.namespace)))
    else:
        if not args.kind or not args.names:
            raise ValidationError("give KIND NAME... or -f FILE")
        kind = res.kind_for(args.kind)
        targets = [(name, (kind, name, args.namespace)) for name in args.names]

    def delete(target: tuple[res.Kind, str, str | None]) -> str:
        kind, name, namespace = target
        try:
            gone = ctx.store.delete(kind, name, namespace if kind.namespaced else None)
        except NotFound:
            if not args.ignore_not_found:
                raise
            return f"{kind.key}/{name} not found (ignored)"
        if kind.name == "Node":
            # As calicoctl does: a node that is gone gives back its address blocks.
            from tortie.datastore.cleanup import release_node
            from tortie.datastore.ipam import IPAM

            freed = release_node(ctx.store, IPAM(ctx.client), name)
            return (f"{output.describe(gone)} deleted; released {freed['workload_endpoints']} workload "
                    f"endpoint(s), {len(freed['addresses'])} address(es), "
                    f"{len(freed['blocks'])} block(s)")
        return f"{output.describe(gone)} deleted"
    return _each(ctx, targets, delete)


# --- get / label -----------------------------------------------------------------------


def cmd_get(ctx, args) -> int:
    kind = res.kind_for(args.kind)
    namespace = None if (args.all_namespaces or not kind.namespaced) else args.namespace
    if args.names:
        found, rc = [], 0
        for name in args.names:
            try:
                found.append(ctx.store.get(kind, name, namespace))
            except NotFound as exc:
                print(f"tortiectl: {exc}", file=ctx.err)
                rc = rc or exc.exit_code
        if found and kind.key in policy_output.POLICY_KINDS and args.output == "wide":
            found = policy_output.with_usage(ctx.client, ctx.config.prefix, found, STALE_AFTER)
        if found:
            print(output.render(kind.key, found, args.output, single=len(args.names) == 1,
                                namespaces=kind.namespaced and args.all_namespaces), file=ctx.out)
        return rc
    items = ctx.store.list(kind, namespace)
    if args.selector is not None:
        sel = selector.parse(args.selector)
        items = [r for r in items if sel.matches(r["metadata"].get("labels") or {})]
    if kind.key == "ippool" and args.output == "wide":
        items = _with_egress_state(ctx, items)
    if kind.key in policy_output.POLICY_KINDS and args.output == "wide":
        items = policy_output.with_usage(ctx.client, ctx.config.prefix, items, STALE_AFTER)
    if not items and args.output in ("table", "wide"):
        where = f" in namespace {namespace}" if namespace else ""
        print(f"No {kind.name} resources found{where}.", file=ctx.err)
        return 0
    print(output.render(kind.key, items, args.output, namespaces=kind.namespaced and args.all_namespaces),
          file=ctx.out)
    return 0


def _with_egress_state(ctx, pools: list[dict]) -> list[dict]:
    """The pools with what each node publishes about their egress (for display only):
    status.egress = {node: {"up": bool, "reason": str | None, "nextHop": "a,b"}}; stale statuses
    are left out."""
    by_pool: dict = {}
    for node, doc in statusdocs.live(ctx.client, ctx.config.prefix, STALE_AFTER):
        for e in doc.get("egress") or ():
            by_pool.setdefault(e.get("pool"), {})[node] = {"up": bool(e.get("up")), "reason": e.get("reason"),
                                                           "advertised": bool(e.get("advertised")),
                                                           "nextHop": e.get("nextHop") or ""}
    return [{**p, "status": {"egress": by_pool[p["metadata"]["name"]]}} if p["metadata"]["name"] in by_pool
            else p for p in pools]


def parse_label_changes(changes: list[str]) -> tuple[dict[str, str], list[str]]:
    """`k=v` sets, `k-` removes; every key and value checked like metadata.labels."""
    sets, removes = {}, []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            removes.append(change[:-1])
        elif "=" in change:
            key, _, value = change.partition("=")
            sets[key] = value
        else:
            raise ValidationError(f"{change!r}: want key=value or key-", field="labels")
    return sets, removes


def cmd_label(ctx, args) -> int:
    kind = res.kind_for(args.kind)
    sets, removes = parse_label_changes(args.changes)
    namespace = args.namespace if kind.namespaced else None
    for _ in range(10):
        cur = ctx.store.get(kind, args.name, namespace)
        labels = dict(cur["metadata"].get("labels") or {})
        clash = [k for k, v in sets.items() if k in labels and labels[k] != v]
        if clash and not args.overwrite:
            raise ValidationError(f"label {clash[0]!r} already set to {labels[clash[0]]!r}; "
                                  "use --overwrite to change it", field="labels")
        labels.update(sets)
        for key in removes:
            labels.pop(key, None)
        if labels == (cur["metadata"].get("labels") or {}):
            print(f"{output.describe(cur)} not labeled (no change)", file=ctx.out)
            return 0
        cur["metadata"]["labels"] = labels
        try:
            ctx.store.replace(cur)  # guarded by the resourceVersion we read
        except Conflict:
            continue
        print(f"{output.describe(cur)} labeled", file=ctx.out)
        return 0
    raise Conflict(f"{kind.name} {args.name!r} kept changing; try again")


# --- node status / version -------------------------------------------------------------------


def cmd_node_status(ctx, args) -> int:
    from tortie.bgp import status as bgp_status

    prefix = ctx.config.prefix
    kvs, _ = ctx.client.get_prefix(prefix + keys.BGP_STATUS)
    published = {node: kv.value for kv in kvs if (node := keys.parse_bgp_status(kv.key[len(prefix):]))}
    nodes = args.nodes or sorted(set(published) | {n["metadata"]["name"] for n in ctx.store.list("node")})
    if not nodes:
        print("No nodes found.", file=ctx.err)
        return 0
    now, rc, docs = time.time(), 0, []
    for i, node in enumerate(nodes):
        raw = published.get(node)
        if raw is None:
            if args.output == "json":
                docs.append({"node": node, "peers": None})
            else:
                print(f"{'' if i == 0 else chr(10)}Node {node}: no BGP status published "
                      "(is tortie-agent running there with BGP on?)", file=ctx.out)
            if args.nodes:
                rc = rc or NotFound.exit_code
            continue
        doc, peers = bgp_status.parse(raw)
        updated = doc.get("updated")
        stale = updated is not None and now - updated > STALE_AFTER
        if args.output == "json":
            docs.append({**doc, "node": node, "stale": stale})
            continue
        age = f"updated {int(now - updated)}s ago" if updated is not None else "no timestamp"
        up = sum(p.state == "established" for p in peers)
        print(f"{'' if i == 0 else chr(10)}Node {node}: {up}/{len(peers)} BGP peers established, {age}"
              + (" (STALE: the agent may be down)" if stale else ""), file=ctx.out)
        print(bgp_status.table(peers, now=now) if peers else "  no BGP peers", file=ctx.out)
        if doc.get("bfd"):
            print("  BFD: " + ", ".join(f"{peer} {state}" for peer, state in sorted(doc["bfd"].items())),
                  file=ctx.out)
        for e in doc.get("egress") or ():
            state = "up" if e.get("up") else f"DOWN: {e.get('reason')}"
            if e.get("up") and e.get("bfdDown"):
                state += f" (BFD down, left out: {', '.join(e['bfdDown'])})"
            if e.get("address"):
                state += f"; address {e['address']} " + ("announced (a pod of the pool is here)" if e.get("advertised")
                                                         else "not announced (no pod of the pool here)")
            if e.get("fromPeers") is not None:  # next hops learned from those BGP peers
                via = f"from peers {e['fromPeers']}: via {e.get('nextHop') or 'nothing learned'}"
                if e.get("up") and e.get("notAnnounced"):
                    state += f" (not announced: {', '.join(e['notAnnounced'])})"
            else:
                via = f"via {e.get('nextHop')}"
            print(f"  egress of pool {e.get('pool')} (table {e.get('table')} {via}): {state}", file=ctx.out)
        for v in doc.get("vxlan") or ():
            state = "up" if v.get("up") else f"DOWN: {v.get('reason')}"
            print(f"  VXLAN {v.get('device')} VNI {v.get('vni')}, tunnel address {v.get('address')}, MTU {v.get('mtu')}, "
                  f"{v.get('vteps')} remote VTEP(s): {state}", file=ctx.out)
        for prefix, why in sorted((doc.get("refused") or {}).items()):
            print(f"  learned route {prefix} refused: {why}", file=ctx.out)
    if args.output == "json":
        print(json.dumps(docs, indent=2, sort_keys=True), file=ctx.out)
    return rc


def cmd_version(ctx, args) -> int:
    print(f"tortiectl {__version__}", file=ctx.out)
    try:
        revision = ctx.client.revision()
        print(f"datastore: etcd at {','.join(ctx.config.endpoints)}, prefix {ctx.config.prefix}, "
              f"revision {revision}", file=ctx.out)
    except TortieError as exc:
        print(f"datastore: {exc}", file=ctx.out)
        return exc.exit_code
    return 0
