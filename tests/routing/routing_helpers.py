"""Helpers for routing tests: a node namespace with two veth pairs, reading its routes and
rules the way an operator would (``ip -j``), counting route notifications, waiting."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import strategies as st

from tortie.routing import netlink as nl
from tortie.routing.model import TORTIE_PROTO, Route


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


@contextmanager
def scratch_netns(tag: str) -> Iterator[str]:
    """A namespace for one hypothesis example (function fixtures do not reset per example)."""
    name = f"tt-{uuid.uuid4().hex[:8]}-{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def without_dev(r: Route) -> Route:
    """The route with the device left to the kernel (how a gateway route is desired)."""
    return Route(r.dst, table=r.table, type=r.type, gateways=r.gateways, scope=r.scope,
                 onlink=r.onlink, src=r.src, metric=r.metric)


def route_strategy(links: tuple[str, ...]):
    """Routes on a few keys of both families: to a device, via one or two gateways
    (10.9.0.2/.3, fd00:9::2/3), blackhole; main table or table 1000."""
    def make(v6: bool, i: int, how: str, dev: str, ecmp: bool, table: int) -> Route:
        dst = f"fd00:1::{i}/128" if v6 else f"10.1.0.{i}/32"
        gws = ("fd00:9::2", "fd00:9::3") if v6 else ("10.9.0.2", "10.9.0.3")
        if how == "dev":
            return Route(dst, dev=dev, table=table)
        if how == "gw":
            return Route(dst, gateways=gws if ecmp else gws[:1], table=table)
        return Route(dst, type="blackhole", table=table)

    return st.builds(make, st.booleans(), st.integers(0, 5), st.sampled_from(["dev", "gw", "bh"]),
                     st.sampled_from(links), st.booleans(), st.sampled_from([254, 1000]))


def step_strategy(classes: tuple[str, ...], links: tuple[str, ...]):
    """One step of a property test: a desired-state change, a hand edit (delete; change of
    device, keeping tortie's protocol or not), a link deleted or added, or an apply."""
    routes = route_strategy(links)
    return st.one_of(
        st.tuples(st.just("set_routes"), st.sampled_from(classes), st.lists(routes, max_size=6)),
        st.tuples(st.just("set_route"), st.sampled_from(classes), routes),
        st.tuples(st.just("remove_route"), st.sampled_from(classes), routes),
        st.tuples(st.just("hand_delete"), routes),
        st.tuples(st.just("hand_change"), routes, st.sampled_from(links), st.booleans()),
        st.tuples(st.just("link_del"), st.sampled_from(links)),
        st.tuples(st.just("link_add"), st.sampled_from(links)),
        st.tuples(st.just("apply")),
    )


def desired_step(m, step: tuple) -> bool:
    """Apply a desired-state step to RouteManager ``m``; False if it is another kind."""
    kind = step[0]
    if kind == "set_routes":
        m.set_routes(step[1], {r.key: r for r in step[2]}.values())
    elif kind == "set_route":
        m.set_route(step[1], step[2])
    elif kind == "remove_route":
        m.remove_route(step[1], step[2].key)
    else:
        return False
    return True


def assert_converged(m, have: dict, links) -> None:
    """The kernel (``have``: key -> Route of ours) holds exactly the desired routes whose
    devices exist, and the rest are pending. A route that names no device leaves the choice
    to the kernel (the gateway's): which device it has is not a difference."""
    want = {k: r for k, r in m.desired().items() if r.dev is None or r.dev in links}
    assert {k: without_dev(r) if k in want and want[k].dev is None else r
            for k, r in have.items()} == want
    assert m.pending == {k for k in m.desired() if k not in want}
