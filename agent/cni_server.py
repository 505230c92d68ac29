"""The agent's CNI server: the other end of the `tortie` / `tortie-ipam` shims.

One unix stream socket (mode 0600); one request per connection in the shim's framing
(`tortie.cni.protocol`). Runs in the agent's event loop; every blocking step (etcd,
netlink) runs on a worker pool so the loop stays responsive and a burst of pods is
served in parallel. Requests for the same container id are serialized; different
containers only meet inside IPAM (which orders its own block writes).

ADD (type tortie):  IPAM (handle `<network>.<containerID>`; with a Kubernetes API, the
                    pod's pools and named ports from one read of it) -> veth + pod wiring
                    and the WorkloadEndpoint write (labels from args.cni.labels, ports
                    from args.cni.ports or the API) in parallel -> the pod's host
                    route handed to its one owner, the route manager (through the
                    agent's dataplane driver), and applied -> result. Any failure after IPAM undoes it all.
                    The calculation derives the same route from the WorkloadEndpoint
                    when it arrives: same class, same value, nothing more to write.
DEL:                veth, allocation and endpoint removed; each may already be gone.
                    etcd unreachable: the veth goes, the rest is done when etcd is back.
CHECK:              veth, pod address, pod routes and host route must all be in place.
STATUS / GC:        etcd reachable and a usable pool / release what the runtime no
                    longer knows about (this node's allocations of this network only).
tortie-ipam:        addresses only, for other main plugins (bridge, ptp).
While the datastore monitor says etcd is unreachable, ADD, CHECK and GC answer 11 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tortie import errors
from tortie.agent import cni_request
from tortie.agent.cni_pending import Cleanup, PendingCleanups
from tortie.agent.cni_routes import LocalRoutes
from tortie.cni import protocol as p
from tortie.cni import wiring
from tortie.datastore.ipam_blocks import wep_handle
from tortie.log import get_logger
from tortie.routing.model import TORTIE_PROTO, Route, route_key

if TYPE_CHECKING:
    from tortie.kube.podinfo import PodDetails

MAX_REQUEST = 4 << 20
READ_TIMEOUT = 30.0  # a client that never finishes its request is dropped
# A CNI request's etcd calls wait at most this long each: with etcd frozen or without
# quorum, an ADD is answered "try again later" within 2 s (issue 12), not after 5.
ETCD_TIMEOUT = 1.5

# (routes to set, keys to remove) -> awaitable that resolves once they are in the kernel
RoutePublisher = Callable[[tuple[Route, ...], tuple[tuple[int, int, str], ...]], Awaitable[None]]


def wep_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """Calico's endpoint naming: parts joined by '-', dashes inside a part doubled."""
    return "-".join(part.replace("-", "--") for part in (node, orchestrator, workload, endpoint))


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("/")[0])
    return f"{addr}/{addr.max_prefixlen}"


class CNIServer:
    """Serve CNI requests for one node on a unix socket."""

    def __init__(self, socket_path: str, *, node_name: str, ipam: Any, store: Any,
                 publish_routes: RoutePublisher | None = None,
                 log: Any = None,
                 route_proto: int = TORTIE_PROTO,
                 set_forwarding: bool = True, workers: int = 32,
                 pod_lookup: Callable[[str, str], PodDetails] | None = None,
                 datastore_up: Callable[[], bool] | None = None, state_dir: str | None = None,
                 datastore_failed: Callable[[str], None] | None = None) -> None:
        self.socket_path = socket_path
        self.node = node_name
        self.ipam = ipam
        self.store = store
        # The pod's /32 has one owner, the route manager: the server hands it over and
        # waits until it is in the kernel (standalone: a route manager of its own).
        self.publish_routes = publish_routes or LocalRoutes(route_proto).publish
        self.pod_mtu: Callable[[list[str]], int] | None = None  # the agent's: VXLAN pools' pods
        self.route_proto = route_proto
        self.set_forwarding = set_forwarding
        self.log = log or get_logger("cni")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tortie-cni")
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        # What the Kubernetes API says of a pod: (namespace, name) -> the pools it asks for
        # by annotation and its named ports. None: no API.
        self.pod_lookup = pod_lookup if pod_lookup is not None else pod_lookup_from_env()
        # The datastore monitor's word: while it says down, requests that need etcd fail fast.
        self.datastore_up = datastore_up or (lambda: True)
        # told when a request found etcd unreachable (the monitor probes slowly while all is well)
        self.datastore_failed = datastore_failed
        state_dir = state_dir or os.path.dirname(socket_path) or "."
        self.pending = PendingCleanups(os.path.join(state_dir, "cni-pending.json"), self._finish,
                                       self._container_lock, self.datastore_up)
        self._pending_task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.set_forwarding:
            await self._run(wiring.enable_forwarding)
        sock = self._bind()
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        self._pending_task = asyncio.create_task(self.pending.run(), name="cni-pending")
        self.log.info("cni server listening", socket=self.socket_path, node=self.node)

    def _bind(self) -> socket.socket:
        """Bind at a temporary name, chmod 0600, then rename over the path: no window
        in which the socket exists with a looser mode, and a stale socket is replaced."""
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(tmp)
            finally:
                os.umask(old)
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.socket_path)
            sock.listen(256)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._inode = os.stat(self.socket_path).st_ino
        return sock

    async def stop(self) -> None:
        if self._pending_task is not None:
            self._pending_task.cancel()
            await asyncio.gather(self._pending_task, return_exceptions=True)
            self._pending_task = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.socket_path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:  # not a successor's
                os.unlink(self.socket_path)
        self._pool.shutdown(wait=True, cancel_futures=False)

    # ---- plumbing -----------------------------------------------------------------------

    async def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def _container_lock(self, cid: str):
        lock, users = self._locks.get(cid, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[cid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[cid]
            if users <= 1:
                del self._locks[cid]
            else:
                self._locks[cid] = (lock, users - 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(self._read_request(reader), READ_TIMEOUT)
            if len(data) > MAX_REQUEST:  # read the rest (and drop it): the shim waits for an answer
                size = len(data) + await asyncio.wait_for(_drain(reader), READ_TIMEOUT)
                status, body = 1, p.CNIError(p.INVALID_CONFIG, _too_large(size)).to_json(p.SUPPORTED_VERSIONS[-1])
            else:
                status, body = await self.handle(data)
            writer.write(p.encode_response(status, body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.log.warning("cni client went away", error=str(exc) or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        data = b""
        while len(data) <= MAX_REQUEST:  # until the shim half-closes after its request
            more = await reader.read(MAX_REQUEST + 1 - len(data))
            if not more:
                break
            data += more
        return data

    async def handle(self, data: bytes) -> tuple[int, bytes]:
        """One framed request -> (exit status, stdout bytes). Never raises."""
        version = p.SUPPORTED_VERSIONS[-1]
        req = None
        try:
            if len(data) > MAX_REQUEST:
                raise p.CNIError(p.INVALID_CONFIG, _too_large(len(data)))
            env, stdin = p.decode_request(data)
            version = p.version_of(stdin)
            req = p.parse_request(env, stdin)
            version = req.cni_version
            out = await self.dispatch(req)
            return 0, out
        except Exception as exc:
            exc = _datastore_error(exc)
            if isinstance(exc, errors.DatastoreUnavailable) and self.datastore_failed is not None:
                self.datastore_failed(str(exc))
            err = p.CNIError.from_exception(exc)
            fields = {"code": err.code, "error": err.msg}
            if req is not None:
                fields.update(command=req.command, container=req.container_id, plugin=req.plugin)
            if err.code in (p.GENERIC, p.TRY_AGAIN_LATER) and not isinstance(exc, p.CNIError | errors.TortieError):
                self.log.error("cni request failed", exc_info=exc, **fields)
            else:
                self.log.warning("cni request failed", **fields)
            return 1, err.to_json(version)

    async def dispatch(self, req: p.CNIRequest) -> bytes:
        if req.command == "VERSION":
            return p.version_result(req.cni_version)
        if req.command != "DEL" and not self.datastore_up():
            if req.command == "STATUS":
                raise p.CNIError(p.NOT_AVAILABLE, "plugin not available: datastore unreachable")
            raise errors.DatastoreUnavailable("etcd unreachable (the agent's datastore monitor says "
                                              "so); try again later")
        if req.command == "STATUS":
            await self._run(self._status, req)
            return b""
        if req.command == "GC":
            await self._gc(req)
            return b""
        async with self._container_lock(req.container_id):
            if req.is_ipam:
                handler = {"ADD": self._ipam_add, "DEL": self._ipam_del, "CHECK": self._ipam_check}
            else:
                handler = {"ADD": self._add, "DEL": self._del, "CHECK": self._check}
            return await handler[req.command](req)

    # ---- request details ----------------------------------------------------------------

    async def _allocate(self, req: p.CNIRequest) -> tuple[list[str], bool, list[dict]]:
        """(addresses, newly allocated, the pod's named ports as the API gives them): the
        handle's existing addresses make ADD idempotent. The API is asked on a first ADD
        only; a repeated one keeps the ports from args.cni (the controller mirrors them)."""
        def allocate() -> tuple[list[str], bool, list[dict]]:  # one worker hop for the whole of it
            held = self.ipam.ips_by_handle(req.handle)
            if held:
                return sorted(held, key=_ip_sort), False, []
            asked: tuple[list[str], list[str]] = ([], [])
            ports: list[dict] = []
            if self.pod_lookup is not None and req.pod_name:
                found = self.pod_lookup(req.pod_namespace or "default", req.pod_name)
                asked, ports = (found.v4_pools, found.v6_pools), found.ports
            v4, v6, pools = cni_request.counts(req, asked)
            attrs = {"namespace": req.pod_namespace, "pod": req.pod_name or req.container_id,
                     "node": self.node}
            ips = self.ipam.auto_assign(req.handle, self.node, num_v4=v4, num_v6=v6, pools=pools,
                                        attrs=attrs)
            return sorted(ips, key=_ip_sort), True, ports

        return await self._run(allocate)

    def _wep(self, req: p.CNIRequest, host_if: str, mac: str, ips: list[str], ports: list[dict]) -> dict:
        """The endpoint; its ports from args.cni.ports, else from the API (`_allocate`)."""
        k8s = bool(req.pod_name)
        namespace = req.pod_namespace or "default"
        workload = req.pod_name or req.container_id
        spec = {
            "node": self.node, "orchestrator": "k8s" if k8s else "cni", "pod": workload,
            "containerID": req.container_id, "endpoint": req.ifname, "interfaceName": host_if,
            "ipNetworks": [_host_cidr(ip) for ip in ips], "ipamHandle": req.handle,
        }
        if mac:
            spec["mac"] = mac
        if req.ports or ports:
            spec["ports"] = [dict(port) for port in (req.ports or ports)]
        return {
            "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
            "metadata": {"name": wep_name(self.node, spec["orchestrator"], workload, req.ifname),
                         "namespace": namespace, "labels": dict(req.labels)},
            "spec": spec,
        }

    def _delete_wep(self, req: p.CNIRequest | Cleanup) -> None:
        cid = req.container_id
        if req.pod_name:
            names = [(req.pod_namespace or "default", wep_name(self.node, "k8s", req.pod_name, req.ifname))]
        else:  # no pod identity on DEL: find the endpoint by container id
            names = [
                (w["metadata"].get("namespace"), w["metadata"]["name"])
                for w in self.store.list("WorkloadEndpoint")
                if (w.get("spec") or {}).get("containerID") == cid
                and (w.get("spec") or {}).get("endpoint", "eth0") == req.ifname
                and (w.get("spec") or {}).get("node") == self.node
            ]
            if not names:
                names = [("default", wep_name(self.node, "cni", cid, req.ifname))]
        for namespace, name in names:
            with contextlib.suppress(errors.NotFound):
                self.store.delete("WorkloadEndpoint", name, namespace)

    def _result(self, req: p.CNIRequest, link: wiring.PodLink, ips: list[str]) -> p.Result:
        families = {ipaddress.ip_address(ip).version for ip in ips}
        routes = tuple(
            p.RouteSpec("0.0.0.0/0" if v == 4 else "::/0", wiring.GATEWAY_V4 if v == 4 else wiring.GATEWAY_V6)
            for v in sorted(families)
        )
        res = p.Result(
            interfaces=(p.Interface(link.host_ifname, link.host_mac),
                        p.Interface(req.ifname, link.pod_mac, req.netns)),
            ips=tuple(
                p.IPConfig(_host_cidr(ip), wiring.GATEWAY_V4 if ":" not in ip else wiring.GATEWAY_V6, 1)
                for ip in ips
            ),
            routes=routes,
            dns=dict(req.config.get("dns") or {}),
        )
        return res.chained_after(req.prev_result)

    async def _publish_routes(self, host_if: str, ips: list[str], add: bool) -> None:
        if add:
            await self.publish_routes(
                tuple(Route(dst=_host_cidr(ip), dev=host_if, scope="link") for ip in ips), ())
        elif ips:
            await self.publish_routes((), tuple(route_key(_host_cidr(ip)) for ip in ips))

    # ---- tortie: ADD / DEL / CHECK --------------------------------------------------------

    async def _add(self, req: p.CNIRequest) -> bytes:
        host_if = wiring.host_veth_name(req.container_id, req.ifname)
        if not wiring.is_netns(req.netns):
            raise p.CNIError(p.INVALID_ENV, f"CNI_NETNS {req.netns} is not a network namespace")
        if req.handle in self.pending:  # an earlier DEL of this container is not finished
            await self._finish(self.pending.get(req.handle))
        # The check and the allocation run side by side (two workers): the check is rarely
        # true, and an address allocated for nothing is released at once.
        elsewhere, (ips, fresh, ports) = await asyncio.gather(
            self._run(wiring.wired_elsewhere, req.netns, req.ifname, host_if), self._allocate(req))
        if elsewhere:
            # An ADD of a container already added with another CNI_NETNS would move its
            # interface out of the first namespace: refused, the first left as it is.
            if fresh:
                await self._run(self.ipam.release_handle, req.handle)
            raise p.CNIError(p.INVALID_ENV, f"container {req.container_id} already has {req.ifname} in "
                             f"another network namespace than {req.netns} (DEL it first)", host_if)
        try:
            link = None
            if not fresh:  # a repeated ADD: keep working wiring as it is
                found = await self._run(wiring.inspect_pod, req.netns, req.ifname, host_if)
                if found and {_host_cidr(ip) for ip in ips} <= found[1]:
                    link = found[0]
            mac = link.pod_mac if link else wiring.pod_mac(req.container_id, req.ifname)
            wep = self._run(functools.partial(self.store.apply, likely_new=fresh), self._wep(req, host_if, mac, ips, ports))
            if link is None:  # wire the pod while etcd writes its endpoint
                outcome = await asyncio.gather(self._wire(req, host_if, ips, mac), wep, return_exceptions=True)
                for item in outcome:
                    if isinstance(item, BaseException):
                        raise item
                link = outcome[0]
            else:
                await wep
            await self._publish_routes(host_if, ips, add=True)
        except BaseException as exc:
            await self._undo_add(req, host_if, exc)
            raise
        self.log.info("pod added", container=req.container_id, pod=f"{req.pod_namespace}/{req.pod_name}",
                      ips=ips, veth=host_if)
        return self._result(req, link, ips).to_json(req.cni_version)

    async def _wire(self, req: p.CNIRequest, host_if: str, ips: list[str], mac: str) -> wiring.PodLink:
        mtu = int(req.config.get("mtu") or 0) or (self.pod_mtu(ips) if self.pod_mtu else 0)
        setup = functools.partial(wiring.setup_pod, req.netns, req.ifname, host_if,
                                  [_host_cidr(ip) for ip in ips], mtu=mtu, mac=mac)
        try:
            return await self._run(setup)
        except wiring.NetlinkError as exc:
            if exc.errno != 17:  # EEXIST: a half-done earlier ADD of this container
                raise
        await self._run(wiring.delete_link, host_if)
        try:
            return await self._run(setup)
        except wiring.NetlinkError as exc:  # not ours on the host side: the pod side's name is taken
            if exc.errno != 17:
                raise
            raise p.CNIError(p.INVALID_ENV, f"{req.netns} already has an interface {req.ifname} "
                             "(another container's?)", str(exc)) from None

    async def _undo_add(self, req: p.CNIRequest, host_if: str, cause: BaseException) -> None:
        self.log.warning("add failed; undoing", container=req.container_id, error=str(cause))
        try:
            await self._run(wiring.delete_link, host_if)
        except Exception as exc:  # keep undoing; DEL or GC catches what is left
            self.log.error("undo step failed", container=req.container_id, error=str(exc))
        if not self.datastore_up():
            self._defer(req, "undo of a failed ADD")
            return
        for step in (functools.partial(self.ipam.release_handle, req.handle),
                     functools.partial(self._delete_wep, req)):
            try:
                await self._run(step)
            except errors.DatastoreUnavailable:
                self._defer(req, "undo of a failed ADD")
                return
            except Exception as exc:  # keep undoing; DEL or GC catches what is left
                self.log.error("undo step failed", container=req.container_id, error=str(exc))

    async def _del(self, req: p.CNIRequest) -> bytes:
        host_if = wiring.host_veth_name(req.container_id, req.ifname)
        if not self.datastore_up():  # the pod's wiring goes now, its addresses when etcd is back
            await self._run(wiring.delete_link, host_if)
            self._defer(req, "DEL")
            return b""
        # Independent steps, run together: deleting a veth waits for the kernel's RCU
        # grace periods (tens of ms), the etcd writes need not wait behind it.
        outcome = await asyncio.gather(
            self._run(wiring.delete_link, host_if),
            self._run(self.ipam.release_handle, req.handle),
            self._run(self._delete_wep, req),
            return_exceptions=True,
        )
        if any(isinstance(item, errors.DatastoreUnavailable) for item in outcome[1:]):
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            self._defer(req, "DEL")
            return b""
        for item in outcome:
            if isinstance(item, BaseException):
                raise item
        self.pending.done(req.handle)
        released = outcome[1]
        await self._publish_routes(host_if, released, add=False)
        self.log.info("pod deleted", container=req.container_id, released=released)
        return b""

    async def _check(self, req: p.CNIRequest) -> bytes:
        host_if = wiring.host_veth_name(req.container_id, req.ifname)
        ips = await self._run(self.ipam.ips_by_handle, req.handle)
        if not ips:
            raise p.CNIError(p.UNKNOWN_CONTAINER, f"no addresses allocated for {req.handle}")
        cidrs = [_host_cidr(ip) for ip in ips]
        problems = await self._run(wiring.check_pod, req.netns, req.ifname, host_if, cidrs,
                                   route_proto=self.route_proto)
        prev = req.prev_result
        if prev is not None:
            mine = {ip.address for ip in prev.ips}
            for c in cidrs:
                if c not in mine:
                    problems.append(f"prevResult does not list {c}")
        if problems:
            raise p.CNIError(p.GENERIC, "; ".join(problems), req.container_id)
        return b""

    # ---- tortie-ipam ------------------------------------------------------------------------

    async def _ipam_add(self, req: p.CNIRequest) -> bytes:
        ips, _fresh, _ports = await self._allocate(req)
        ipam = req.ipam_config
        try:
            # Main plugins such as ptp and bridge expect an on-link subnet, not a /32:
            # give each address its block's prefix length unless asked for host routes.
            host = str(ipam.get("prefix", "block")) == "host"
            plens = {} if host else await self._run(self._block_prefixes, ips)
            res = p.Result(
                ips=tuple(
                    p.IPConfig(f"{ip}/{plens[ip]}" if ip in plens else _host_cidr(ip), _ipam_gateway(ipam, ip))
                    for ip in ips
                ),
                routes=tuple(p.RouteSpec(r["dst"], r.get("gw", "")) for r in ipam.get("routes") or ()),
                dns=dict(ipam.get("dns") or req.config.get("dns") or {}),
            )
            return res.to_json(req.cni_version)
        except (KeyError, TypeError, AttributeError) as exc:
            await self._run(self.ipam.release_handle, req.handle)
            raise p.CNIError(p.INVALID_CONFIG, f"ipam.routes: {exc}") from None

    def _block_prefixes(self, ips: list[str]) -> dict[str, int]:
        nets = [ipaddress.ip_network(b.cidr) for b in self.ipam.all_blocks()]
        out = {}
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            for net in nets:
                if addr in net:
                    out[ip] = net.prefixlen
        return out

    async def _ipam_del(self, req: p.CNIRequest) -> bytes:
        if self.datastore_up():
            with contextlib.suppress(errors.DatastoreUnavailable):
                await self._run(self.ipam.release_handle, req.handle)
                self.pending.done(req.handle)
                return b""
        self._defer(req, "DEL")
        return b""

    # ---- what etcd could not take while it was away ---------------------------------------

    def _defer(self, req: p.CNIRequest, what: str) -> None:
        self.pending.add(Cleanup(req.handle, req.container_id, req.ifname, req.pod_name or None,
                                 req.pod_namespace or None, wep=not req.is_ipam))
        self.log.warning(f"{what}: datastore unreachable; its endpoint and addresses are released "
                         "when etcd answers again", container=req.container_id, handle=req.handle)

    async def _finish(self, item: Cleanup) -> None:
        """Finish one recorded cleanup (the caller holds its container's lock)."""
        if item.wep:
            await self._run(self._delete_wep, item)
        released = await self._run(self.ipam.release_handle, item.handle)
        self.pending.done(item.handle)
        self.log.info("pending cleanup done", container=item.container_id, handle=item.handle,
                      released=released)
        with contextlib.suppress(Exception):  # the veth is gone: the route went with it
            await self._publish_routes(wiring.host_veth_name(item.container_id, item.ifname), released,
                                       add=False)

    async def _ipam_check(self, req: p.CNIRequest) -> bytes:
        ips = await self._run(self.ipam.ips_by_handle, req.handle)
        if not ips:
            raise p.CNIError(p.UNKNOWN_CONTAINER, f"no addresses allocated for {req.handle}")
        prev = req.prev_result
        if prev is not None:
            missing = {_host_cidr(ip) for ip in ips} - {_host_cidr(i.address) for i in prev.ips}
            if missing:
                raise p.CNIError(p.GENERIC, f"prevResult does not list {', '.join(sorted(missing))}")
        return b""

    # ---- STATUS / GC ------------------------------------------------------------------------

    def _status(self, req: p.CNIRequest) -> None:
        try:
            pools = self.store.views("IPPool")
            try:
                labels = self.store.get("Node", self.node)["metadata"].get("labels") or {}
            except errors.NotFound:
                labels = {}
        except Exception as exc:
            if not isinstance(_datastore_error(exc), errors.DatastoreUnavailable):
                raise
            raise p.CNIError(p.NOT_AVAILABLE, "plugin not available: datastore unreachable", str(exc)) from None
        if not any(not pool.disabled and pool.for_workloads and pool.selects(labels) for pool in pools):
            raise p.CNIError(p.NOT_AVAILABLE, f"plugin not available: no usable IP pool for node {self.node}")

    async def _gc(self, req: p.CNIRequest) -> None:
        valid_raw = req.config.get("cni.dev/valid-attachments")
        if valid_raw is None:
            valid_raw = req.config.get("cni.dev/attachments") or []
        if not isinstance(valid_raw, list):
            raise p.CNIError(p.INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
        valid = {f"{req.network_name}.{a.get('containerID')}" for a in valid_raw if isinstance(a, dict)}
        prefix = f"{req.network_name}."
        stale = await self._run(self._stale_handles, prefix, valid)
        for handle, weps in stale.items():
            cid = handle[len(prefix):]
            async with self._container_lock(cid):
                for wep in weps:
                    spec = wep.get("spec") or {}
                    if spec.get("interfaceName"):
                        await self._run(wiring.delete_link, spec["interfaceName"])
                    with contextlib.suppress(errors.NotFound):
                        await self._run(self.store.delete, "WorkloadEndpoint", wep["metadata"]["name"],
                                        wep["metadata"].get("namespace"))
                released = await self._run(self.ipam.release_handle, handle)
                for wep in weps:
                    await self._publish_routes((wep.get("spec") or {}).get("interfaceName", ""), released, add=False)
            self.log.info("gc released", handle=handle)

    def _stale_handles(self, prefix: str, valid: set[str]) -> dict[str, list[dict]]:
        """Handles of this network and node that the runtime no longer lists, with their endpoints."""
        stale: dict[str, list[dict]] = {}
        for block in self.ipam.blocks():
            for held in block.held():
                h = held.attr.handle
                if held.attr.node == self.node and h.startswith(prefix) and h not in valid:
                    stale.setdefault(h, [])
        for wep in self.store.list("WorkloadEndpoint"):
            spec = wep.get("spec") or {}
            if spec.get("node") != self.node:
                continue
            h = wep_handle(spec) or ""
            if h.startswith(prefix) and h not in valid:
                stale.setdefault(h, []).append(wep)
        return stale


def _too_large(size: int) -> str:
    return (f"request of {size} bytes is too large: tortie takes at most {MAX_REQUEST} bytes "
            "(4 MiB) of network configuration and environment")


async def _drain(reader: asyncio.StreamReader, cap: int = 64 * MAX_REQUEST) -> int:
    """Read what is left of a request, up to `cap` bytes, and drop it: how many were read."""
    n = 0
    while n < cap and (chunk := await reader.read(1 << 20)):
        n += len(chunk)
    return n


def _ipam_gateway(ipam: dict, ip: str) -> str:
    """ipam.gateway (ipam.gateway6) if set, else Calico's link-local 169.254.1.1 for IPv4:
    never an address of the pool, so it cannot collide with a pod (ptp puts it on every
    host veth)."""
    if ":" in ip:
        return str(ipam.get("gateway6", ""))
    return str(ipam.get("gateway", wiring.GATEWAY_V4))


def _datastore_error(exc: Exception) -> Exception:
    """The etcd client refuses an endpoint for a moment after a failure with a bare
    ValueError that the datastore adapter does not map yet: that is etcd being
    unreachable (CNI 11, try again later), not an internal error."""
    if type(exc) is ValueError and "failed node" in str(exc):
        return errors.DatastoreUnavailable(f"etcd unreachable: {exc}")
    return exc


def pod_lookup_from_env() -> Callable[[str, str], PodDetails] | None:
    """`kube.podinfo.pod_details` bound to the Kubernetes API the environment names
    (TORTIE_K8S_API, KUBECONFIG, in-cluster), or None when there is none."""
    if not any(os.environ.get(k) for k in ("TORTIE_K8S_API", "KUBECONFIG", "KUBERNETES_SERVICE_HOST")):
        return None  # without an API: no import of the kubernetes client at all
    from tortie.kube.podinfo import core_api_from_env, pod_details

    api = core_api_from_env()
    return None if api is None else lambda namespace, name: pod_details(namespace, name, api)


def _ip_sort(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip.split("/")[0])
    return a.version, int(a)


# ---- standalone entry (tests, benchmarks, the lab until the agent embeds it) -------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortie.agent.cni_server",
                                 description="Serve tortie CNI requests (run inside the node namespace).")
    ap.add_argument("--socket", default=os.environ.get("TORTIE_CNI_SOCKET", "/run/tortie/cni.sock"))
    ap.add_argument("--node", default=os.environ.get("TORTIE_NODENAME") or socket.gethostname())
    ap.add_argument("--no-forwarding", action="store_true", help="do not set ip_forward (already set)")
    args = ap.parse_args(argv)

    from tortie.datastore.etcd import EtcdClient, EtcdConfig
    from tortie.datastore.ipam import IPAM
    from tortie.datastore.monitor import DatastoreMonitor
    from tortie.datastore.store import ResourceStore

    client = EtcdClient(EtcdConfig.from_env(timeout=ETCD_TIMEOUT))

    async def serve() -> None:
        monitor = DatastoreMonitor(client)
        server = CNIServer(args.socket, node_name=args.node, ipam=IPAM(client), store=ResourceStore(client),
                           set_forwarding=not args.no_forwarding, datastore_up=lambda: monitor.up,
                           datastore_failed=monitor.report)
        monitor.on_change = lambda up, _error: server.pending.kick() if up else None
        probing = asyncio.create_task(monitor.run())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        print(f"ready {args.socket}", flush=True)
        try:
            await stop.wait()
        finally:
            probing.cancel()
            await server.stop()

    try:
        asyncio.run(serve())
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
