"""Health check node ports of `externalTrafficPolicy: Local` LoadBalancer Services.

As kube-proxy serves them: an HTTP server on each `healthCheckNodePort` (every node
address) answering `GET /` with 200 while the Service has a ready endpoint on this node
and 503 otherwise, the body a JSON object naming the Service and its local endpoint count.
A load balancer probing the nodes then sends traffic only to the nodes that can take it.

`HealthCheckManager` (a `tortie.dataplane.Manager`, fed `HealthCheckUpdate`): `apply()`
opens servers for new ports and closes the ones no longer wanted; a changed count needs
no socket work (read at request time). A port it cannot bind stays pending and is
reported (the driver retries it).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tortie.errors import DataplaneError
from tortie.log import get_logger
from tortie.policy.svc_model import HealthCheckUpdate

log = get_logger("proxy")


class HealthCheckManager:
    name = "healthchecks"

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.host = host
        self.wanted: dict[int, tuple[str, int]] = {}  # port -> (service, ready local endpoints)
        self.servers: dict[int, ThreadingHTTPServer] = {}

    def on_update(self, msg: object) -> None:
        if isinstance(msg, HealthCheckUpdate):
            if msg.local_endpoints is None:
                self.wanted.pop(msg.port, None)
            else:
                self.wanted[msg.port] = (msg.service, msg.local_endpoints)

    @property
    def dirty(self) -> bool:
        return self.wanted.keys() != self.servers.keys()

    def resync(self) -> None:
        """Nothing to read back: the servers are this process's own."""

    def apply(self) -> None:
        for port in self.servers.keys() - self.wanted.keys():
            server = self.servers.pop(port)
            server.shutdown()
            server.server_close()
        failed = []
        for port in self.wanted.keys() - self.servers.keys():
            try:
                self.servers[port] = self._serve(port)
            except OSError as exc:
                failed.append(f"{port}: {exc.strerror or exc}")
        if failed:
            raise DataplaneError(f"health check node ports not served: {', '.join(failed)}")

    def _serve(self, port: int) -> ThreadingHTTPServer:
        wanted = self.wanted

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service, count = wanted.get(port, ("", 0))
                ns, _, name = service.partition("/")
                body = json.dumps({"service": {"namespace": ns, "name": name}, "localEndpoints": count,
                                   "serviceProxyHealthy": True}).encode()
                self.send_response(200 if count > 0 else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass

        server = ThreadingHTTPServer((self.host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
        log.info("health check node port served", port=port, service=self.wanted[port][0])
        return server


__all__ = ["HealthCheckManager"]
