"""`tortiectl`: manage tortie's resources in etcd, calicoctl-style.

    tortiectl apply|create|replace -f FILE|DIR|- ...
    tortiectl get KIND [NAME ...] [-n NS | -A] [-l SELECTOR] [-o table|wide|yaml|json|name]
    tortiectl delete KIND NAME ... | -f FILE  [--ignore-not-found]
    tortiectl label KIND NAME key=value ... key- ... [--overwrite]
    tortiectl node status [NODE ...] [-o json]
    tortiectl ipam ...          (ctl/ipam.py)
    tortiectl version

The datastore comes from --etcd-* flags (anywhere on the line), else TORTIE_ETCD_ENDPOINTS / _CA / _CERT / _KEY /
_PREFIX. Errors print one line on stderr; the exit code is the tortie error's
(2 invalid input, 3 not found, 4 already exists, 5 conflict, 6 datastore unavailable).

Subcommand modules plug in with `register(subparsers)`: add a parser and set
`func=handler` with `handler(ctx, args) -> int`; `ctx` is the `Context` below.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import cached_property
from typing import TextIO

from tortie import log as tlog
from tortie.ctl import commands, ipam, output
from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.errors import TortieError


class Context:
    """What a command needs: the datastore (connected on first use) and where to print."""

    def __init__(self, config: EtcdConfig, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    @cached_property
    def client(self) -> EtcdClient:
        return EtcdClient(self.config)

    @cached_property
    def store(self):
        from tortie.datastore.store import ResourceStore

        return ResourceStore(self.client)

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()


def _files(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-f", "--filename", action="append", required=required, default=[] if not required else None,
                   metavar="FILE", help="YAML/JSON file, directory of them, or - for stdin (repeatable)")


def _namespace(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default="default", help="namespace of namespaced kinds (default: default)")


def global_parser() -> argparse.ArgumentParser:
    """The flags every command takes, before or after the command's name."""
    ap = argparse.ArgumentParser(add_help=False)
    g = ap.add_argument_group("datastore (before or after the command)")
    g.add_argument("--etcd-endpoints", metavar="URLS", help="comma-separated (env TORTIE_ETCD_ENDPOINTS)")
    g.add_argument("--etcd-ca", metavar="FILE")
    g.add_argument("--etcd-cert", metavar="FILE")
    g.add_argument("--etcd-key", metavar="FILE")
    g.add_argument("--etcd-prefix", metavar="PREFIX", help="key prefix (default /tortie/)")
    g.add_argument("--timeout", type=float, help="seconds per etcd request")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="log what happens (-vv: debug)")
    return ap


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tortiectl", description="manage tortie resources in etcd",
                                 parents=[global_parser()])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, fn, text in (("apply", commands.cmd_apply, "create or update resources from files"),
                           ("create", commands.cmd_create, "create resources; fail if they exist"),
                           ("replace", commands.cmd_replace, "replace resources; fail if they do not exist")):
        p = sub.add_parser(name, help=text)
        _files(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("get", help="show resources")
    p.add_argument("kind", help="ippool, ipamconfig, node, bgppeer, bgpconfig, wep, networkpolicy, namespace")
    p.add_argument("names", nargs="*", metavar="NAME")
    _namespace(p)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", help="only resources whose labels match (selector syntax)")
    p.add_argument("-o", "--output", default="table", choices=output.FORMATS)
    p.set_defaults(func=commands.cmd_get)

    p = sub.add_parser("delete", help="delete resources by KIND NAME... or -f FILE")
    p.add_argument("kind", nargs="?")
    p.add_argument("names", nargs="*", metavar="NAME")
    _files(p, required=False)
    _namespace(p)
    p.add_argument("--ignore-not-found", action="store_true")
    p.set_defaults(func=commands.cmd_delete)

    p = sub.add_parser("label", help="set (key=value) or remove (key-) labels")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("changes", nargs="+", metavar="key=value|key-")
    _namespace(p)
    p.add_argument("--overwrite", action="store_true", help="allow changing an existing label's value")
    p.set_defaults(func=commands.cmd_label)

    node = sub.add_parser("node", help="node commands").add_subparsers(dest="node_command", required=True,
                                                                      metavar="SUBCOMMAND")
    p = node.add_parser("status", help="the BGP sessions of nodes, as their agents last reported")
    p.add_argument("nodes", nargs="*", metavar="NODE")
    p.add_argument("-o", "--output", default="table", choices=("table", "json"))
    p.set_defaults(func=commands.cmd_node_status)

    sub.add_parser("version", help="client version and datastore reachability").set_defaults(
        func=commands.cmd_version)
    ipam.register(sub)
    return ap


def config_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> EtcdConfig:
    prefix = args.etcd_prefix
    if prefix is not None and not prefix.endswith("/"):
        prefix += "/"
    return EtcdConfig.from_env(env, endpoints=args.etcd_endpoints, ca=args.etcd_ca, cert=args.etcd_cert,
                               key=args.etcd_key, prefix=prefix, timeout=args.timeout)


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    # Global flags may stand anywhere (`tortiectl get pools --etcd-endpoints ...`): take
    # them out first, then parse the command from what is left.
    flags, rest = global_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    for name, value in vars(flags).items():
        setattr(args, name, value)
    level = {0: os.environ.get("TORTIE_LOG_LEVEL", "warning"), 1: "info"}.get(args.verbose, "debug")
    tlog.configure(level=level, stream=err)
    ctx = None
    try:
        ctx = Context(config_from(args), out=out, err=err)
        return args.func(ctx, args) or 0
    except TortieError as exc:
        print(f"tortiectl: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tortiectl get ... | head`
        return 0
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
