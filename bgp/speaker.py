"""BGPSpeaker: ExaBGP as a supervised child of the agent, and the bridge to its API.

    agent loop ──set_peers/set_exports/apply──► BGPSpeaker ──config file + SIGUSR1──► ExaBGP
                ◄──on_routes(full RIB)──────────   ▲ unix socket (api.sock)               │
                                                   └──── api_relay.py (ExaBGP's API process)

Everything runs in the agent's asyncio loop, in the node's network namespace; ExaBGP
never touches the kernel. Files in `state_dir`: `exabgp.conf`, `exabgp.log`,
`exabgp.out` (its stdout/stderr), `exabgp.pid`, `api.sock`.

Desired state, then reconcile:
- Peers: `set_peers()` records them; `apply()` regenerates the file and sends SIGUSR1 when
  it changed. ExaBGP keeps every session whose definition is unchanged (it compares
  neighbors field by field) and only adds, removes or re-establishes the others.
- Exports: `set_exports()` records the wanted prefixes; `apply()` diffs them against what
  ExaBGP was told and sends only the difference, as `announce attributes ... nlri P1 P2 ...`
  and `withdraw attributes nlri ...` lines of up to `batch` prefixes, pipelined, then
  waits for every acknowledgement (`done`/`error`).
- Changes go to the established sessions only (`neighbor A , neighbor B announce ...`); a
  session that comes up gets the whole export set addressed to it, then end-of-RIB.
  ExaBGP keeps no adj-rib-out, so nothing stale is replayed on reconnect.
- Reloads are confirmed in ExaBGP's log and signalled again until they take (5.0.15
  drops SIGUSR1 while routes are queued); if one never takes, ExaBGP is restarted.

Graceful restart: ExaBGP runs with `manual-eor`, so end-of-RIB only goes out once the
export set is complete (after the first apply() following a (re)start). A restarted
ExaBGP has an empty RIB; the bridge re-sends everything when its relay connects. Routes
learned from a peer that restarts stay (stale) for its restart time, see `rib.py`. The
first on_routes() call after start waits until the peers have sent their end-of-RIB (or
`settle_time` passed), so the agent never replaces good kernel routes with a half-learned
table. ExaBGP dies with the agent (PR_SET_PDEATHSIG), so a restarted agent can bind 179.

Also here, because ExaBGP does neither: route reflection for a node with
route-reflector clients (`_reflection`), and why a session is down (`_diagnose_loop`
dials the peer the way ExaBGP would: refused, no answer, MD5 mismatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tortie.bgp import config as cfg
from tortie.bgp.peers import Peer, prefix_filter
from tortie.bgp.rib import LearnedRoutes, family_of
from tortie.bgp.status import PeerStatus, document, notification_text
from tortie.errors import DataplaneError, ValidationError
from tortie.log import get_logger

log = get_logger("bgp")

RoutesCallback = Callable[[dict[str, tuple[str, ...]]], None]
ChangesCallback = Callable[[dict[str, tuple[str, ...]], frozenset[str]], None]


@dataclass
class _PeerState:
    state: str = "idle"
    since: float = field(default_factory=time.time)
    last_error: str = ""
    gr_time: int = 0  # the restart time the peer offered in its OPEN (0: no graceful restart)
    eor: set[str] = field(default_factory=set)  # families the peer sent end-of-RIB for
    needs_full: bool = False  # came up; owed the full export set and our end-of-RIB
    router_id: str = ""  # from its OPEN: the originator id of what we reflect for it
    probe_error: str = ""  # what dialing it ourselves shows (see _diagnose_loop)
    expiry: asyncio.TimerHandle | None = None


def _exabgp_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "exabgp")
    return here if os.path.exists(here) else (shutil.which("exabgp") or "exabgp")


def _die_with_parent() -> None:
    # ExaBGP must not outlive a killed agent: the next agent starts its own on port 179
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class BGPSpeaker:
    def __init__(self, *, node_name: str, router_id: str, local_as: int, local_address: str,
                 state_dir: str, listen_port: int = 179, on_routes: RoutesCallback,
                 local_address6: str | None = None, graceful_restart: int = cfg.GRACEFUL_RESTART_TIME,
                 batch: int = 500, settle_time: float = 10.0, backoff: tuple[float, float] = (0.5, 30.0),
                 exabgp: str | None = None, cluster_id: str | None = None,
                 on_route_changes: ChangesCallback | None = None) -> None:
        self.node_name = node_name
        self.local = cfg.LocalSettings(router_id=router_id, local_as=local_as, local_address=local_address,
                                       local_address6=local_address6, listen_port=listen_port,
                                       graceful_restart=graceful_restart)
        self.state_dir = os.path.abspath(state_dir)
        self.on_routes = on_routes
        # optional: after the first full table, only what changed (prefix -> hops, removed):
        # a 10,000-route table arrives in bursts, and rebuilding it per burst is the cost
        self.on_route_changes = on_route_changes
        self._full_sent = False
        self.cluster_id = cluster_id  # routeReflectorClusterID; router id when None
        self.batch = batch
        self.settle_time = settle_time
        self.backoff = backoff
        self.exabgp = exabgp or _exabgp_binary()
        self.conf_path = os.path.join(self.state_dir, "exabgp.conf")
        self.log_path = os.path.join(self.state_dir, "exabgp.log")
        self.pid_path = os.path.join(self.state_dir, "exabgp.pid")
        self.sock_path = os.path.join(self.state_dir, "api.sock")

        self._peers: dict[str, Peer] = {}  # desired, by address
        self._loaded: dict[str, Peer] | None = None  # what ExaBGP's file says
        self._exports: dict[str, str] | None = None  # desired prefix -> attribute text
        self._announced: dict[str, str] = {}  # what ExaBGP holds for all neighbors
        self._state: dict[str, _PeerState] = {}
        self._import_pools: tuple[str, ...] = ()
        self._filters: dict[str, Callable[[str], bool]] = {}  # peer -> import filter (see _accepts)
        self._filters_for: tuple = (None, None)  # the (peers, pools) they were made for
        self._rib = LearnedRoutes(self._accepts, filter_for=self._peer_filter)
        self._reflected: dict[str, dict[str, str]] = {}  # what ExaBGP was told to reflect, per peer
        self._routes_pending = False
        self._reflect_pending = False
        self._routes_released = False  # first on_routes sent (see settle)
        self._synced = False  # export set complete in this ExaBGP

        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._api_pid: int | None = None
        self._acks: deque[asyncio.Future[bool]] = deque()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._stopping = False
        self._reloader: asyncio.Task | None = None
        self._reload_again = False
        self._config_gen = 0  # bumped by every write of the file
        self._spawn_gen = 0  # the generation on disk when ExaBGP was started
        self._started_at = 0.0
        self.restarts = 0
        self._trace = None  # TORTIE_BGP_TRACE=1: API events but updates go to state_dir/api.trace
        self.errors = 0  # commands ExaBGP answered with `error`

    # --- contract with the agent -----------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        if os.environ.get("TORTIE_BGP_TRACE"):
            self._trace = open(os.path.join(self.state_dir, "api.trace"), "ab")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        self._server = await asyncio.start_unix_server(self._on_relay, path=self.sock_path,
                                                       limit=16 * 1024 * 1024)
        self._write_config()
        self._started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._supervise(), name="bgp-supervise"),
                       asyncio.create_task(self._diagnose_loop(), name="bgp-diagnose"),
                       asyncio.create_task(self._settle(), name="bgp-settle")]
        log.info("bgp speaker started", node=self.node_name, state_dir=self.state_dir)

    async def stop(self) -> None:
        """Stop ExaBGP. It closes sessions without a NOTIFICATION, so graceful-restart peers
        keep our routes for the restart time (what an agent restart wants)."""
        self._stopping = True
        for task in [*self._tasks, self._reloader]:
            if task:
                task.cancel()
        await self._terminate()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server:
            self._server.close()
        if self._writer:
            self._writer.close()
        for st in self._state.values():
            if st.expiry:
                st.expiry.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)

    def set_peers(self, peers: Iterable[Peer]) -> None:
        wanted = {}
        for p in peers:
            default = self.local.local_address6 if ":" in p.address else self.local.local_address
            if p.external and p.local_address is None:
                # a router on another uplink expects us from our address on its segment:
                # speak from the source the kernel picks for it (no packet is sent)
                source = _source_for(p.address)
                if source and source != default:
                    p = dataclasses.replace(p, local_address=source)
            if (p.local_address or default) is None:
                log.warning("peer skipped: no local address of its family", peer=p.address)
                continue
            wanted[p.address] = p
        self._peers = wanted

    def set_exports(self, prefixes: Iterable[str], communities: Iterable[str] = ()) -> None:
        """The prefixes this node announces (next hop: its own address), with the
        BGPConfiguration's communities: `AS:VALUE`, or `A:B:C` for large communities."""
        attrs = "next-hop self"
        comms = sorted(set(communities))
        standard = [c for c in comms if c.count(":") == 1]
        large = [c for c in comms if c.count(":") == 2]
        if len(standard) + len(large) != len(comms):
            raise ValidationError(f"communities must be AS:VALUE or A:B:C, got {comms}", field="communities")
        if standard:
            attrs += " community [ " + " ".join(standard) + " ]"
        if large:
            attrs += " large-community [ " + " ".join(large) + " ]"
        self._exports = {str(ipaddress.ip_network(p, strict=False)): attrs for p in prefixes}

    async def apply(self) -> None:
        async with self._lock:
            await self._reconcile()

    def status(self) -> list[PeerStatus]:
        out = []
        for addr, peer in self._peers.items():
            st = self._state.get(addr) or _PeerState()
            up = st.state == "established"
            sent = sum(1 for p in self._announced if family_of(p) == _family(addr)) if up and self._synced else 0
            error = "" if up else "; ".join(e for e in (st.last_error, st.probe_error) if e)
            if not up and not error and peer.passive:
                error = "waiting for the peer to connect (this side is passive)"
            out.append(PeerStatus(peer=addr, kind=peer.kind, state=st.state, since=st.since,
                                  prefixes_received=self._rib.count(addr), prefixes_sent=sent,
                                  last_error=error, name=peer.name, port=peer.port, passive=peer.passive,
                                  stale=self._rib.is_stale(addr)))
        return out

    def status_json(self) -> dict:
        """The status document to publish (JSON-ready dict: `json.dumps` it)."""
        return document(self.node_name, self.status(), {
            "router_id": self.local.router_id, "as_number": self.local.local_as,
            "address": self.local.local_address, "exabgp_pid": self.pid, "restarts": self.restarts})

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def rib_ready(self) -> bool:
        """on_routes has been called at least once since start."""
        return self._routes_released

    @property
    def synced(self) -> bool:
        """The export set is complete in the running ExaBGP."""
        return self._synced

    # --- reconcile ---------------------------------------------------------------------

    async def _reconcile(self) -> None:
        if self._peers != self._loaded:
            self._reload_peers()
        if self._writer is None or self._exports is None:
            return  # nothing to talk to yet, or the agent has not said what to export
        withdraw = [p for p in self._announced if p not in self._exports]
        changed: dict[str, list[str]] = {}
        for prefix, attrs in self._exports.items():
            if self._announced.get(prefix) != attrs:
                changed.setdefault(attrs, []).append(prefix)
        if withdraw or changed:
            lines = []
            for family in ("ipv4 unicast", "ipv6 unicast"):
                # only established sessions: a change queued for a session that is down sits in
                # ExaBGP as pending and makes it drop every SIGUSR1 (5.0.15); a session that
                # comes up gets the whole set anyway
                targets = self._established(family)
                if not targets:
                    continue
                fam_withdraw = [p for p in withdraw if family_of(p) == family]
                lines += [f"{targets} withdraw attributes next-hop self nlri {' '.join(c)}"
                          for c in _chunks(fam_withdraw, self.batch)]
                for attrs, prefixes in changed.items():
                    fam = [p for p in prefixes if family_of(p) == family]
                    lines += [f"{targets} announce attributes {attrs} nlri {' '.join(c)}"
                              for c in _chunks(fam, self.batch)]
            if lines:
                await self._send(lines)
            for prefix in withdraw:
                del self._announced[prefix]
            for attrs, prefixes in changed.items():
                self._announced.update(dict.fromkeys(prefixes, attrs))
            log.info("exports sent", announced=sum(map(len, changed.values())), withdrawn=len(withdraw),
                     lines=len(lines), total=len(self._announced))
        if not self._synced:
            self._synced = True
            log.info("export set complete; end-of-RIB may go out", prefixes=len(self._announced))
        # reflected routes go out before the end-of-RIB of a session that just came up
        await self._reconcile_reflection()
        await self._send_owed()

    def _established(self, family: str) -> str:
        """The neighbor selector naming every established session of `family` ('' if none)."""
        return " , ".join(f"neighbor {addr}" for addr, st in self._state.items()
                          if st.state == "established" and _family(addr) == family
                          and addr in (self._loaded or {}))

    async def _send_owed(self) -> None:
        """Peers that came up get the whole export set, then our end-of-RIB."""
        for addr, st in list(self._state.items()):
            if not st.needs_full or st.state != "established" or addr not in (self._loaded or {}):
                continue
            st.needs_full = False
            family = _family(addr)
            lines = []
            by_attrs: dict[str, list[str]] = {}
            for prefix, attrs in self._announced.items():
                if family_of(prefix) == family:
                    by_attrs.setdefault(attrs, []).append(prefix)
            for attrs, prefixes in by_attrs.items():
                lines += [f"neighbor {addr} announce attributes {attrs} nlri {' '.join(chunk)}"
                          for chunk in _chunks(prefixes, self.batch)]
            lines.append(f"neighbor {addr} announce eor {family}")
            await self._send(lines)
            log.info("end-of-RIB sent", peer=addr, prefixes=sum(map(len, by_attrs.values())))

    def _reload_peers(self) -> None:
        old = self._loaded or {}
        self._write_config()
        if any(old.get(a) != p for a, p in self._peers.items()):
            self._rib.set_filter(self._accepts)  # import filters may have changed
            self._routes_changed()
        for addr in set(old) - set(self._peers):
            st = self._state.pop(addr, None)
            if st and st.expiry:
                st.expiry.cancel()
            self._rib.drop(addr)
            self._routes_changed()
        now = time.time()
        for addr, peer in self._peers.items():
            if addr in old and old[addr] != peer and (st := self._state.get(addr)) is not None:
                # ExaBGP re-establishes a redefined session: as if it went down
                if st.state == "established":
                    self._peer_gone(addr, st)
                st.state, st.since, st.needs_full = "idle", now, False
                st.last_error, st.probe_error = "reconfigured", ""
        if self._api_ready():
            # only once its API runs: before that SIGUSR1 kills it, and it has not read the file yet
            log.info("exabgp reload", peers=len(self._peers),
                     added=sorted(set(self._peers) - set(old)), removed=sorted(set(old) - set(self._peers)))
            self._request_reload()

    def _request_reload(self) -> None:
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.create_task(self._reload_until_done(), name="bgp-reload")
        else:
            self._reload_again = True

    async def _reload_until_done(self, attempts: int = 10) -> None:
        """SIGUSR1 until ExaBGP's log shows it reloaded.

        ExaBGP 5.0.15 drops a SIGUSR1 that arrives while any session still has routes
        to send (the signal is re-armed, then the reload skipped), so one signal is not
        enough. If it never takes, restart ExaBGP: the peers keep forwarding over the
        graceful restart, and it reads the file afresh.
        """
        while True:
            self._reload_again = False
            for attempt in range(attempts):
                proc = self._proc
                if proc is None or proc.returncode is not None or self._stopping:
                    return
                offset = _size(self.log_path)
                proc.send_signal(signal.SIGUSR1)
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    if b"performing reload" in _tail(self.log_path, offset):
                        break
                else:
                    log.info("exabgp did not reload yet; signalling again", attempt=attempt + 1)
                    continue
                break
            else:
                log.warning("exabgp ignores reloads; restarting it", attempts=attempts)
                if self._proc and self._proc.returncode is None:
                    self._proc.send_signal(signal.SIGTERM)
                return
            if not self._reload_again:
                return

    def _api_ready(self) -> bool:
        return bool(self._proc and self._proc.returncode is None and self._api_pid == self._proc.pid
                    and self._writer is not None)

    def _write_config(self) -> None:
        text = cfg.render(self._peers.values(), self.local, self.sock_path)
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = self.conf_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.conf_path)
        self._loaded = dict(self._peers)
        self._config_gen += 1
        for addr in self._peers:
            self._state.setdefault(addr, _PeerState())

    # --- the API stream ----------------------------------------------------------------

    async def _send(self, lines: list[str]) -> int:
        """Write command lines (pipelined), wait for every acknowledgement; returns errors."""
        writer = self._writer
        if writer is None:
            raise DataplaneError("ExaBGP's API is not connected")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in lines]
        self._acks.extend(futures)
        writer.write(("\n".join(lines) + "\n").encode())
        await writer.drain()
        results = await asyncio.gather(*futures)
        errors = results.count(False)
        if errors:
            self.errors += errors
            log.warning("exabgp refused commands", errors=errors, sample=lines[results.index(False)][:200])
        return errors

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readline()
        try:
            pid = int(hello.split()[1])
        except (IndexError, ValueError):
            writer.close()
            return
        if self._proc is None or pid != self._proc.pid:
            log.warning("api relay of an unknown exabgp", pid=pid)
            writer.close()
            return
        if self._writer is not None:
            self._writer.close()
        self._fail_acks()
        if pid != self._api_pid:
            # a new ExaBGP: its RIB is empty, and end-of-RIB waits until it is full again
            self._api_pid = pid
            self._announced = {}
            self._synced = False
        self._writer = writer
        log.info("exabgp api connected", pid=pid)
        if self._config_gen != self._spawn_gen:
            # the file changed while it was starting: it may have read the old one
            self._spawn_gen = self._config_gen
            self._request_reload()
        self._spawn(self._apply_quietly())
        try:
            while line := await reader.readline():
                self._on_line(line)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("exabgp api stream broken", error=str(exc))
        finally:
            if self._writer is writer:
                self._writer = None
                self._fail_acks()
            writer.close()

    def _fail_acks(self) -> None:
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_exception(DataplaneError("ExaBGP's API connection closed"))

    def _on_line(self, raw: bytes) -> None:
        line = raw.strip()
        if not line:
            return
        if line in (b"done", b"error"):
            if self._acks:
                fut = self._acks.popleft()
                if not fut.done():
                    fut.set_result(line == b"done")
            return
        if line == b"shutdown" or not line.startswith(b"{"):
            return
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("unparsable api line", line=line[:200])
            return
        kind = msg.get("type")
        if self._trace and kind != "update":
            self._trace.write(line + b"\n")
            self._trace.flush()
        neighbor = msg.get("neighbor") or {}
        peer = (neighbor.get("address") or {}).get("peer")
        if peer is None or peer not in self._peers:
            return
        if kind == "update":
            self._on_update(peer, neighbor.get("message") or {})
        elif kind == "state":
            self._on_state(peer, neighbor.get("state"), neighbor.get("reason", ""))
        elif kind == "open" and neighbor.get("direction") == "receive":
            caps = (neighbor.get("open") or {}).get("capabilities") or {}
            gr = [c for c in caps.values() if isinstance(c, dict) and c.get("name") == "graceful restart"]
            st = self._peer_state(peer)
            st.gr_time = int(gr[0].get("time", 0)) if gr else 0
            st.router_id = str((neighbor.get("open") or {}).get("router_id") or "")
        elif kind == "notification":
            note = neighbor.get("notification") or {}
            text = notification_text(int(note.get("code", 0)), int(note.get("subcode", 0)))
            self._peer_state(peer).last_error = f"peer sent notification: {text}"

    async def _apply_quietly(self) -> None:
        try:
            await self.apply()
        except DataplaneError as exc:  # the API went away; its reconnect applies again
            log.warning("bgp apply failed", error=str(exc))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _peer_state(self, peer: str) -> _PeerState:
        return self._state.setdefault(peer, _PeerState())

    def _on_state(self, peer: str, state: str | None, reason: str) -> None:
        st = self._peer_state(peer)
        now = time.time()
        if state == "up":
            st.state, st.since, st.eor = "established", now, set()
            st.last_error = st.probe_error = ""
            st.needs_full = True
            self._reflected.pop(peer, None)
            if st.expiry:
                st.expiry.cancel()
                st.expiry = None
            log.info("bgp session up", peer=peer)
            if self._synced:
                self._spawn(self._apply_quietly())
        elif state == "connected":
            if st.state != "established":
                st.state, st.since = "connect", now
        elif state == "down":
            was_up = st.state == "established"
            st.state, st.since = "down", now
            explained = _reason_text(reason)
            if explained and not (st.last_error.startswith("peer sent") and "closed" in explained):
                st.last_error = explained
            if was_up:  # later failed attempts leave the (stale) routes alone
                self._peer_gone(peer, st)
                log.info("bgp session down", peer=peer, reason=reason)

    def _peer_gone(self, peer: str, st: _PeerState) -> None:
        graceful = st.gr_time > 0
        if self._rib.peer_down(peer, graceful):
            self._routes_changed()
        if graceful and self._rib.is_stale(peer):
            loop = asyncio.get_running_loop()
            if st.expiry:
                st.expiry.cancel()
            st.expiry = loop.call_later(st.gr_time, self._expire, peer)

    def _expire(self, peer: str) -> None:
        st = self._state.get(peer)
        if st:
            st.expiry = None
        if self._rib.expire(peer):
            log.info("stale routes expired", peer=peer)
            self._routes_changed()

    def _on_update(self, peer: str, message: dict) -> None:
        if "eor" in message:
            family = f"{message['eor'].get('afi')} {message['eor'].get('safi')}"
            st = self._peer_state(peer)
            st.eor.add(family)
            if self._rib.end_of_rib(peer, family):
                self._routes_changed()
            self._maybe_release()
            return
        update = message.get("update") or {}
        attrs = update.get("attribute") or {}
        originator = attrs.get("originator-id") or ""
        clusters = tuple(attrs.get("cluster-list") or ())
        if originator == self.local.router_id or (self._cluster_id in clusters):
            return  # our own route reflected back to us (RFC 4456 loop prevention)
        announce: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for family, by_nh in (update.get("announce") or {}).items():
            if not family.endswith("unicast"):
                continue
            for next_hop, nlris in by_nh.items():
                path = (next_hop, originator, clusters)
                for nlri in nlris:
                    prefix = nlri.get("nlri") if isinstance(nlri, dict) else nlri
                    if prefix:
                        announce[prefix] = path
        withdraw: list[str] = []
        for nlris in (update.get("withdraw") or {}).values():
            for nlri in nlris:
                prefix = nlri.get("nlri") if isinstance(nlri, dict) else nlri
                if prefix:
                    withdraw.append(prefix)
        if self._rib.update(peer, announce, withdraw):
            self._routes_changed()

    # --- route reflection ----------------------------------------------------------------

    @property
    def _cluster_id(self) -> str | None:
        """Set when this node reflects (it has route-reflector clients)."""
        if not any(p.route_reflector_client for p in self._peers.values()):
            return None
        return self.cluster_id or self.local.router_id

    def _reflection(self) -> dict[str, dict[str, str]]:
        """For each established node peer, the routes this reflector should pass it:
        {peer: {prefix: attribute text}} (RFC 4456: from a client to every other node
        peer, from a non-client to clients only; one path per prefix, next hop kept)."""
        cluster = self._cluster_id
        if cluster is None:
            return {}
        node_peers = {a: p for a, p in self._peers.items() if p.kind in ("mesh", "reflector", "rr-client")
                      and (st := self._state.get(a)) is not None and st.state == "established"}
        best: dict[str, tuple[str, tuple[str, str, tuple[str, ...]]]] = {}  # prefix -> (source, path)
        for source in sorted(self._rib.peers(), key=ipaddress.ip_address):
            if source not in self._peers or self._peers[source].kind not in ("mesh", "reflector", "rr-client"):
                continue
            for prefix, path in self._rib.paths(source).items():
                best.setdefault(prefix, (source, path))
        out: dict[str, dict[str, str]] = {t: {} for t in node_peers}
        for prefix, (source, (next_hop, originator, clusters)) in best.items():
            from_client = self._peers[source].route_reflector_client
            originator = originator or self._state[source].router_id or source
            attrs = (f"next-hop {next_hop} originator-id {originator} "
                     f"cluster-list [ {' '.join((cluster, *clusters))} ]")
            for target, peer in node_peers.items():
                if target == source or _family(target) != family_of(prefix):
                    continue
                if from_client or peer.route_reflector_client:
                    out[target][prefix] = attrs
        return out

    async def _reconcile_reflection(self) -> None:
        want = self._reflection()
        lines: list[str] = []
        for target in list(self._reflected):
            if target not in want:
                del self._reflected[target]  # gone or down: its session starts from nothing
        for target, routes in want.items():
            have = self._reflected.setdefault(target, {})
            gone = [p for p in have if p not in routes]
            lines += [f"neighbor {target} withdraw attributes next-hop self nlri {' '.join(c)}"
                      for c in _chunks(gone, self.batch)]
            by_attrs: dict[str, list[str]] = {}
            for prefix, attrs in routes.items():
                if have.get(prefix) != attrs:
                    by_attrs.setdefault(attrs, []).append(prefix)
            for attrs, prefixes in by_attrs.items():
                lines += [f"neighbor {target} announce attributes {attrs} nlri {' '.join(c)}"
                          for c in _chunks(prefixes, self.batch)]
            self._reflected[target] = dict(routes)
        if lines:
            await self._send(lines)
            log.info("reflected routes sent", lines=len(lines))

    # --- routes to the agent -----------------------------------------------------------

    def _routes_changed(self) -> None:
        if self._cluster_id is not None and not self._reflect_pending:
            self._reflect_pending = True
            asyncio.get_running_loop().call_soon(self._reflect_soon)
        if self._routes_pending or not self._routes_released:
            return
        self._routes_pending = True
        asyncio.get_running_loop().call_soon(self._emit_routes)

    def _reflect_soon(self) -> None:
        self._reflect_pending = False
        if self._synced:
            self._spawn(self._apply_quietly())

    def _accepts(self, peer: str, prefix: str) -> bool:
        return self._peer_filter(peer)(prefix)

    def _peer_filter(self, peer: str) -> Callable[[str], bool]:
        # the peer's filter is compiled once per peer set (set_peers and set_import_pools
        # replace these objects, never change them in place); the RIB asks once per update
        if self._filters_for[0] is not self._peers or self._filters_for[1] is not self._import_pools:
            self._filters, self._filters_for = {}, (self._peers, self._import_pools)
        f = self._filters.get(peer)
        if f is None:
            f = self._filters[peer] = self._filter(peer)
        return f

    def _filter(self, peer: str) -> Callable[[str], bool]:
        p = self._peers.get(peer)
        if p is None:
            return lambda prefix: False
        if not p.external:
            return lambda prefix: True
        # Pod routes are always welcome: a top-of-rack router passing on another rack's
        # blocks (or a borrowed /32) must not need its own acceptPrefixes for them.
        return prefix_filter(tuple(p.accept_prefixes) + self._import_pools)

    def set_import_pools(self, cidrs: Iterable[str]) -> None:
        """The IP pools: prefixes inside them are imported from external peers too."""
        cidrs = tuple(sorted(cidrs))
        if cidrs != self._import_pools:
            self._import_pools = cidrs
            self._rib.set_filter(self._accepts)
            self._routes_changed()

    def _emit_routes(self) -> None:
        self._routes_pending = False
        try:
            if self.on_route_changes is not None and self._full_sent:
                changed, removed = self._rib.take_changes()
                if changed or removed:
                    self.on_route_changes(changed, removed)
                return
            self._rib.take_changes()
            self._full_sent = True
            self.on_routes(self._rib.table())
        except Exception:
            log.exception("on_routes failed")

    def _maybe_release(self) -> None:
        """Release the first table once every established peer sent its end-of-RIB."""
        if self._routes_released:
            return
        for addr in self._peers:
            st = self._state.get(addr)
            if st and st.state == "established" and _family(addr) not in st.eor:
                return
        if not any(st.state == "established" for st in self._state.values()):
            return  # nothing learned yet: let the settle timer decide
        self._release("end-of-RIB from every established peer")

    def _release(self, why: str) -> None:
        if self._routes_released:
            return
        self._routes_released = True
        log.info("learned routes released to the agent", why=why)
        self._routes_changed()

    async def _settle(self) -> None:
        await asyncio.sleep(self.settle_time)
        self._release(f"settle time {self.settle_time}s")

    # --- supervision -------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = self.backoff[0]
        out_path = os.path.join(self.state_dir, "exabgp.out")
        while not self._stopping:
            env = dict(os.environ)
            env.update(cfg.environment(self.local, self.log_path, self.pid_path, self._peers.values()))
            # ExaBGP refuses to start while its pid file names a live process: a killed
            # predecessor not yet reaped, or an unrelated process that reused the pid
            await self._kill_leftover()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_path)
            started = time.monotonic()
            self._spawn_gen = self._config_gen
            with open(out_path, "ab") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    self.exabgp, self.conf_path, env=env, cwd=self.state_dir,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=_die_with_parent, start_new_session=True)
            log.info("exabgp started", pid=self._proc.pid)
            rc = await self._proc.wait()
            self._exabgp_gone(rc)
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                delay = self.backoff[0]
            log.warning("exabgp exited; restarting", rc=rc, retry_in=delay)
            self.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    def _exabgp_gone(self, rc: int | None) -> None:
        self._synced = False
        self._announced = {}
        self._reflected = {}
        self._api_pid = None
        if self._writer:
            self._writer.close()
            self._writer = None
        self._fail_acks()
        now = time.time()
        for addr, st in self._state.items():
            if st.state == "established":
                st.state, st.since = "down", now
                st.last_error = f"exabgp exited ({rc}); restarting"
                # we restart: the peers keep forwarding, we keep what they told us
                self._peer_gone(addr, st)
            st.needs_full = False

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_path)

    async def _kill_leftover(self) -> None:
        """An ExaBGP left by a previous agent in this state_dir holds the port: stop it."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            return
        if b"exabgp" not in cmdline or self.conf_path.encode() not in cmdline:
            return
        log.warning("stopping exabgp left by a previous run", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}"):
                break
            await asyncio.sleep(0.05)

    # --- why is a peer down ------------------------------------------------------------

    async def _diagnose_loop(self, every: float = 5.0) -> None:
        """ExaBGP does not say why it cannot connect (only its debug log does), so dial
        the peers that are down ourselves, the way it would, and say what happens."""
        while True:
            await asyncio.sleep(every)
            now = time.time()
            due = [(addr, peer) for addr, peer in self._peers.items()
                   if (st := self._state.get(addr)) is not None and not peer.passive
                   and st.state != "established" and now - st.since >= 3]
            results = await asyncio.gather(*(self._probe(peer) for _, peer in due), return_exceptions=True)
            for (addr, _), reason in zip(due, results, strict=True):
                st = self._state.get(addr)
                if st is None or st.state == "established":
                    continue  # gone, or it came up meanwhile
                if isinstance(reason, BaseException):
                    reason = f"cannot dial: {reason}"
                st.probe_error = reason or "TCP connects, but no BGP session yet"
                if st.last_error == "reconfigured":
                    st.last_error = ""  # the probe says why the redefined session stays down

    async def _probe(self, peer: Peer, timeout: float = 2.0) -> str | None:
        """Dial the peer the way ExaBGP does; None when TCP gets through."""
        local = peer.local_address or (
            self.local.local_address if _family(peer.address) == "ipv4 unicast" else self.local.local_address6)
        signed = await _tcp_probe(local, peer.address, peer.port, peer.password, timeout)
        if signed is None:
            return None
        if signed == "refused":
            return "connect refused"
        if peer.password:
            plain = await _tcp_probe(local, peer.address, peer.port, None, timeout)
            if plain is None or plain == "refused":
                return "MD5 mismatch: the peer answers unsigned connections, not ours (no or another password)"
            return "no answer to MD5-signed connection: wrong MD5 password, or the peer is unreachable"
        return "no answer: the peer is unreachable, or expects an MD5 password"


def _source_for(address: str) -> str | None:
    """The source address the kernel would use towards `address` (a UDP connect sends nothing)."""
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((address, 179))
            return s.getsockname()[0]
    except OSError:
        return None


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _tail(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


def _family(address: str) -> str:
    return "ipv6 unicast" if ":" in address else "ipv4 unicast"


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _reason_text(reason: str) -> str:
    """ExaBGP's `down` reason, in the words the status shows."""
    low = reason.lower()
    for marker, direction in (("notification sent", "sent"), ("notification received", "received")):
        if marker in low:
            try:
                code, sub = low.split("(")[1].split(")")[0].split(",")
                text = notification_text(int(code), int(sub))
            except (IndexError, ValueError):
                text = reason
            return f"notification {direction}: {text}" if direction == "sent" else f"peer sent notification: {text}"
    if "closing connection" in low or "closed" in low:
        return "connection closed by the peer"
    return reason


_TCP_MD5SIG = 14


def _md5sig(peer: str, key: str) -> bytes:
    """struct tcp_md5sig for setsockopt(TCP_MD5SIG)."""
    addr = ipaddress.ip_address(peer)
    if addr.version == 4:
        sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + addr.packed
    else:
        sa = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + addr.packed + b"\0\0\0\0"
    raw = key.encode()
    return sa.ljust(128, b"\0") + struct.pack("=BBHI", 0, 0, len(raw), 0) + raw.ljust(80, b"\0")


async def _tcp_probe(local: str | None, peer: str, port: int, password: str | None,
                     timeout: float) -> str | None:
    fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if password:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_MD5SIG, _md5sig(peer, password))
        if local:
            sock.bind((local, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (peer, port)), timeout)
        return None
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return "refused"
        return exc.strerror or str(exc)
    finally:
        sock.close()
