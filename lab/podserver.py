"""One process per lab that serves TCP and UDP on ports 80 and 81 in every pod.

Cheaper than a server process per pod: for each pod it switches its thread into the
pod's namespace, creates the listening sockets there (TCP and UDP, IPv4 and IPv6), and
switches back (a socket stays in the namespace it was made in). TCP answers each
connection, UDP each datagram, with `<pod name> <client address as the pod saw it>`: a
probe learns which pod answered and whether the source address survived (a Service's
masquerade, or not).

Pods are added and removed over a control socket (one JSON object per line):
    {"op": "add", "pod": "ns/name", "netns": "<netns name>"}  -> {"ok": true}
    {"op": "del", "pod": "ns/name"}                            -> {"ok": true}
    {"op": "list"}                                             -> {"ok": true, "pods": [...]}
Run: python -m tortie.lab.podserver --control PATH [--state STATE_JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket

from tortie.errors import DataplaneError
from tortie.lab import nsutil
from tortie.log import configure, get_logger

PORTS = (80, 81)
# TCP and UDP over both families: a dual-stack pod answers on each of its addresses
_SOCKETS = [(fam, kind) for fam in (socket.AF_INET, socket.AF_INET6) if fam != socket.AF_INET6 or socket.has_ipv6
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]
log = get_logger("lab.podserver")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, pod: str) -> None:
        self.pod = pod
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.pod} {addr[0]}\n".encode(), addr)


class PodServer:
    def __init__(self) -> None:
        self.pods: dict[str, list] = {}  # pod -> its servers and transports

    async def add(self, pod: str, netns: str) -> None:
        if pod in self.pods:
            await self.remove(pod)
        socks: list[socket.socket] = []
        try:
            with nsutil.in_netns(netns):
                for port in PORTS:
                    for fam, kind in _SOCKETS:
                        s = socket.socket(fam, kind)
                        socks.append(s)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        if fam == socket.AF_INET6:  # its own socket: IPv4 keeps the one above
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                        s.setblocking(False)
        except BaseException:
            for s in socks:
                s.close()
            raise
        loop = asyncio.get_running_loop()
        handles: list = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                peer = writer.get_extra_info("peername") or ("?",)
                writer.write(f"{pod} {peer[0]}\n".encode())
                await writer.drain()
            writer.close()

        for s in socks:
            if s.type == socket.SOCK_STREAM:
                s.listen(128)
                handles.append(await asyncio.start_server(answer, sock=s))
            else:
                transport, _ = await loop.create_datagram_endpoint(lambda: _Echo(pod), sock=s)
                handles.append(transport)
        self.pods[pod] = handles
        log.info("pod served", pod=pod, netns=netns)

    async def remove(self, pod: str) -> None:
        for h in self.pods.pop(pod, []):
            h.close()
            if isinstance(h, asyncio.Server):
                await h.wait_closed()
        log.info("pod removed", pod=pod)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    op = req.get("op")
                    if op == "add":
                        await self.add(req["pod"], req["netns"])
                        resp = {"ok": True}
                    elif op == "del":
                        await self.remove(req["pod"])
                        resp = {"ok": True}
                    elif op == "list":
                        resp = {"ok": True, "pods": sorted(self.pods)}
                    else:
                        resp = {"ok": False, "error": f"unknown op {op!r}"}
                except (ValueError, KeyError, OSError, DataplaneError) as exc:
                    resp = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(resp).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


async def serve(control_path: str, state_path: str | None) -> None:
    server = PodServer()
    if state_path and os.path.exists(state_path):
        # A restarted server picks up the pods the lab already has.
        with open(state_path) as f:
            for ref, pod in json.load(f).get("pods", {}).items():
                with contextlib.suppress(OSError, DataplaneError):
                    await server.add(ref, pod["netns"])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_path)
    ctl = await asyncio.start_unix_server(server.control, path=control_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("podserver ready", control=control_path)
    await stop.wait()
    ctl.close()
    for pod in list(server.pods):
        await server.remove(pod)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_path)


def request(control_path: str, req: dict, timeout: float = 5.0) -> dict:
    """Send one request to a running pod server and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    resp = json.loads(buf or b"{}")
    if not resp.get("ok"):
        raise DataplaneError(f"podserver {req.get('op')}: {resp.get('error', 'no answer')}")
    return resp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tortie-lab-podserver")
    ap.add_argument("--control", required=True, help="unix socket path for add/del requests")
    ap.add_argument("--state", help="the lab's state.json, to serve its pods on start")
    args = ap.parse_args(argv)
    configure(fmt="json")
    asyncio.run(serve(args.control, args.state))


if __name__ == "__main__":
    main()
