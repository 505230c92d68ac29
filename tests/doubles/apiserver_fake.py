"""A small Kubernetes API server for tests: real HTTP, the real list/watch wire format.

No API server can run here, so the controller and the CNI server are tested against
this one through the official `kubernetes` client. It serves Nodes, Namespaces, Pods
(`/api/v1/...`), NetworkPolicies (`/apis/networking.k8s.io/v1/...`) and Leases
(`/apis/coordination.k8s.io/v1/...`, for leader election):

- GET of one object (404 as a `Status` when missing), and lists (`kind: PodList`,
  `metadata.resourceVersion`, items), optionally narrowed by an equality
  `labelSelector` (`a=b,c=d`);
- `?watch=true&resourceVersion=N`: newline-delimited JSON events, chunked, every change
  after N; without N (or N=0) the current objects first as ADDED. A resourceVersion
  older than the retained history gets one `ERROR` event carrying a `410 Gone` Status,
  as the real server does. `timeoutSeconds` ends the stream (with a BOOKMARK first when
  `allowWatchBookmarks=true`).
- POST (create: 201; `409 AlreadyExists`) and PUT (replace) of one object. A PUT whose
  `metadata.resourceVersion` is not the stored one is `409 Conflict`, so only one of two
  racing writers wins, as on the real server. Like the real Lease strategy, a Lease PUT
  must carry a resourceVersion (422 without one) and may create a missing Lease. Every
  write made over HTTP is appended to `writes` with the server's monotonic time, so a
  test can tell who held a Lease when.

The Python API changes the objects (`add`, `modify`, `delete`, each bumping the single
resourceVersion counter), forgets history (`compact`) and cuts open watch streams
mid-flight (`drop_watches`), so tests can force a resync and a reconnect;
`fail(plural, code)` makes every request for one resource answer `code` (an API server
that cannot be reached or refuses), until `fail(plural, None)`.

    with FakeAPIServer() as api:
        api.add(node("n1", labels={"zone": "a"}))
        cfg = kubernetes.client.Configuration(host=api.url)
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tortie.errors import AlreadyExists, NotFound, ValidationError


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    api_version: str
    namespaced: bool
    unconditional_update: bool = True  # False: a PUT must name the resourceVersion it replaces
    create_on_update: bool = False  # True: a PUT of a missing object creates it

    @property
    def base(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES = {r.plural: r for r in (
    Resource("nodes", "Node", "v1", False),
    Resource("namespaces", "Namespace", "v1", False),
    Resource("pods", "Pod", "v1", True),
    Resource("networkpolicies", "NetworkPolicy", "networking.k8s.io/v1", True),
    Resource("services", "Service", "v1", True),
    Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    Resource("leases", "Lease", "coordination.k8s.io/v1", True, unconditional_update=False, create_on_update=True),
)}
_BASES = tuple(sorted({r.base + "/" for r in RESOURCES.values()}))
_BY_KIND = {r.kind: r for r in RESOURCES.values()}


@dataclass(frozen=True)
class Write:
    """One create or replace made over HTTP: when (time.monotonic() in this process, and
    time.time() to compare with other processes' logs), how, and the object as stored."""

    at: float
    wall: float
    verb: str  # POST, PUT
    resource: str  # plural
    obj: dict


class APIError(Exception):
    """A request the server refuses: its HTTP code and Status reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    resource: str
    namespace: str | None
    obj: dict


# --- object builders for tests ---------------------------------------------------------


def node(name: str, labels: dict | None = None) -> dict:
    return {"kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})}, "spec": {}}


def namespace(name: str, labels: dict | None = None, annotations: dict | None = None) -> dict:
    meta = {"name": name, "labels": dict(labels or {})}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"kind": "Namespace", "metadata": meta, "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}}


def pod(ns: str, name: str, labels: dict | None = None, node_name: str = "node1",
        annotations: dict | None = None, ports: list | None = None) -> dict:
    """ports: the containers' ports, a list per container ({name, containerPort, protocol})."""
    meta = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if annotations:
        meta["annotations"] = dict(annotations)
    containers = [{"name": f"c{i}", "image": "busybox", "ports": list(p)} for i, p in enumerate(ports or [])]
    return {"kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node_name, "containers": containers or [{"name": "main", "image": "busybox"}]},
            "status": {"phase": "Running"}}


def lease(ns: str, name: str, holder: str | None = None, duration: int = 15, transitions: int = 0) -> dict:
    spec: dict = {"leaseDurationSeconds": duration, "leaseTransitions": transitions}
    if holder is not None:
        spec["holderIdentity"] = holder
    return {"kind": "Lease", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def network_policy(ns: str, name: str, spec: dict | None = None) -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": spec if spec is not None else {"podSelector": {}, "policyTypes": ["Ingress"]}}


# --- the server ---------------------------------------------------------------------------


class FakeAPIServer:
    """See the module docstring. Thread-safe; start() / stop() or use as a context manager."""

    def __init__(self, history: int = 10_000) -> None:
        self.history = history
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str | None, str], dict]] = {p: {} for p in RESOURCES}
        self._events: list[_Event] = []
        self._rv = 1
        self._compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self._generation = 0  # bumped by drop_watches(); a stream of an older one is cut
        self._stopping = False
        self._streams: set[socket.socket] = set()
        self.watch_requests = 0  # how many watch streams were opened, for tests to wait on
        self.list_requests = 0
        self.writes: list[Write] = []  # creates and replaces made over HTTP, in order
        self._failing: dict[str, int] = {}  # plural -> the HTTP code every request gets
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeAPIServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._cut_streams()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAPIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    # --- changing objects -----------------------------------------------------------------

    def add(self, obj: dict) -> dict:
        """Create obj (its `kind` picks the resource); AlreadyExists if it is there."""
        res, ns, name = self._ident(obj)
        with self._cond:
            if (ns, name) in self._objects[res.plural]:
                raise AlreadyExists(f"{res.kind} {name} already exists")
            obj = copy.deepcopy(obj)
            meta = obj["metadata"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            return self._record("ADDED", res, ns, name, obj)

    def modify(self, obj: dict) -> dict:
        """Replace an existing object (uid and creationTimestamp kept)."""
        res, ns, name = self._ident(obj)
        with self._cond:
            cur = self._objects[res.plural].get((ns, name))
            if cur is None:
                raise NotFound(f"{res.kind} {name} not found")
            obj = copy.deepcopy(obj)
            for key in ("uid", "creationTimestamp"):
                obj["metadata"][key] = cur["metadata"][key]
            return self._record("MODIFIED", res, ns, name, obj)

    def label(self, kind: str, name: str, labels: dict, namespace: str | None = None) -> dict:
        """Replace the labels of an object (a MODIFIED event)."""
        cur = self.get(kind, name, namespace)
        cur["metadata"]["labels"] = dict(labels)
        return self.modify(cur)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> dict:
        with self._cond:
            res, ns, cur = self._lookup(kind, name, namespace)
            return self._record("DELETED", res, ns, name, copy.deepcopy(cur))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        with self._cond:
            return copy.deepcopy(self._lookup(kind, name, namespace)[2])

    def objects(self, kind: str) -> list[dict]:
        """Every object of a kind, as stored."""
        with self._cond:
            return [copy.deepcopy(o) for o in self._objects[_BY_KIND[kind].plural].values()]

    def _lookup(self, kind: str, name: str, namespace: str | None) -> tuple[Resource, str | None, dict]:
        """(resource, namespace, the stored object); NotFound. Call holding the lock."""
        res = _BY_KIND[kind]
        ns = (namespace or "default") if res.namespaced else None
        cur = self._objects[res.plural].get((ns, name))
        if cur is None:
            raise NotFound(f"{kind} {name} not found")
        return res, ns, cur

    def fail(self, plural: str, code: int | None) -> None:
        """Answer every request for one resource with `code` (503: an API server in
        trouble); None: serve it again."""
        with self._cond:
            if code is None:
                self._failing.pop(plural, None)
            else:
                self._failing[plural] = code

    def http_create(self, res: Resource, ns: str | None, obj: dict) -> dict:
        """POST: the stored object; APIError 409 AlreadyExists."""
        with self._cond:
            obj = self._checked_body(res, ns, None, obj)
            name = obj["metadata"]["name"]
            if (ns, name) in self._objects[res.plural]:
                raise APIError(409, "AlreadyExists", f'{res.plural}.{_group(res)} "{name}" already exists')
            obj["metadata"].pop("resourceVersion", None)
            out = self.add(obj)
            self.writes.append(Write(time.monotonic(), time.time(), "POST", res.plural, copy.deepcopy(out)))
            return out

    def http_replace(self, res: Resource, ns: str | None, name: str, obj: dict) -> tuple[int, dict]:
        """PUT: (200 or 201, the stored object); APIError 409 Conflict when the body's
        resourceVersion is not the stored one."""
        with self._cond:
            obj = self._checked_body(res, ns, name, obj)
            cur = self._objects[res.plural].get((ns, name))
            rv = obj["metadata"].get("resourceVersion")
            if cur is None:
                if not res.create_on_update:
                    raise APIError(404, "NotFound", f'{res.plural}.{_group(res)} "{name}" not found')
                if rv:  # replacing a version that no longer exists
                    raise APIError(409, "Conflict", _conflict(res, name))
                code, out = 201, self.add(obj)
            else:
                if not rv and not res.unconditional_update:
                    raise APIError(422, "Invalid", f'{res.kind}.{_group(res)} "{name}" is invalid: '
                                   "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
                if rv and rv != cur["metadata"]["resourceVersion"]:
                    raise APIError(409, "Conflict", _conflict(res, name))
                code, out = 200, self.modify(obj)
            self.writes.append(Write(time.monotonic(), time.time(), "PUT", res.plural, copy.deepcopy(out)))
            return code, out

    def http_replace_status(self, res: Resource, ns: str | None, name: str, obj: dict) -> tuple[int, dict]:
        """PUT of the status subresource: only `status` changes (409 on a stale resourceVersion)."""
        with self._cond:
            obj = self._checked_body(res, ns, name, obj)
            cur = self._objects[res.plural].get((ns, name))
            if cur is None:
                raise APIError(404, "NotFound", f'{res.plural}.{_group(res)} "{name}" not found')
            rv = obj["metadata"].get("resourceVersion")
            if rv and rv != cur["metadata"]["resourceVersion"]:
                raise APIError(409, "Conflict", _conflict(res, name))
            out = self.modify({**copy.deepcopy(cur), "status": obj.get("status") or {}})
            self.writes.append(Write(time.monotonic(), time.time(), "PUT", f"{res.plural}/status", copy.deepcopy(out)))
            return 200, out

    def _checked_body(self, res: Resource, ns: str | None, name: str | None, obj: dict) -> dict:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            raise APIError(400, "BadRequest", "the body is not an object with metadata")
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        if obj.get("kind", res.kind) != res.kind:
            raise APIError(400, "BadRequest", f"kind {obj['kind']!r} sent to the {res.plural} endpoint")
        obj["kind"] = res.kind
        if not meta.get("name"):
            raise APIError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        if name is not None and meta["name"] != name:
            raise APIError(400, "BadRequest",
                           f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if meta.get("namespace") and meta["namespace"] != ns:
            raise APIError(400, "BadRequest", "the namespace of the provided object does not match the "
                                              "namespace sent on the request")
        if ns is not None:
            meta["namespace"] = ns
        return obj

    def compact(self) -> None:
        """Forget all history: a watch from any resourceVersion before now gets 410 Gone."""
        with self._cond:
            self._events.clear()
            self._compacted = self._rv

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-chunk, as a dying connection would."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        self._cut_streams()

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least `count` watch requests have been made in total."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.watch_requests < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _ident(self, obj: dict) -> tuple[Resource, str | None, str]:
        res = _BY_KIND.get(obj.get("kind", ""))
        if res is None:
            raise ValidationError(f"kind must be one of {', '.join(_BY_KIND)}", field="kind")
        meta = obj.get("metadata") or {}
        if not meta.get("name"):
            raise ValidationError("is required", field="metadata.name")
        ns = (meta.get("namespace") or "default") if res.namespaced else None
        return res, ns, meta["name"]

    def _record(self, type_: str, res: Resource, ns: str | None, name: str, obj: dict) -> dict:
        self._rv += 1
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if ns is not None:
            obj["metadata"]["namespace"] = ns
        if type_ == "DELETED":
            del self._objects[res.plural][(ns, name)]
        else:
            self._objects[res.plural][(ns, name)] = obj
        self._events.append(_Event(self._rv, type_, res.plural, ns, copy.deepcopy(obj)))
        if len(self._events) > self.history:
            dropped = self._events[: len(self._events) - self.history]
            del self._events[: len(dropped)]
            self._compacted = dropped[-1].rv
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def _cut_streams(self) -> None:
        with self._cond:
            streams = list(self._streams)
        for sock in streams:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- what the handler asks ------------------------------------------------------------

    def _list(self, res: Resource, ns: str | None, selector: dict[str, str]) -> tuple[int, list[dict]]:
        with self._cond:
            items = [copy.deepcopy(o) for (ons, _), o in sorted(self._objects[res.plural].items(),
                                                                 key=lambda kv: (kv[0][0] or "", kv[0][1]))
                     if (ns is None or ons == ns) and _selected(o, selector)]
            return self._rv, items


def _group(res: Resource) -> str:
    return res.api_version.rpartition("/")[0] or "core"


def _conflict(res: Resource, name: str) -> str:
    return (f'Operation cannot be fulfilled on {res.plural}.{_group(res)} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again")


def _selected(obj: dict, selector: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _parse_selector(text: str) -> dict[str, str]:
    out = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = term.replace("==", "=").partition("=")
        if not eq:
            raise ValidationError(f"only equality selectors are supported, not {term!r}", field="labelSelector")
        out[key.strip()] = value.strip()
    return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    api: FakeAPIServer
    protocol_version = "HTTP/1.1"  # keep-alive for lists, chunked for watches

    def log_message(self, format, *args) -> None:  # quiet: tests read their own logs
        pass

    def _routed(self) -> tuple[Resource, str | None, str | None] | None:
        """The request's route; None after answering 404, or the injected failure."""
        path = urlsplit(self.path).path
        route = self._route(path)
        if route is None:
            self._json(404, _status(404, "NotFound", f"the server could not find {path}"))
            return None
        with self.api._cond:
            failing = self.api._failing.get(route[0].plural)
        if failing is not None:
            self._json(failing, _status(failing, "ServiceUnavailable" if failing == 503 else "InternalError",
                                        f"injected failure for {route[0].plural}"))
            return None
        return route

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return None

    def do_POST(self) -> None:
        self._write(collection=True)

    def do_PUT(self) -> None:
        self._write(collection=False)

    def _write(self, collection: bool) -> None:
        """POST to a collection creates; PUT to an object replaces."""
        route = self._routed()
        if route is None:
            return
        res, ns, name = route
        body = self._body()
        if (name is None) != collection:
            return self._json(405, _status(405, "MethodNotAllowed", f"{self.command} not allowed on {self.path}"))
        try:
            if collection:
                self._json(201, self.api.http_create(res, ns, body))
            elif self.subresource == "status":
                self._json(*self.api.http_replace_status(res, ns, name, body))
            else:
                self._json(*self.api.http_replace(res, ns, name, body))
        except APIError as exc:
            self._json(exc.code, _status(exc.code, exc.reason, exc.message))

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        route = self._routed()
        if route is None:
            return
        res, ns, name = route
        try:
            selector = _parse_selector(query.get("labelSelector", ""))
        except ValidationError as exc:
            return self._json(400, _status(400, "BadRequest", str(exc)))
        if name is not None:
            try:
                obj = self.api.get(res.kind, name, ns)
            except NotFound:
                return self._json(404, _status(404, "NotFound", f'{res.plural} "{name}" not found'))
            return self._json(200, obj)
        if query.get("watch") in ("true", "1"):
            return self._watch(res, ns, selector, query)
        with self.api._cond:
            self.api.list_requests += 1
        rv, items = self.api._list(res, ns, selector)
        self._json(200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                         "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _route(self, path: str) -> tuple[Resource, str | None, str | None] | None:
        """(resource, namespace, name) of a path, or None."""
        for base in _BASES:
            if path.startswith(base):
                parts = [p for p in path[len(base):].split("/") if p]
                break
        else:
            return None
        ns = None
        if len(parts) >= 3 and parts[0] == "namespaces":
            ns, parts = parts[1], parts[2:]
        self.subresource = None
        if len(parts) == 3 and parts[2] == "status" and self.command == "PUT":
            self.subresource, parts = "status", parts[:2]  # PUT .../NAME/status: the status alone
        if not parts or len(parts) > 2 or parts[0] not in RESOURCES:
            return None
        res = RESOURCES[parts[0]]
        if not path.startswith(res.base + "/") or (ns is not None and not res.namespaced):
            return None
        return res, ns, parts[1] if len(parts) == 2 else None

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, res: Resource, ns: str | None, selector: dict[str, str], query: dict) -> None:
        api = self.api
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since = int(query.get("resourceVersion") or 0)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        with api._cond:
            api.watch_requests += 1
            api._streams.add(self.connection)
            generation = api._generation
            api._cond.notify_all()
            if since and since < api._compacted:
                pending = [{"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {since} ({api._compacted})")}]
                done = True
            elif not since:  # the current state as ADDED, then changes
                since = api._rv
                pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for (ons, _), o in api._objects[res.plural].items()
                           if (ns is None or ons == ns) and _selected(o, selector)]
                done = False
            else:
                pending, done = [], False
        try:
            for ev in pending:
                self._chunk(ev)
            while not done:
                with api._cond:
                    while True:
                        fresh = [e for e in api._events if e.rv > since]
                        cut = api._stopping or api._generation != generation
                        left = deadline - time.monotonic()
                        if fresh or cut or left <= 0:
                            break
                        api._cond.wait(left)
                    bookmark = api._rv
                if cut:
                    return  # no terminating chunk: the client sees a broken stream
                for e in fresh:
                    since = e.rv
                    if e.resource == res.plural and (ns is None or e.namespace == ns) \
                            and _selected(e.obj, selector):
                        self._chunk({"type": e.type, "object": copy.deepcopy(e.obj)})
                if not fresh and left <= 0:
                    if query.get("allowWatchBookmarks") in ("true", "1"):
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(bookmark)}}})
                    done = True
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the client went away, or drop_watches() cut the socket
        finally:
            with api._cond:
                api._streams.discard(self.connection)


__all__ = ["RESOURCES", "APIError", "FakeAPIServer", "Write", "lease", "namespace", "network_policy", "node", "pod"]
