"""Helpers for the IPAM tests: resources, etcd readers, and the code that runs in
child processes (spawned, so it lives in an importable module)."""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.ipam import DEFAULT_NETWORK, IPAM
from tortie.datastore.ipam_blocks import Block
from tortie.datastore.keys import IPAM_BLOCKS as BLOCKS
from tortie.datastore.store import ResourceStore
from tortie.errors import AlreadyExists, IPAMError, PoolExhausted

API = "tortie.io/v1"


def make_pool(store: ResourceStore, name: str, cidr: str, **spec) -> dict:
    return store.create({"apiVersion": API, "kind": "IPPool", "metadata": {"name": name},
                         "spec": {"cidr": cidr, **spec}})


def make_node(store: ResourceStore, name: str, labels: dict | None = None) -> dict:
    meta = {"name": name, **({"labels": labels} if labels else {})}
    return store.apply({"apiVersion": API, "kind": "Node", "metadata": meta, "spec": {}})


def make_wep(store: ResourceStore, node: str, container_id: str, pod: str | None = None) -> dict:
    pod = pod or f"pod-{container_id}"
    return store.create({"apiVersion": API, "kind": "WorkloadEndpoint",
                         "metadata": {"name": pod, "namespace": "default"},
                         "spec": {"node": node, "pod": pod, "containerID": container_id}})


def handle_for(container_id: str) -> str:
    return f"{DEFAULT_NETWORK}.{container_id}"


def held(client: EtcdClient) -> dict[str, str]:
    """ip -> handle for every allocated address, read straight from etcd."""
    kvs, _ = client.get_prefix(client.config.prefix + BLOCKS)
    out: dict[str, str] = {}
    for kv in kvs:
        for h in Block.from_json(kv.value).held():
            assert h.ip not in out, f"{h.ip} appears in two blocks"
            out[h.ip] = h.attr.handle
    return out


def by_handle(client: EtcdClient) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for ip, handle in held(client).items():
        out[handle].add(ip)
    return dict(out)


def overlaps(events: list[tuple]) -> list[str]:
    """Double allocations proven by a log of ("hold", t, ip, handle) -- t after the
    allocation returned -- and ("unhold", t, ip, handle) -- t before the release began.
    Each (ip, handle) interval between them is certainly held; two such intervals of
    different handles on one address that overlap mean the address was given twice."""
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    open_: dict[tuple[str, str], float] = {}
    for kind, t, ip, handle in sorted(events, key=lambda e: e[1]):
        if kind == "hold":
            open_[(ip, handle)] = t
        elif (ip, handle) in open_:
            spans[ip].append((open_.pop((ip, handle)), t, handle))
    for (ip, handle), t in open_.items():
        spans[ip].append((t, float("inf"), handle))
    bad = []
    for ip, items in spans.items():
        for i, (a1, r1, h1) in enumerate(items):
            for a2, r2, h2 in items[i + 1:]:
                if h1 != h2 and a1 < r2 and a2 < r1:
                    bad.append(f"{ip}: {h1} [{a1:.4f},{r1:.4f}] and {h2} [{a2:.4f},{r2:.4f}]")
    return bad


# --- child processes ----------------------------------------------------------------------


def run_plan(endpoint: str, prefix: str, node: str, tag: str, ops: list, start_at: float) -> dict:
    """Property-test worker: run ops as `node`, logging what it holds and when."""
    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=prefix))
    ipam = IPAM(client)
    live: dict[str, set[str]] = defaultdict(set)
    events: list[tuple] = []
    errors: list[str] = []
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        for kind, k, n4, n6 in ops:
            handle = f"net.{tag}-{k}"
            if kind == "alloc":
                try:
                    ips = ipam.auto_assign(handle, node, num_v4=n4, num_v6=n6, attrs={"pod": f"p{k}"})
                except PoolExhausted:
                    continue
                t = time.monotonic()
                for ip in ips:
                    if ip in live[handle]:
                        errors.append(f"{ip} given twice to {handle}")
                    live[handle].add(ip)
                    events.append(("hold", t, ip, handle))
                if len(ips) != n4 + n6:
                    errors.append(f"asked {n4}+{n6}, got {ips}")
            elif kind == "assign":
                try:
                    ip = ipam.assign_ip(n4, handle, node)
                except (AlreadyExists, IPAMError):
                    continue
                events.append(("hold", time.monotonic(), ip, handle))
                if ip in live[handle]:
                    errors.append(f"{ip} given twice to {handle}")
                live[handle].add(ip)
            elif kind == "release_handle":
                t = time.monotonic()
                got = ipam.release_handle(handle)
                events += [("unhold", t, ip, handle) for ip in got]
                if set(got) != live.pop(handle, set()):
                    errors.append(f"release_handle({handle}) freed {got}")
            elif kind == "release_ip" and live.get(handle):
                ip = sorted(live[handle])[0]
                t = time.monotonic()
                got = ipam.release_ips([ip])
                events.append(("unhold", t, ip, handle))
                live[handle].discard(ip)
                if got != [ip]:
                    errors.append(f"release_ips([{ip}]) freed {got}")
            if kind != "release_ip" and set(ipam.ips_by_handle(handle)) != live.get(handle, set()):
                errors.append(f"ips_by_handle({handle}) disagrees with what it was given")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        client.close()
    return {"events": events, "live": {h: sorted(v) for h, v in live.items() if v}, "errors": errors}


def crash_child(endpoint: str, prefix: str, node: str, log_path: str, seed: int) -> None:
    """SIGKILL-test child: CNI-like ADD (allocate, then write the WorkloadEndpoint) and
    DEL (release, then delete it) in a loop until killed; every step logged first/after."""
    rng = random.Random(seed)
    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=prefix))
    ipam = IPAM(client)
    store = ResourceStore(client)
    live: list[str] = []
    with open(log_path, "a", buffering=1) as logf:
        logf.write("ready\n")
        i = 0
        while True:
            i += 1
            cid = f"{node}-{os.getpid()}-{i}"
            handle = handle_for(cid)
            ips = ipam.auto_assign(handle, node, num_v4=1, num_v6=rng.choice((0, 1)))
            logf.write(f"hold {time.monotonic()} {handle} {' '.join(ips)}\n")
            make_wep(store, node, cid)
            live.append(cid)
            if len(live) > 3 and rng.random() < 0.5:
                cid = live.pop(rng.randrange(len(live)))
                logf.write(f"unhold {time.monotonic()} {handle_for(cid)}\n")
                ipam.release_handle(handle_for(cid))
                store.delete("WorkloadEndpoint", f"pod-{cid}", "default")


def die_at(endpoint: str, prefix: str, node: str, point: str) -> None:
    """Child that SIGKILLs itself at one chosen point of an IPAM operation:
    'claim' (a block claimed but not yet confirmed), 'allocated' (the allocation
    written, the caller never told), 'release' (a two-block handle half released)."""
    import signal

    client = EtcdClient(EtcdConfig(endpoints=(endpoint,), prefix=prefix))
    ipam = IPAM(client)

    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "claim":
        ipam._confirm = die
        ipam.auto_assign("net.claim", node)
    elif point == "allocated":
        real = ipam._allocate_in

        def then_die(*a, **k):
            real(*a, **k)
            die()

        ipam._allocate_in = then_die
        ipam.auto_assign("net.allocated", node)
    elif point == "release":
        ipam.auto_assign("net.release", node, num_v4=3)  # blocks of two: spans two blocks
        real = ipam._release_where

        def once_then_die(*a, **k):
            real(*a, **k)
            die()

        ipam._release_where = once_then_die
        ipam.release_handle("net.release")
    raise AssertionError(f"{point}: still alive")
