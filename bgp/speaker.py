"""BGPSpeaker: ExaBGP as a supervised child of the agent, and the bridge to its API.

    agent loop ──set_peers/set_exports/apply──► BGPSpeaker ──config file + SIGUSR1──► ExaBGP
                ◄──on_routes(full RIB)──────────   ▲ unix socket (api.sock)               │
                                                   ├──── api_relay.py (ExaBGP's API process)
                                                   └──── api_relay.py wake (wakes its reactor)

Everything runs in the agent's asyncio loop, in the node's network namespace; ExaBGP
never touches the kernel. Files in `state_dir`: `exabgp.d/exabgp.conf` (0600 in a 0700
directory: it holds the MD5 passwords), `exabgp.log`, `exabgp.out` (its stdout/stderr),
`exabgp.pid`, `api.sock`.

This module is the coordinator; each concern has its own:
- `bgp.exabgp`: supervision of the process (start, restart with backoff, reload, stop);
- `bgp.config`: its configuration file and environment (`render`, `write`);
- `bgp.api`: the API stream (command lines out, acks and JSON messages in);
- `bgp.updates` and `bgp.rib`: UPDATEs through the import filters into the learned RIB;
- `bgp.reflection`: route reflection; `bgp.diagnose`: why a session is down;
- `bgp.wake`: ExaBGP's reactor sleeps 0.2 s a turn unless a socket or API pipe it polls is
  ready; what it does not poll (queued commands, its listener, connects, signals) is woken.

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
- Reloads are confirmed in ExaBGP's log and signalled again until they take (see
  `bgp.exabgp`).

Graceful restart: ExaBGP runs with `manual-eor`, so end-of-RIB only goes out once the
export set is complete (after the first apply() following a (re)start). A restarted
ExaBGP has an empty RIB; the bridge re-sends everything when its relay connects. Routes
learned from a peer that restarts stay (stale) for its restart time, see `rib.py`. The
first on_routes() call after start waits until the peers have sent their end-of-RIB (or
`settle_time` passed), so the agent never replaces good kernel routes with a half-learned
table. ExaBGP dies with the agent (PR_SET_PDEATHSIG), so a restarted agent can bind 179.

Also done here, because ExaBGP does neither: route reflection for a node with
route-reflector clients (`bgp.reflection`), and why a session is down (`bgp.diagnose`
dials the peer the way ExaBGP would: refused, no answer, MD5 mismatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from tortie.bgp import config as cfg
from tortie.bgp import diagnose, reflection
from tortie.bgp.api import APIStream, announce_lines, withdraw_lines
from tortie.bgp.exabgp import ExaBGPProcess
from tortie.bgp.messages import ExportPolicy
from tortie.bgp.peers import Peer, prefix_filter
from tortie.bgp.rib import LearnedRoutes, family_of
from tortie.bgp.session import PeerState, source_for
from tortie.bgp.status import PeerStatus, document, notification_text
from tortie.bgp.updates import import_filter, parse_update
from tortie.bgp.wake import Waker
from tortie.errors import DataplaneError, ValidationError
from tortie.log import get_logger

log = get_logger("bgp")

def _community_attrs(comms: tuple[str, ...]) -> str:
    """` community [ .. ] large-community [ .. ]` for ExaBGP, from `AS:VALUE` / `A:B:C`."""
    standard = [c for c in comms if c.count(":") == 1]
    large = [c for c in comms if c.count(":") == 2]
    if len(standard) + len(large) != len(comms):
        raise ValidationError(f"communities must be AS:VALUE or A:B:C, got {list(comms)}", field="communities")
    out = ""
    if standard:
        out += " community [ " + " ".join(standard) + " ]"
    if large:
        out += " large-community [ " + " ".join(large) + " ]"
    return out


def _target(peers: Iterable[str]) -> str:
    """The API's neighbor selector naming these sessions."""
    return " , ".join(f"neighbor {a}" for a in peers)


RoutesCallback = Callable[[dict[str, tuple[str, ...]]], None]
ChangesCallback = Callable[[dict[str, tuple[str, ...]], frozenset[str]], None]
CEASE_BFD_DOWN = 10  # the Cease NOTIFICATION subcode RFC 9384 gives a BFD Down
CEASE_MAX_PREFIXES = 1  # Cease, "Maximum Number of Prefixes Reached" (RFC 4486)
PREFIX_LIMIT_HOLD = 300.0  # seconds a peer over its maxPrefixes stays shut before it may try again


class BGPSpeaker:
    def __init__(self, *, node_name: str, router_id: str, local_as: int, local_address: str | None,
                 state_dir: str, listen_port: int = 179, on_routes: RoutesCallback | None = None,
                 local_address6: str | None = None, graceful_restart: int = cfg.GRACEFUL_RESTART_TIME,
                 batch: int = 500, settle_time: float = 10.0, backoff: tuple[float, float] = (0.5, 30.0),
                 exabgp: str | None = None, cluster_id: str | None = None,
                 on_route_changes: ChangesCallback | None = None,
                 on_released: Callable[[], None] | None = None, log_severity: str = "Info",
                 prefix_limit_hold: float = PREFIX_LIMIT_HOLD) -> None:
        self.node_name = node_name
        self.local = cfg.LocalSettings(router_id=router_id, local_as=local_as, local_address=local_address,
                                       local_address6=local_address6, listen_port=listen_port,
                                       graceful_restart=graceful_restart, log_severity=log_severity)
        self.state_dir = os.path.abspath(state_dir)
        self.on_routes = on_routes
        # optional: after the first full table, only what changed (prefix -> hops, removed):
        # a 10,000-route table arrives in bursts, and rebuilding it per burst is the cost
        self.on_route_changes = on_route_changes
        # optional, with on_route_changes: routes stream to the agent as they arrive, from the
        # first one, and on_released() says when the first table is complete (the agent keeps
        # the routes it adopted from the kernel until then, so a half table costs nothing)
        self.on_released = on_released
        if on_routes is None and not (on_route_changes and on_released):
            raise ValueError("on_routes, or on_route_changes with on_released, is required")
        self._full_sent = False
        self.on_status: Callable[[], None] | None = None  # status() may read differently now
        # optional: the egress view changed (see set_egress_imports, egress_routes)
        self.on_egress_routes: Callable[[dict[str, dict[str, str]]], None] | None = None
        self._unsettled = asyncio.Event()  # a session is not up: diagnose it (see _diagnose_loop)
        self.cluster_id = cluster_id  # routeReflectorClusterID; router id when None
        self.batch = batch
        self.settle_time = settle_time
        # the config holds the MD5 passwords: a directory of its own, 0700 (see cfg.write)
        self.conf_path = os.path.join(self.state_dir, "exabgp.d", "exabgp.conf")
        self.sock_path = os.path.join(self.state_dir, "api.sock")
        self._waker = Waker()
        self._exabgp = ExaBGPProcess(self.state_dir, self.conf_path, exabgp, backoff,
                                     signalled=self._waker.wake)
        self._api = APIStream()
        self._api.waker = self._waker

        self._peers: dict[str, Peer] = {}  # desired, by address
        # peers over their maxPrefixes: left out of ExaBGP's file until the hold ends -> why
        self._held: dict[str, str] = {}
        self.prefix_limit_hold = prefix_limit_hold
        self._loaded: dict[str, Peer] | None = None  # what ExaBGP's file says
        self._exports: dict[str, ExportPolicy | None] | None = None  # desired prefix -> its policy
        self._communities: tuple[str, ...] = ()  # on every export (BGPConfiguration)
        self._policies: tuple[ExportPolicy, ...] = ()
        self._resolve: list[tuple[Callable[[str], bool], ExportPolicy]] = []  # most specific first
        # what ExaBGP was told per prefix: {peer: attribute text} of the established sessions
        self._announced: dict[str, dict[str, str]] = {}
        self._sent: Counter[str] = Counter()  # prefixes per peer (status)
        self._state: dict[str, PeerState] = {}
        self._import_pools: tuple[str, ...] = ()
        self._egress_imports: dict[str, frozenset[str]] = {}  # peer -> prefixes egress pools take
        self._egress_sent: dict[str, dict[str, str]] = {}  # the egress view last handed over
        self._egress_pending = False
        self._filters: dict[str, Callable[[str], bool]] = {}  # peer -> import filter (see _accepts)
        self._filters_for: tuple = (None, None, None)  # the (peers, pools, egress imports) they were made for
        self._rib = LearnedRoutes(self._accepts, filter_for=self._peer_filter)
        self._reflected: dict[str, dict[str, str]] = {}  # what ExaBGP was told to reflect, per peer
        self._routes_pending = False
        self._reflect_pending = False
        self._routes_released = False  # first on_routes sent (see settle)
        self._synced = False  # export set complete in this ExaBGP

        self._server: asyncio.AbstractServer | None = None
        self._api_pid: int | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._config_gen = 0  # bumped by every write of the file
        self._spawn_gen = 0  # the generation on disk when ExaBGP was started
        self._started_at = 0.0

    # --- contract with the agent -----------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        if os.environ.get("TORTIE_BGP_TRACE"):
            self._api.trace = open(os.path.join(self.state_dir, "api.trace"), "ab")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        with contextlib.suppress(FileNotFoundError):  # where earlier versions kept it, readable by all
            os.unlink(os.path.join(self.state_dir, "exabgp.conf"))
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
        self._exabgp.stopping = True
        for task in [*self._tasks, self._exabgp.reloader]:
            if task:
                task.cancel()
        await self._exabgp.terminate()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server:
            self._server.close()
        if self._api.writer:
            self._api.writer.close()
        self._waker.close()
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
                source = source_for(p.address)
                if source and source != default:
                    p = dataclasses.replace(p, local_address=source)
            if (p.local_address or default) is None:
                log.warning("peer skipped: no local address of its family", peer=p.address)
                continue
            wanted[p.address] = p
        self._peers = wanted

    def set_exports(self, prefixes: Iterable[str], communities: Iterable[str] = (),
                    policies: Iterable[ExportPolicy] = ()) -> None:
        """The prefixes this node announces (next hop: its own address), with the
        BGPConfiguration's communities (`AS:VALUE`, or `A:B:C` for large communities) on
        every one; `policies` narrow the peers of the prefixes inside them and add
        communities and AS-path prepending (see `ExportPolicy`)."""
        comms = tuple(sorted(set(communities)))
        _community_attrs(comms)  # refused here, not later on the API stream
        policies = tuple(policies)
        for pol in policies:
            _community_attrs(pol.communities)
        if policies != self._policies:
            self._policies = policies
            # most specific first: an egress address's /32 inside a pool's range is its own
            self._resolve = [(prefix_filter((pol.cidr,)), pol) for pol in
                             sorted(policies, key=lambda pol: -ipaddress.ip_network(pol.cidr).prefixlen)]
        self._communities = comms
        resolve = self._resolve
        exports: dict[str, ExportPolicy | None] = {}
        for p in prefixes:
            prefix = str(ipaddress.ip_network(p, strict=False))
            exports[prefix] = next((pol for inside, pol in resolve if inside(prefix)), None)
        self._exports = exports

    def set_import_pools(self, cidrs: Iterable[str]) -> None:
        """The IP pools: prefixes inside them are imported from external peers too."""
        cidrs = tuple(sorted(cidrs))
        if cidrs != self._import_pools:
            self._import_pools = cidrs
            self._rib.set_filter(self._accepts)
            self._routes_changed()

    def set_egress_imports(self, wanted: Mapping[str, Iterable[str]]) -> None:
        """Per peer, the prefixes egress pools take from it (IPPool `egress.fromPeers`): kept
        out of the learned table (the main table never sees a router's default route) and
        handed over apart, by `on_egress_routes`, while the peer's session is established."""
        wanted = {peer: frozenset(prefixes) for peer, prefixes in wanted.items() if prefixes}
        if wanted != self._egress_imports:
            self._egress_imports = wanted
            self._rib.set_filter(self._accepts)
            self._routes_changed()

    def egress_routes(self) -> dict[str, dict[str, str]]:
        """The egress view: per peer whose session is established, what it announces now of
        the prefixes set apart for egress (prefix -> next hop). A peer that is down counts for
        nothing, whatever graceful restart keeps: egress fails over to the peers that are up."""
        out = {}
        for peer, prefixes in self._egress_imports.items():
            st = self._state.get(peer)
            if st is None or st.state != "established":
                continue
            paths, stale = self._rib.paths(peer), self._rib.stale(peer)
            got = {p: paths[p][0] for p in prefixes if p in paths and p not in stale}
            if got:
                out[peer] = got
        return out

    async def apply(self) -> None:
        async with self._lock:
            await self._reconcile()

    def teardown(self, peer: str, why: str) -> None:
        """Close an established session at once (Cease, subcode 10 "BFD Down", RFC 9384):
        what the peer announced goes as on any session loss, without waiting for the hold
        time. ExaBGP dials again as usual; a peer that really is gone stays down."""
        st = self._state.get(peer)
        if st is None or st.state != "established" or not self._api.connected:
            return
        st.last_error = why

        async def send() -> None:
            try:
                await self._api.send([f"neighbor {peer} teardown {CEASE_BFD_DOWN}"])
                log.info("bgp session torn down", peer=peer, why=why)
            except DataplaneError as exc:  # the API went away: the session goes with ExaBGP
                log.warning("bgp teardown failed", peer=peer, error=str(exc))
        self._spawn(send())

    def status(self) -> list[PeerStatus]:
        out = []
        for addr, peer in self._peers.items():
            st = self._state.get(addr) or PeerState()
            up = st.state == "established"
            sent = self._sent.get(addr, 0) if up and self._synced else 0
            error = "" if up else self._held.get(addr) or "; ".join(e for e in (st.last_error, st.probe_error) if e)
            if not up and not error and peer.passive:
                error = "waiting for the peer to connect (this side is passive)"
            out.append(PeerStatus(peer=addr, kind=peer.kind, state=st.state, since=st.since,
                                  prefixes_received=self._rib.count(addr), prefixes_sent=sent,
                                  prefixes_filtered=self._rib.count(addr) - self._rib.accepted(addr),
                                  last_error=error, name=peer.name, port=peer.port, passive=peer.passive,
                                  stale=self._rib.is_stale(addr)))
        return out

    def status_json(self) -> dict:
        """The status document to publish (JSON-ready dict: `json.dumps` it)."""
        return document(self.node_name, self.status(), {
            "router_id": self.local.router_id, "as_number": self.local.local_as,
            "address": self.local.local_address or self.local.local_address6,
            "address6": self.local.local_address6, "exabgp_pid": self.pid, "restarts": self.restarts})

    @property
    def pid(self) -> int | None:
        return self._exabgp.pid

    @property
    def restarts(self) -> int:
        """How often ExaBGP exited and was started again."""
        return self._exabgp.restarts

    @property
    def errors(self) -> int:
        """Commands ExaBGP answered with `error`."""
        return self._api.errors

    @property
    def exabgp(self) -> str:
        """The ExaBGP executable."""
        return self._exabgp.binary

    @property
    def log_path(self) -> str:
        return self._exabgp.log_path

    @property
    def pid_path(self) -> str:
        return self._exabgp.pid_path

    @property
    def backoff(self) -> tuple[float, float]:
        return self._exabgp.backoff

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
        if self._configured() != self._loaded:
            self._reload_peers()
        if not self._api.connected or self._exports is None:
            return  # nothing to talk to yet, or the agent has not said what to export
        # Only established sessions: a change queued for a session that is down sits in
        # ExaBGP as pending and makes it drop every SIGUSR1 (5.0.15). A session that came up
        # (needs_full) holds nothing of ours: ExaBGP keeps no adj-rib-out.
        loaded = self._loaded or {}
        up = {a: loaded[a] for a, st in self._state.items() if st.state == "established" and a in loaded}
        fresh = {a for a in up if self._state[a].needs_full}
        withdraw, announce, now_held = self._export_diff(up, fresh)
        lines = []
        for peers, prefixes in withdraw.items():
            lines += withdraw_lines(_target(peers), prefixes, self.batch)
        for (attrs, peers), prefixes in announce.items():
            lines += announce_lines(_target(peers), attrs, prefixes, self.batch)
        if lines:
            await self._api.send(lines)
        for prefix, held in now_held.items():  # once sent: a broken stream leaves the old books
            if held:
                self._announced[prefix] = held
            else:
                self._announced.pop(prefix, None)
        if lines:
            log.info("exports sent", announced=sum(map(len, announce.values())),
                     withdrawn=sum(map(len, withdraw.values())), lines=len(lines), total=len(self._announced))
        if lines or fresh:
            self._sent = Counter(a for peers in self._announced.values() for a in peers)
            self._status_changed()
        if not self._synced:
            self._synced = True
            self._status_changed()
            log.info("export set complete; end-of-RIB may go out", prefixes=len(self._exports))
        # reflected routes go out before the end-of-RIB of a session that just came up
        await self._reconcile_reflection()
        await self._send_owed(fresh)

    def _export_diff(self, up: dict[str, Peer], fresh: set[str]) -> tuple[dict, dict, dict]:
        """What to tell ExaBGP so that each established peer holds exactly its exports:
        withdrawals {peers: [prefix]} and announcements {(attrs, peers): [prefix]}, grouped
        so that one line carries many prefixes, and the entries of `_announced` that change."""
        exports, announced = self._exports or {}, self._announced
        audiences: dict[tuple, dict[str, str]] = {}
        withdraw: dict[tuple[str, ...], list[str]] = {}
        announce: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        nothing: dict[str, str] = {}
        held: dict[str, dict[str, str]] = {}
        for prefix in [*exports, *(p for p in announced if p not in exports)]:
            if prefix in exports:
                family = family_of(prefix)
                pol = exports[prefix]
                want = audiences.get((pol, family))
                if want is None:
                    want = audiences[(pol, family)] = self._audience(pol, family, up)
            else:
                want = nothing
            have = old = announced.get(prefix, nothing)
            if fresh and have:
                have = {a: attrs for a, attrs in have.items() if a not in fresh}
            differs = want != have
            if differs:
                gone = tuple(a for a in have if a not in want and a in up)
                if gone:
                    withdraw.setdefault(gone, []).append(prefix)
                by_attrs: dict[str, list[str]] = {}
                for a, attrs in want.items():
                    if have.get(a) != attrs:
                        by_attrs.setdefault(attrs, []).append(a)
                for attrs, peers in by_attrs.items():
                    announce.setdefault((attrs, tuple(peers)), []).append(prefix)
            if differs if have is old else want != old:
                held[prefix] = want  # also when a down peer only leaves the books (nothing sent)
        return withdraw, announce, held

    def _audience(self, pol: ExportPolicy | None, family: str, up: dict[str, Peer]) -> dict[str, str]:
        """The established peers of `family` that a prefix under `pol` goes to, and the
        attributes each gets."""
        comms = self._communities + (pol.communities if pol else ())
        attrs = "next-hop self" + _community_attrs(tuple(sorted(set(comms))))
        prepended = attrs
        if pol and pol.prepend:
            asn = str(self.local.local_as)
            prepended += " as-path [ " + " ".join([asn] * (pol.prepend + 1)) + " ]"
        return {a: prepended if peer.as_number != self.local.local_as else attrs
                for a, peer in sorted(up.items()) if family_of(a) == family
                and (pol is None or pol.peers is None or a in pol.peers)}

    async def _send_owed(self, fresh: set[str]) -> None:
        """Peers that came up have had their whole export set (see _reconcile): our end-of-RIB."""
        for addr in sorted(fresh):
            st = self._state.get(addr)
            if st is None or not st.needs_full or st.state != "established":
                continue
            st.needs_full = False
            await self._api.send([f"neighbor {addr} announce eor {family_of(addr)}"])
            log.info("end-of-RIB sent", peer=addr, prefixes=self._sent.get(addr, 0))

    def _configured(self) -> dict[str, Peer]:
        """The peers ExaBGP's file should hold: the desired ones not held down."""
        if not self._held:
            return self._peers
        return {a: p for a, p in self._peers.items() if a not in self._held}

    def _reload_peers(self) -> None:
        old = self._loaded or {}
        self._write_config()
        peers = self._loaded
        if any(old.get(a) != p for a, p in peers.items()):
            self._rib.set_filter(self._accepts)  # import filters may have changed
            self._routes_changed()
        for addr in set(old) - set(peers):
            held = addr in self._held  # its state stays: status says why it is down
            st = self._state.get(addr) if held else self._state.pop(addr, None)
            if st and st.expiry:
                st.expiry.cancel()
                st.expiry = None
            if held and st:
                st.state, st.since = "down", time.time()
            self._rib.drop(addr)
            self._routes_changed()
        now = time.time()
        for addr, peer in peers.items():
            if addr in old and self._redefined(old[addr], peer) and (st := self._state.get(addr)) is not None:
                # ExaBGP re-establishes a redefined session: as if it went down
                if st.state == "established":
                    self._peer_gone(addr, st)
                st.state, st.since, st.needs_full = "idle", now, False
                st.last_error, st.probe_error = "reconfigured", ""
        if any(a not in old or self._redefined(old[a], p) for a, p in peers.items()):
            self._waker.settle()  # sessions to set up: its listener and connects are not polled
            self._unsettled.set()
        self._check_settled()
        self._status_changed()
        if self._api_ready():
            # only once its API runs: before that SIGUSR1 kills it, and it has not read the file yet
            log.info("exabgp reload", peers=len(peers),
                     added=sorted(set(peers) - set(old)), removed=sorted(set(old) - set(peers)))
            self._exabgp.request_reload()

    def _redefined(self, old: Peer, new: Peer) -> bool:
        """Whether ExaBGP sees another neighbor (it compares what its file says, field by
        field): settings only tortie reads (BFD, maxPrefixes, accepted prefixes) keep the
        session as it is."""
        return cfg.neighbor_block(old, self.local) != cfg.neighbor_block(new, self.local)

    def _api_ready(self) -> bool:
        pid = self._exabgp.pid
        return pid is not None and self._api_pid == pid and self._api.connected

    def _write_config(self) -> None:
        peers = self._configured()
        cfg.write(self.conf_path, cfg.render(peers.values(), self.local, self.sock_path))
        self._loaded = dict(peers)
        self._config_gen += 1
        for addr in peers:
            self._state.setdefault(addr, PeerState())

    # --- the API stream ----------------------------------------------------------------

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readline()
        try:
            role, pid = hello.split()[0], int(hello.split()[1])
        except (IndexError, ValueError):
            writer.close()
            return
        proc = self._exabgp.proc
        if proc is None or pid != proc.pid:
            log.warning("api relay of an unknown exabgp", pid=pid)
            writer.close()
            return
        if role == b"#wake":
            await self._on_wake(reader, writer)
            return
        self._api.attach(writer)
        if pid != self._api_pid:
            # a new ExaBGP: its RIB is empty, and end-of-RIB waits until it is full again
            self._api_pid = pid
            self._announced = {}
            self._synced = False
        log.info("exabgp api connected", pid=pid)
        if self._config_gen != self._spawn_gen:
            # the file changed while it was starting: it may have read the old one
            self._spawn_gen = self._config_gen
            self._exabgp.request_reload()
        self._spawn(self._apply_quietly())
        try:
            while line := await reader.readline():
                self._on_line(line)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("exabgp api stream broken", error=str(exc))
        finally:
            self._api.detach(writer)

    async def _on_wake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """ExaBGP's wake process: it only listens (see `bgp.wake`); held until it goes."""
        self._waker.attach(writer)
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            self._waker.detach(writer)

    def _on_line(self, raw: bytes) -> None:
        msg = self._api.parse(raw)
        if msg is None:
            return
        kind = msg.get("type")
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
        if kind != "update":
            self._status_changed()

    async def _apply_quietly(self) -> None:
        try:
            await self.apply()
        except DataplaneError as exc:  # the API went away; its reconnect applies again
            log.warning("bgp apply failed", error=str(exc))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- sessions ------------------------------------------------------------------------

    def _peer_state(self, peer: str) -> PeerState:
        return self._state.setdefault(peer, PeerState())

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
            self._check_settled()
            if self._synced:
                self._spawn(self._apply_quietly())
        elif state == "connected":
            if st.state != "established":
                st.state, st.since = "connect", now
        elif state == "down":
            was_up = st.state == "established"
            st.state, st.since = "down", now
            explained = diagnose.reason_text(reason)
            if explained and not (st.last_error.startswith("peer sent") and "closed" in explained):
                st.last_error = explained
            if was_up:  # later failed attempts leave the (stale) routes alone
                self._peer_gone(peer, st)
                log.info("bgp session down", peer=peer, reason=reason)
                self._waker.settle()  # it comes back through the listener or a connect
            self._unsettled.set()

    def _check_settled(self) -> None:
        """Every session up: no wakes, no diagnosis."""
        if all(self._state.get(a, PeerState()).state == "established" for a in self._configured()):
            self._waker.settled()
            self._unsettled.clear()

    def _peer_gone(self, peer: str, st: PeerState) -> None:
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

    async def _diagnose_loop(self, every: float = 5.0) -> None:
        """Say why the sessions that are down are down (see `bgp.diagnose`): only while one
        is, so an idle node with every session up has no timer here."""
        while True:
            await self._unsettled.wait()
            await asyncio.sleep(every)
            await diagnose.diagnose(self._configured(), self._state, self._local_for)
            self._status_changed()

    def _status_changed(self) -> None:
        # every change of a session or of what a peer announced passes here
        if self.on_status is not None:
            self.on_status()
        if (self._egress_imports or self._egress_sent) and not self._egress_pending:
            self._egress_pending = True
            asyncio.get_running_loop().call_soon(self._emit_egress)

    def _emit_egress(self) -> None:
        self._egress_pending = False
        view = self.egress_routes()
        if view == self._egress_sent:
            return
        self._egress_sent = view
        if self.on_egress_routes is not None:
            try:
                self.on_egress_routes(view)
            except Exception:
                log.exception("on_egress_routes failed")

    def _local_for(self, peer: Peer) -> str | None:
        """The address we speak to `peer` from."""
        return peer.local_address or (
            self.local.local_address if family_of(peer.address) == "ipv4 unicast" else self.local.local_address6)

    # --- the RIB ---------------------------------------------------------------------------

    def _on_update(self, peer: str, message: dict) -> None:
        if "eor" in message:
            family = f"{message['eor'].get('afi')} {message['eor'].get('safi')}"
            st = self._peer_state(peer)
            st.eor.add(family)
            if self._rib.end_of_rib(peer, family):
                self._routes_changed()
            self._maybe_release()
            return
        if peer in self._held:
            return  # what was on its way when we closed the session
        parsed = parse_update(message.get("update") or {}, self.local.router_id, self._cluster_id)
        if parsed is not None and self._rib.update(peer, *parsed):
            self._routes_changed()
        limit = getattr(self._peers.get(peer), "max_prefixes", None)
        if limit and self._rib.count(peer) > limit:
            self._over_limit(peer, limit)

    def _over_limit(self, peer: str, limit: int) -> None:
        """More prefixes than the peer's maxPrefixes (BIRD's `receive limit`, FRR's
        `maximum-prefix`): its routes go at once, the session is closed with Cease 1 and left
        out of ExaBGP's file for `prefix_limit_hold` seconds, then it may come back."""
        received = self._rib.count(peer)
        why = (f"maxPrefixes {limit} exceeded ({received} received): session closed, "
               f"retried after {self.prefix_limit_hold:.0f}s")
        log.warning("bgp peer over its prefix limit", peer=peer, limit=limit, received=received)
        self._held[peer] = why
        st = self._peer_state(peer)
        st.last_error = why
        if self._rib.peer_down(peer, graceful=False):
            self._routes_changed()

        async def shut() -> None:
            with contextlib.suppress(DataplaneError):  # the reload below closes it anyway
                await self._api.send([f"neighbor {peer} teardown {CEASE_MAX_PREFIXES}"])
            await self._apply_quietly()  # its neighbor leaves the file
        self._spawn(shut())
        asyncio.get_running_loop().call_later(self.prefix_limit_hold, self._release_held, peer)

    def _release_held(self, peer: str) -> None:
        if self._held.pop(peer, None) is not None:
            log.info("bgp peer may try again after its prefix limit", peer=peer)
            self._spawn(self._apply_quietly())

    def _accepts(self, peer: str, prefix: str) -> bool:
        return self._peer_filter(peer)(prefix)

    def _peer_filter(self, peer: str) -> Callable[[str], bool]:
        # the peer's filter is compiled once per peer set (set_peers, set_import_pools and
        # set_egress_imports replace these objects, never change them in place); the RIB asks
        # once per update
        made_for = (self._peers, self._import_pools, self._egress_imports)
        if any(a is not b for a, b in zip(self._filters_for, made_for, strict=True)):
            self._filters, self._filters_for = {}, made_for
        f = self._filters.get(peer)
        if f is None:
            f = self._filters[peer] = import_filter(self._peers.get(peer), self._import_pools,
                                                    self._egress_imports.get(peer, frozenset()))
        return f

    # --- route reflection ----------------------------------------------------------------

    @property
    def _cluster_id(self) -> str | None:
        """Set when this node reflects (it has route-reflector clients)."""
        return reflection.cluster_id(self._peers, self.cluster_id, self.local.router_id)

    async def _reconcile_reflection(self) -> None:
        want = reflection.reflection(self._peers, self._state, self._rib, self._cluster_id)
        lines = reflection.reflection_lines(self._reflected, want, self.batch)
        if lines:
            await self._api.send(lines)
            log.info("reflected routes sent", lines=len(lines))

    # --- routes to the agent -----------------------------------------------------------

    def _routes_changed(self) -> None:
        self._status_changed()
        if self._cluster_id is not None and not self._reflect_pending:
            self._reflect_pending = True
            asyncio.get_running_loop().call_soon(self._reflect_soon)
        if self._routes_pending or not (self._routes_released or self._streaming):
            return
        self._routes_pending = True
        asyncio.get_running_loop().call_soon(self._emit_routes)

    def _reflect_soon(self) -> None:
        self._reflect_pending = False
        if self._synced:
            self._spawn(self._apply_quietly())

    def learned_table(self) -> dict[str, tuple[str, ...]]:
        """Every accepted route: prefix -> next hops (ECMP, sorted)."""
        return self._rib.table()

    @property
    def _streaming(self) -> bool:
        return self.on_released is not None and self.on_route_changes is not None

    def _emit_routes(self) -> None:
        self._routes_pending = False
        try:
            if self._streaming:
                changed, removed = self._rib.take_changes()
                if changed or removed:
                    self.on_route_changes(changed, removed)
                return
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
            if st and st.state == "established" and family_of(addr) not in st.eor:
                return
        if not any(st.state == "established" for st in self._state.values()):
            return  # nothing learned yet: let the settle timer decide
        self._release("end-of-RIB from every established peer")

    def _release(self, why: str) -> None:
        if self._routes_released:
            return
        self._routes_released = True
        log.info("learned routes released to the agent", why=why)
        if self._streaming:
            self._emit_routes()  # what is still queued goes before the release
            try:
                self.on_released()
            except Exception:
                log.exception("on_released failed")
            return
        self._routes_changed()

    async def _settle(self) -> None:
        await asyncio.sleep(self.settle_time)
        self._release(f"settle time {self.settle_time}s")

    # --- supervision -------------------------------------------------------------------

    async def _supervise(self) -> None:
        await self._exabgp.supervise(
            lambda: cfg.environment(self.local, self._exabgp.log_path, self._exabgp.pid_path, self._peers.values()),
            self._on_spawn, self._exabgp_gone)

    def _on_spawn(self) -> None:
        self._spawn_gen = self._config_gen
        self._waker.settle()  # a new ExaBGP sets up every session

    def _exabgp_gone(self, rc: int | None) -> None:
        self._unsettled.set()
        self._status_changed()
        self._synced = False
        self._announced = {}
        self._reflected = {}
        self._api_pid = None
        self._api.close()
        now = time.time()
        for addr, st in self._state.items():
            if st.state == "established":
                st.state, st.since = "down", now
                st.last_error = f"exabgp exited ({rc}); restarting"
                # we restart: the peers keep forwarding, we keep what they told us
                self._peer_gone(addr, st)
            st.needs_full = False
