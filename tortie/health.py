"""Health and metrics over HTTP.

Liveness: every component has reported a successful round within its deadline (a wedged
apply loop fails it). Readiness: additionally, the first full sync has been applied.
Heartbeats are only recorded after the work succeeded, never before.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tortie.log import get_logger
from tortie.metrics import Registry

log = get_logger("health")


@dataclass
class _Component:
    deadline: float
    last_ok: float = 0.0
    last_error: str | None = None


class Health:
    def __init__(self) -> None:
        self.components: dict[str, _Component] = {}
        self.ready = False
        # Conditions that make the node not ready while it stays live (an egress pool whose
        # traffic is refused): name -> why.
        self.conditions: dict[str, str] = {}
        # called first by report(): heartbeats read from their source when asked, not by a timer
        self.refresh: Callable[[], None] | None = None

    def condition(self, name: str, problem: str | None) -> None:
        """Set (or with None clear) a readiness condition."""
        if problem is None:
            self.conditions.pop(name, None)
        else:
            self.conditions[name] = problem

    def register(self, name: str, deadline: float) -> None:
        self.components[name] = _Component(deadline=deadline, last_ok=time.monotonic())

    def ok(self, name: str) -> None:
        c = self.components[name]
        c.last_ok, c.last_error = time.monotonic(), None

    def failed(self, name: str, error: str) -> None:
        self.components[name].last_error = error

    def report(self) -> tuple[bool, bool, dict]:
        if self.refresh is not None:
            self.refresh()
        now = time.monotonic()
        detail = {}
        live = True
        for name, c in self.components.items():
            fresh = now - c.last_ok <= c.deadline
            live &= fresh
            detail[name] = {"live": fresh, "sinceOk": round(now - c.last_ok, 3), "lastError": c.last_error}
        for name, problem in self.conditions.items():
            detail.setdefault(name, {})["notReady"] = problem
        return live, live and self.ready and not self.conditions, detail


async def _serve(host: str, port: int, handler) -> asyncio.AbstractServer:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = await handler(path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_conn, host, port, reuse_address=True)


async def start_http(health: Health, registry: Registry, health_host: str, health_port: int,
                     metrics_host: str, metrics_port: int,
                     on_scrape: Callable[[], Awaitable[None]] | None = None) -> list[asyncio.AbstractServer]:
    """/liveness and /readiness on health_host:health_port, /metrics on metrics_host:metrics_port;
    `on_scrape` runs before each /metrics is rendered (the agent samples its loop lag)."""

    async def health_handler(path: str):
        live, ready, detail = health.report()
        if path == "/liveness":
            ok = live
        elif path == "/readiness":
            ok = ready
        else:
            return 404, "text/plain", b"not found\n"
        body = json.dumps({"ok": ok, "ready": ready, "components": detail}).encode() + b"\n"
        return (200 if ok else 503), "application/json", body

    async def metrics_handler(path: str):
        if path != "/metrics":
            return 404, "text/plain", b"not found\n"
        if on_scrape is not None:
            await on_scrape()
        return 200, "text/plain; version=0.0.4", registry.render().encode()

    servers = [await _serve(health_host, health_port, health_handler)]
    if metrics_port != health_port:
        servers.append(await _serve(metrics_host, metrics_port, metrics_handler))
    else:
        log.warning("metrics share the health port; /metrics not served")
    return servers
