"""Reading a test namespace's nftables from outside, the way an operator would (`nft`)."""

from __future__ import annotations

import json
import subprocess


def nft(netns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True, text=True)


def list_table(netns: str, family: str, name: str) -> str | None:
    """The table as nft prints it, or None when it does not exist."""
    r = nft(netns, "list", "table", family, name)
    return r.stdout if r.returncode == 0 else None


def objects(netns: str, family: str, name: str) -> list[dict]:
    """The table's JSON objects with their handles (`nft -j -a list table`)."""
    r = nft(netns, "-j", "-a", "list", "table", family, name)
    assert r.returncode == 0, r.stderr
    return [o for o in json.loads(r.stdout)["nftables"] if "metainfo" not in o]


def handles(netns: str, family: str, name: str) -> dict[tuple, int]:
    """Every table, chain, set, counter and rule by identity -> its kernel handle: an
    object rewritten gets a new handle, one left alone keeps it."""
    out = {}
    for o in objects(netns, family, name):
        (kind, v), = o.items()
        ident = (kind, v.get("chain", ""), v.get("comment", "") if kind == "rule" else v["name"])
        out[ident] = v["handle"]
    return out


def counter(netns: str, family: str, table: str, name: str) -> tuple[int, int]:
    """(packets, bytes) of a named counter."""
    r = nft(netns, "-j", "list", "counter", family, table, name)
    assert r.returncode == 0, r.stderr
    c = next(o["counter"] for o in json.loads(r.stdout)["nftables"] if "counter" in o)
    return c["packets"], c["bytes"]


def wire(node: str, ns: str, host_if: str, net: str) -> None:
    """A veth from `node` (host_if, <net>.1/24) to `ns` (eth0, <net>.2/24, default via .1)."""
    for args in (("-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns),
                 ("-n", node, "addr", "add", f"{net}.1/24", "dev", host_if),
                 ("-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0"),
                 ("-n", node, "link", "set", host_if, "up"),
                 ("-n", ns, "link", "set", "eth0", "up"),
                 ("-n", ns, "route", "add", "default", "via", f"{net}.1")):
        subprocess.run(["ip", *args], check=True)
