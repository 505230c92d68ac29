"""Helpers for routing tests: a node namespace with two veth pairs, reading its routes and
rules the way an operator would (``ip -j``), counting route notifications, waiting."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from tortie.routing import netlink as nl
from tortie.routing.model import TORTIE_PROTO


class Node:
    """A network namespace with veths vA<->vB and vC<->vD (all up) and addresses on vA."""

    def __init__(self, name: str) -> None:
        self.ns = name
        for args in (
            "link add vA type veth peer name vB",
            "link add vC type veth peer name vD",
            "link set vA up", "link set vB up", "link set vC up", "link set vD up",
            "addr add 10.9.0.1/24 dev vA",
            "addr add 10.8.0.1/24 dev vC",
            "-6 addr add fd00:9::1/64 dev vA nodad",
        ):
            self.ip(*args.split())

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.ns, *args], check=check, capture_output=True,
                              text=True)

    def routes(self, proto: int | None = TORTIE_PROTO) -> list[dict]:
        """Every route of both families in every table (optionally of one protocol)."""
        out = []
        for fam in ("-4", "-6"):
            sel = ["proto", str(proto)] if proto is not None else []
            res = self.ip("-j", "-d", fam, "route", "show", "table", "all", *sel)
            out += json.loads(res.stdout or "[]")
        return out

    def route_dsts(self, proto: int | None = TORTIE_PROTO) -> set[str]:
        return {r["dst"] for r in self.routes(proto)}

    def rules(self, family: str = "-4") -> list[dict]:
        return json.loads(self.ip("-j", family, "rule", "show").stdout or "[]")


class RouteEvents:
    """Counts route notifications in a namespace: evidence that nothing was rewritten."""

    def __init__(self, ns: str) -> None:
        self.sock = nl.NetlinkSocket(ns, groups=(nl.RTNLGRP_IPV4_ROUTE, nl.RTNLGRP_IPV6_ROUTE))

    def take(self) -> list[tuple[int, str]]:
        """(message type, dst) of every route notification since the last call."""
        out: list = []
        for buf in self.sock.recv_nowait():
            nl.parse_routes(buf, {}, None, out)
        return [(t, r.dst) for t, _p, r in out]

    def close(self) -> None:
        self.sock.close()


def wait_until(pred, timeout: float, step: float = 0.01) -> float:
    """Poll ``pred`` until true; returns the seconds it took, raises on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


async def async_wait_until(pred, timeout: float, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - t0
