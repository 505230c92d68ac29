"""`tortie-lab`: a whole tortie cluster on one machine, in network namespaces.

    tortie-lab up [--nodes N] [--tor none] [--name LAB] [--ip-family ipv4|ipv6|dual]
    tortie-lab pod add NODE NS/NAME [--label k=v ...] [--pool P] [--port NAME=PORT[/PROTO] ...]
    tortie-lab pod del NS/NAME
    tortie-lab pod label NS/NAME k=v ... [k- ...]
    tortie-lab agent stop|start|restart NODE [--kill]
    tortie-lab router stop|start NAME | router bfd on|off | router announce|withdraw NAME PREFIX
    tortie-lab link down|up NODE IFNAME
    tortie-lab etcd stop|start [MEMBER|leader] [--kill] | etcd pause|resume
    tortie-lab exec NS/NAME -- CMD ...
    tortie-lab probe SRC DST_POD|IP PORT [--udp] [--family 4|6 | -6]
    tortie-lab matrix [--port P] [--family 4|6 | -6]
    tortie-lab ctl -- TORTIECTL_ARGS ...
    tortie-lab status [-o json]
    tortie-lab down
    tortie-lab demo

The lab name comes from --name (before or after the command), else $TORTIE_LAB_NAME,
else "tortie". Errors print one line and exit with the tortie error's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from tortie.datastore.fields import PORT_NAME
from tortie.errors import TortieError, ValidationError
from tortie.lab import family, services, topology
from tortie.lab.cluster import AGENT_MODES, CNI_MODES, Lab
from tortie.lab.teardown import teardown


def parse_port(item: str) -> dict:
    """`NAME=PORT[/PROTO]` as a WorkloadEndpoint port item."""
    name, sep, rest = item.partition("=")
    number, _, proto = rest.partition("/")
    proto = proto.upper() or "TCP"
    if not sep or not PORT_NAME.fullmatch(name) or not number.isdigit() or not 1 <= int(number) <= 65535 \
            or proto not in ("TCP", "UDP", "SCTP"):
        raise ValidationError(f"{item!r}: want NAME=PORT[/TCP|/UDP|/SCTP], NAME lowercase letters, digits "
                              "and inner dashes (at most 15, one letter at least)", field="port")
    return {"name": name, "protocol": proto, "port": int(number)}


def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(f"{what} {item!r}: want key=value", field=what)
        out[k] = v
    return out


def _family_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", type=int, choices=(4, 6), default=None,
                   help="probe the pods' IPv4 (default where the lab has it) or IPv6 addresses")
    p.add_argument("-6", dest="family", action="store_const", const=6, help="short for --family 6")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=argparse.SUPPRESS, help="lab name (default: tortie)")
    ap = argparse.ArgumentParser(prog="tortie-lab", parents=[common],
                                 description="a tortie cluster on one machine, in network namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", parents=[common], help="build the lab; prints when ready")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--tor", default="none", choices=topology.TOR_KINDS)
    up.add_argument("--uplinks", type=int, default=1, help="uplink segments per node, each with its router")
    up.add_argument("--cni", default="tortie", choices=CNI_MODES,
                    help="tortie, or ptp: the reference plugins as a baseline (no agent)")
    up.add_argument("--agent", default="auto", choices=AGENT_MODES,
                    help="per-node daemon: the agent, the stand-alone CNI server, or none")
    up.add_argument("--agent-env", action="append", default=[], metavar="K=V",
                    help="extra environment for every node's agent")
    up.add_argument("--pool", default=topology.DEFAULT_POOL_CIDR, help="the default IPPool's CIDR")
    up.add_argument("--block-size", type=int, default=topology.DEFAULT_BLOCK_SIZE)
    up.add_argument("--timeout", type=float, default=60.0, help="seconds until everything is ready")
    up.add_argument("--bfd", action="store_true", help="the routers run BFD (100 ms x 3) with every node (--tor bird or frr)")
    up.add_argument("--reflectors", type=int, default=0, metavar="N",
                    help="mesh off; the last N nodes are route reflectors, the others their clients (--tor none)")
    up.add_argument("--etcd-members", type=int, default=1, choices=topology.ETCD_MEMBER_COUNTS,
                    help="etcd members, each in its own namespace when more than one")
    up.add_argument("--subnets", type=int, default=1, choices=(1, 2),
                    help="2: the nodes on two segments joined by a router that does not peer with tortie "
                         "(--tor none); only VXLAN (IPPool vxlanMode) connects pods across it")
    up.add_argument("--etcd-tls", action="store_true",
                    help="etcd over TLS (clients and peers), certificates of a lab CA")
    up.add_argument("--ip-family", default=family.DEFAULT_FAMILY, choices=family.FAMILIES,
                    help="the lab's address families: every link, router session and pod")
    up.add_argument("--pool6", default=family.DEFAULT_POOL6_CIDR, help="the default IPv6 pool's CIDR")

    pod = sub.add_parser("pod", parents=[common], help="add, delete, label pods")
    psub = pod.add_subparsers(dest="pod_cmd", required=True)
    add = psub.add_parser("add", parents=[common])
    add.add_argument("node")
    add.add_argument("pod", metavar="NAMESPACE/NAME")
    add.add_argument("--label", action="append", default=[], metavar="K=V")
    add.add_argument("--pool", help="the pod's IPPool(s), comma-separated; with IPv6 each goes to its family "
                     "(a family without one takes the default pool)")
    add.add_argument("--port", action="append", default=[], metavar="NAME=PORT[/PROTO]",
                     help="a named container port (PROTO: TCP, UDP or SCTP; default TCP); repeatable")
    dele = psub.add_parser("del", parents=[common])
    dele.add_argument("pod", metavar="NAMESPACE/NAME")
    lab = psub.add_parser("label", parents=[common])
    lab.add_argument("pod", metavar="NAMESPACE/NAME")
    lab.add_argument("labels", nargs="+", metavar="k=v|k-")

    ag = sub.add_parser("agent", parents=[common], help="stop, start or restart a node's agent")
    ag.add_argument("action", choices=("stop", "start", "restart"))
    ag.add_argument("node")
    ag.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")

    rt = sub.add_parser("router", parents=[common], help="power a router off (daemon killed, links down) or on; "
                        "BFD on every router: router bfd on|off; router announce|withdraw NAME PREFIX")
    rt.add_argument("action", choices=("stop", "start", "bfd", "announce", "withdraw"))
    rt.add_argument("router", metavar="NAME|on|off", help="tor, tor1, tor2, ... (see status); on|off after bfd")
    rt.add_argument("prefix", nargs="?", metavar="PREFIX",
                    help="announce|withdraw: a prefix the router originates to its nodes, e.g. 0.0.0.0/0")

    et = sub.add_parser("etcd", parents=[common], help="stop or start an etcd member, or freeze every member "
                        "(pause) and thaw them")
    et.add_argument("action", choices=("stop", "start", "pause", "resume"))
    et.add_argument("member", nargs="?", metavar="MEMBER",
                    help="stop/start: n1, n2, n3 or leader (optional when the lab runs one member)")
    et.add_argument("--kill", action="store_true", help="stop with SIGKILL, as a crash")

    ln = sub.add_parser("link", parents=[common], help="take a node's link down or up (an uplink cut)")
    ln.add_argument("action", choices=("down", "up"))
    ln.add_argument("node")
    ln.add_argument("ifname", metavar="IFNAME", help="the node's interface, e.g. eth0")

    ex = sub.add_parser("exec", parents=[common], help="run a command in a pod (or node) namespace")
    ex.add_argument("pod", metavar="NAMESPACE/NAME|NODE")

    pr = sub.add_parser("probe", parents=[common], help="exit 0 iff SRC reaches DST:PORT")
    pr.add_argument("src", metavar="SRC_POD|NODE")
    pr.add_argument("dst", metavar="DST_POD|IP|svc:NAMESPACE/NAME")
    pr.add_argument("port", type=int)
    pr.add_argument("--udp", action="store_true")
    pr.add_argument("--timeout", type=float, default=1.0)
    _family_args(pr)
    pr.add_argument("--show", action="store_true", help="print the answer (<pod> <client address as seen>)")
    services.add_parser(sub, common)

    mx = sub.add_parser("matrix", parents=[common], help="every node and pod to every pod")
    mx.add_argument("--port", type=int, default=80)
    mx.add_argument("--no-nodes", action="store_true", help="pods as sources only")
    mx.add_argument("-o", "--output", choices=("grid", "json"), default="grid")
    _family_args(mx)

    sub.add_parser("ctl", parents=[common], help="tortiectl against the lab's etcd: ctl -- ARGS")

    stt = sub.add_parser("status", parents=[common], help="the lab's map")
    stt.add_argument("-o", "--output", choices=("text", "json"), default="text")

    sub.add_parser("down", parents=[common], help="remove everything of the lab")
    demo = sub.add_parser("demo", parents=[common], help="a 2-node lab, pods, the matrix, then down")
    demo.add_argument("--tor", default="bird", choices=topology.TOR_KINDS)
    return ap


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _print_status(s: dict) -> None:
    print(f"lab {s['name']} ({s['phase']}), tor {s['tor_kind']}, cni {s['cni']}, state {s['state_dir']}")
    e = s["etcd"]
    if len(e["members"]) == 1:
        print(f"etcd        {', '.join(s['etcd_endpoints'])} in {e['namespace']}{' (TLS)' if e['tls'] else ''}")
    else:
        print(f"etcd        {len(e['members'])} members{' (TLS)' if e['tls'] else ''}")
    for m in e["members"] if len(e["members"]) > 1 else ():
        how = "paused" if m["paused"] else "running" if m["running"] else "STOPPED"
        print(f"  member    {m['name']:<10} {m['namespace']:<20} {m['endpoint']:<24} {how}"
              f"{'  leader' if m['leader'] else ''}")
    u = s["underlay"]
    print(f"underlay    {u['subnet']} on {u['bridge']} in {u['namespace']}")
    for n in s["nodes"]:
        agent = n["agent"]
        health = "" if not agent else f"  {agent['kind']} pid {agent['pid']} {'up' if agent['alive'] else 'DOWN'}"
        print(f"node        {n['name']:<10} {n['namespace']:<20} {n['address']:<16} AS {n['as_number']}{health}")
    for t in s["tors"]:
        bgp = ", ".join(f"{n} {st}" for n, st in sorted(t["sessions"].items()))
        print(f"router      {t['name']:<10} {t['namespace']:<20} {t['address']:<16} AS {t['as_number']} "
              f"({t['kind']}){'  BGP: ' + bgp if bgp else ''}")
    if s["outside"]:
        print(f"outside     {'ext':<10} {s['outside']['namespace']:<20} {s['outside']['address']}")
    for p in s["pods"]:
        print(f"pod         {p['name']:<24} {p['node']:<8} {p['address'] or '-':<15} {p['netns']}")


def run(argv: list[str]) -> int:
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    name = getattr(args, "name", None) or os.environ.get("TORTIE_LAB_NAME") or topology.DEFAULT_LAB
    if rest and args.cmd not in ("exec", "ctl"):
        raise ValidationError(f"'--' is only for exec and ctl, not {args.cmd}", field="--")

    if args.cmd == "up":
        # Ctrl-C or a TERM while building still tears down what was made. Only while
        # building: a caller that runs this in-process (a test) keeps its own handler, and
        # children it forks later (pyroute2 forks one per namespace) die of TERM as usual.
        before = signal.signal(signal.SIGTERM, _interrupt)
        try:
            Lab.up(name, args.nodes, args.tor, uplinks=args.uplinks, cni=args.cni, agent=args.agent,
                   agent_env=_kv(args.agent_env, "agent-env"), pool=args.pool, block_size=args.block_size,
                   timeout=args.timeout, bfd=args.bfd, reflectors=args.reflectors, etcd_members=args.etcd_members,
                   etcd_tls=args.etcd_tls, subnets=args.subnets, ip_family=args.ip_family, pool6=args.pool6,
                   echo=print)
        finally:
            signal.signal(signal.SIGTERM, before)
        print(f"next: tortie-lab pod add node1 default/a   (then: tortie-lab matrix; tortie-lab down"
              f"{'' if name == topology.DEFAULT_LAB else ' --name ' + name})")
        return 0
    if args.cmd == "down":
        problems = teardown(name, echo=print)
        for p in problems:
            print(f"left behind: {p}", file=sys.stderr)
        print(f"lab {name} is down" if not problems else f"lab {name}: teardown incomplete")
        return 1 if problems else 0
    if args.cmd == "demo":
        from tortie.lab import demo
        explicit = getattr(args, "name", None) or os.environ.get("TORTIE_LAB_NAME")
        return demo.main(explicit, argv=["--tor", args.tor])

    lab = Lab(name)
    if args.cmd == "pod":
        if args.pod_cmd == "add":
            lab.pod_add(args.node, args.pod, labels=_kv(args.label, "label"), pool=args.pool,
                        ports=[parse_port(p) for p in args.port])
            print("\n".join(lab.pod(args.pod).addresses))  # every address, one a line, IPv4 first
        elif args.pod_cmd == "del":
            lab.pod_del(args.pod)
        else:
            remove = [x[:-1] for x in args.labels if x.endswith("-") and "=" not in x]
            labels = lab.pod_label(args.pod, _kv([x for x in args.labels if "=" in x], "label"), remove)
            print(json.dumps(labels, sort_keys=True))
        return 0
    if args.cmd == "svc":
        return services.run(lab, args)
    if args.cmd == "agent":
        if args.action in ("stop", "restart"):
            lab.agent_stop(args.node, signal.SIGKILL if args.kill else signal.SIGTERM)
        if args.action in ("start", "restart"):
            lab.agent_start(args.node)
        print(f"agent on {args.node}: {'running' if args.action != 'stop' else 'stopped'}")
        return 0
    if args.cmd == "router":
        if args.action == "bfd":
            if args.router not in ("on", "off"):
                raise ValidationError(f"router bfd on|off, not {args.router!r}", field="router")
            lab.router_bfd(args.router == "on")
            print(f"BFD on the routers: {args.router}")
            return 0
        if args.action in ("announce", "withdraw"):
            if not args.prefix:
                raise ValidationError(f"router {args.action} NAME PREFIX: no prefix given", field="prefix")
            lab.router_announce(args.router, args.prefix, on=args.action == "announce")
            print(f"router {args.router}: {'announces' if args.action == 'announce' else 'withdrew'} {args.prefix}")
            return 0
        if args.prefix:
            raise ValidationError(f"router {args.action} takes no prefix", field="prefix")
        (lab.router_stop if args.action == "stop" else lab.router_start)(args.router)
        print(f"router {args.router}: {'stopped' if args.action == 'stop' else 'running'}")
        return 0
    if args.cmd == "etcd":
        if args.member and args.action in ("pause", "resume"):
            raise ValidationError(f"etcd {args.action} acts on every member: no MEMBER", field="member")
        who = "etcd"
        if args.action == "stop":
            who = f"etcd member {lab.etcd_stop(args.member, signal.SIGKILL if args.kill else signal.SIGTERM)}"
        elif args.action == "start":
            lab.etcd_start(args.member)
            who = f"etcd member {args.member}" if args.member else who
        else:
            (lab.etcd_pause if args.action == "pause" else lab.etcd_resume)()
        print(f"{who}: {dict(stop='stopped', start='running', pause='paused', resume='running')[args.action]}")
        return 0
    if args.cmd == "link":
        lab.link_set(args.node, args.ifname, up=args.action == "up")
        print(f"{args.node} {args.ifname}: {args.action}")
        return 0
    if args.cmd == "exec":
        if not rest:
            raise ValidationError("exec NAMESPACE/NAME -- CMD ...: no command given", field="cmd")
        return lab.exec(args.pod, rest).returncode
    if args.cmd == "probe":
        r = lab.probe(args.src, args.dst, args.port, udp=args.udp, timeout=args.timeout, family=args.family)
        if args.show and r.ok:
            print(r.reply)
        detail = f"answered {r.reply!r}" if r.ok else (r.error or "no answer")
        print(f"{r.src} -> {r.dst} ({r.addr}) {r.proto}/{r.port}: {'ok' if r.ok else 'FAIL'}, "
              f"{detail}, {r.ms} ms")
        return 0 if r.ok else 1
    if args.cmd == "matrix":
        m = lab.matrix(args.port, nodes=not args.no_nodes, family=args.family)
        if args.output == "json":
            print(json.dumps({"port": m.port, "ok": m.ok, "results": [r.__dict__ for r in m.results]}, indent=2))
        else:
            print(m.render())
            for r in m.failures:
                print(f"  {r.src} -> {r.dst} {r.proto}: {r.error or 'no answer'}")
        return 0 if m.ok else 1
    if args.cmd == "ctl":
        # Only `-f -` reads stdin: an inherited pipe that never closes must not hang other commands.
        wants_stdin = any(a == "-" and i > 0 and rest[i - 1] in ("-f", "--filename")
                          for i, a in enumerate(rest))
        r = lab.ctl(*rest, input=sys.stdin.read() if wants_stdin else None, check=False)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        return r.returncode
    if args.cmd == "status":
        s = lab.status()
        if args.output == "json":
            print(json.dumps(s, indent=2))
        else:
            _print_status(s)
        return 0
    raise ValidationError(f"unknown command {args.cmd}")


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except TortieError as exc:
        print(f"tortie-lab: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tortie-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
