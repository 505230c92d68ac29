"""`tortiectl ipam`: show, check, release, configure (Calico's `calicoctl ipam`).

    tortiectl ipam show [--show-blocks] [-o table|json]
    tortiectl ipam check [-o FILE] [--pending-grace SECONDS]
    tortiectl ipam release --ip IP [--ip IP ...] | --from-report FILE
    tortiectl ipam configure [--strict-affinity true|false] [--max-blocks-per-host N]

Handlers follow `tortie.ctl.main`: `handler(ctx, args) -> int`, raising TortieError for
the one-line error. Every argument and input file is checked before anything in the
datastore changes.
"""

from __future__ import annotations

import json

from tortie.ctl.output import table
from tortie.datastore.ipam import IPAM, PENDING_GRACE
from tortie.datastore.ipam_blocks import parse_ip
from tortie.datastore.ipam_check import REPORT_LISTS
from tortie.errors import NotFound, ValidationError


def register(subparsers) -> None:
    ipam = subparsers.add_parser("ipam", help="IP address management: usage, leaks, release, settings")
    sub = ipam.add_subparsers(dest="ipam_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("show", help="addresses per pool (and per block): total, in use, free")
    p.add_argument("--show-blocks", action="store_true", help="also list every block")
    p.add_argument("-o", "--output", default="table", choices=("table", "json"))
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("check", help="report leaked addresses, blocks and affinities (changes nothing)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the report as JSON to FILE "
                   "(for `ipam release --from-report`)")
    p.add_argument("--pending-grace", default=str(PENDING_GRACE), metavar="SECONDS",
                   help=f"a block claim pending longer than this is abandoned (default {PENDING_GRACE:g})")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("release", help="free addresses, or everything a check report lists")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ip", action="append", metavar="IP", help="an allocated address (repeatable)")
    g.add_argument("--from-report", metavar="FILE", help="a report written by `ipam check -o FILE`")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("configure", help="set IPAM options (the IPAMConfig named default)")
    # values are parsed by the handler, so a bad one is one ValidationError line, not argparse usage
    p.add_argument("--strict-affinity", metavar="true|false", help="never borrow addresses from other nodes' blocks")
    p.add_argument("--max-blocks-per-host", metavar="N", help="blocks one node may claim (0: no limit)")
    p.set_defaults(func=cmd_configure)


def _bool(text: str | None, flag: str) -> bool | None:
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValidationError(f"want true or false, not {text!r}", field=flag)


def _number(text: str | None, flag: str, kind: type = int) -> int | float | None:
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValidationError(f"want a {'whole ' if kind is int else ''}number >= 0, not {text!r}", field=flag)
    return value


# --- show ---------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def cmd_show(ctx, args) -> int:
    use = IPAM(ctx.client).usage()
    if not args.show_blocks:
        use.pop("blocks")
    if args.output == "json":
        print(json.dumps(use, indent=2), file=ctx.out)
        return 0
    if not use["pools"]:
        print("No IP pools.", file=ctx.out)
    else:
        rows = [("POOL", "CIDR", "BLOCK-SIZE", "TOTAL", "IN-USE", "FREE", "BLOCKS")]
        rows += [(p["name"] + (" (disabled)" if p["disabled"] else ""), p["cidr"], f"/{p['blockSize']}",
                  str(p["total"]), f"{p['in_use']} ({_pct(p['in_use'], p['total'])})",
                  f"{p['free']} ({_pct(p['free'], p['total'])})", str(p["blocks"])) for p in use["pools"]]
        print(table(rows), file=ctx.out)
    if args.show_blocks:
        rows = [("BLOCK", "POOL", "NODE", "STATE", "TOTAL", "IN-USE", "FREE")]
        rows += [(b["cidr"], b["pool"], b["node"] or "(none)", b["state"], str(b["total"]),
                  str(b["in_use"]), str(b["free"])) for b in use["blocks"]]
        print("\n" + (table(rows) if use["blocks"] else "No blocks."), file=ctx.out)
    return 0


# --- check ----------------------------------------------------------------------------------


def cmd_check(ctx, args) -> int:
    grace = _number(args.pending_grace, "--pending-grace", float)
    report = IPAM(ctx.client).check(pending_grace=grace)
    if args.output:
        try:
            with open(args.output, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
        except OSError as exc:
            raise ValidationError(f"cannot write the report: {exc.strerror}", field=args.output) from None
    s = report["summary"]
    print(f"Checked {s['blocks']} blocks, {s['handles']} handles, {s['allocations']} allocations "
          f"(etcd revision {report['revision']}).", file=ctx.out)
    for item in report["leaked_allocations"]:
        print(f"leaked address {item['ip']}: handle {item['handle']}, node {item['node'] or '-'}, "
              f"pod {item['namespace'] or '-'}/{item['pod'] or '-'} ({', '.join(item['reasons'])})",
              file=ctx.out)
    for item in report["orphan_blocks"]:
        print(f"block {item['block']} is affine to node {item['node']}, which does not exist "
              f"({item['in_use']} in use)", file=ctx.out)
    for item in report["orphan_affinities"]:
        why = "the node does not exist" if item["reason"] == "node-gone" else "there is no such block"
        print(f"affinity of node {item['node']} for {item['block']}: {why}", file=ctx.out)
    for item in report["stale_pending"]:
        print(f"block {item['block']} of node {item['node']}: claim pending for {item['age_s']}s "
              "(abandoned)", file=ctx.out)
    for item in report["handle_mismatches"]:
        print(f"handle {item['handle']} records {item['recorded']} but holds {item['actual']}", file=ctx.out)
    if report["clean"]:
        print("No leaks found.", file=ctx.out)
    else:
        n = sum(len(report[k]) for k in REPORT_LISTS)
        hint = f"`tortiectl ipam release --from-report {args.output}`" if args.output else \
            "`tortiectl ipam check -o FILE` then `tortiectl ipam release --from-report FILE`"
        print(f"{n} problem(s) found; free them with {hint}.", file=ctx.out)
    return 0


# --- release ---------------------------------------------------------------------------------


def _load_report(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as exc:
        raise ValidationError(f"cannot read the report: {exc.strerror}", field=path) from None
    except ValueError as exc:
        raise ValidationError(f"not a JSON report: {exc}", field=path) from None
    if not isinstance(report, dict) or not all(isinstance(report.get(k, []), list) for k in REPORT_LISTS) \
            or not any(k in report for k in REPORT_LISTS):
        raise ValidationError("not a report written by `tortiectl ipam check -o FILE`", field=path)
    for i, item in enumerate(report.get("leaked_allocations", [])):
        if not isinstance(item, dict) or not {"ip", "block", "handle"} <= item.keys():
            raise ValidationError("needs ip, block and handle", field=f"{path}: leaked_allocations[{i}]")
        parse_ip(item["ip"])
    for key, need in (("orphan_blocks", {"block", "node"}), ("orphan_affinities", {"block", "node", "reason"}),
                      ("stale_pending", {"block", "claimed_at"})):
        for i, item in enumerate(report.get(key, [])):
            if not isinstance(item, dict) or not need <= item.keys():
                raise ValidationError(f"needs {', '.join(sorted(need))}", field=f"{path}: {key}[{i}]")
    return report


def cmd_release(ctx, args) -> int:
    ipam = IPAM(ctx.client)
    if args.from_report:
        out = ipam.release_from_report(_load_report(args.from_report))
        for ip in out["released_ips"]:
            print(f"released {ip}", file=ctx.out)
        for node in out["released_nodes"]:
            print(f"released the blocks and affinities of deleted node {node}", file=ctx.out)
        for item in out["removed_affinities"]:
            print(f"removed affinity of node {item['node']} for {item['block']}", file=ctx.out)
        for cidr in out["removed_pending"]:
            print(f"removed abandoned claim of block {cidr}", file=ctx.out)
        if not any(out.values()):
            print("Nothing to release: everything in the report was already gone or reused.", file=ctx.out)
        return 0
    ips = [str(parse_ip(ip)) for ip in args.ip]
    allocated = {h.ip for b in ipam.blocks() for h in b.held()}
    missing = [ip for ip in ips if ip not in allocated]
    if missing:
        raise NotFound(f"not allocated: {', '.join(missing)} (nothing released)")
    for ip in ipam.release_ips(ips):
        print(f"released {ip}", file=ctx.out)
    return 0


# --- configure ---------------------------------------------------------------------------------


def cmd_configure(ctx, args) -> int:
    strict = _bool(args.strict_affinity, "--strict-affinity")
    max_blocks = _number(args.max_blocks_per_host, "--max-blocks-per-host")
    if strict is None and max_blocks is None:
        raise ValidationError("give --strict-affinity and/or --max-blocks-per-host", field="ipam configure")
    cfg = IPAM(ctx.client).configure(strict_affinity=strict, max_blocks_per_host=max_blocks)
    print(f"strictAffinity: {str(cfg.strict_affinity).lower()}, maxBlocksPerHost: "
          f"{cfg.max_blocks_per_host or 'unlimited'}", file=ctx.out)
    return 0
