"""tortie-agent: the per-node daemon.

One asyncio loop takes the inputs -- the datastore syncer, CNI requests, routes learned
over BGP, timers -- and never writes the dataplane. Each input goes through the
calculation (`agent.calc.Calculation`, pure), which emits only what changed as messages;
the loop hands them to the dataplane driver (`agent.driver`), one thread that owns every
write to the kernel, nftables and the BGP exports, and applies each manager's difference
in one batch (routes, rules, NAT, NetworkPolicy filter, BGP exports, in that order).

Nothing is sent to the driver before the first datastore snapshot, and the driver starts
only then: a restarted agent would otherwise see empty desired state and delete the
routes of live pods it is about to adopt. Learned routes found in the kernel at start are
kept (class "bgp-adopted") until the speaker has the peers' full tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import replace

from tortie import errors
from tortie import log as tlog
from tortie.agent import config as agent_config
from tortie.agent import node_registration, router_id, vxlan_addr
from tortie.agent.calc import EGRESS, WORKLOADS, Calculation
from tortie.agent.calc_vxlan import VXLAN_CLASS, VxlanCalc, vxlan_refused
from tortie.agent.cni_server import ETCD_TIMEOUT as CNI_ETCD_TIMEOUT
from tortie.agent.egress_status import EgressStatus
from tortie.datastore import keys
from tortie.datastore.etcd import EtcdClient
from tortie.datastore.monitor import DatastoreMonitor
from tortie.health import Health, start_http
from tortie.metrics import Registry
from tortie.routing.messages import RouteDelta
from tortie.routing.model import MAIN_TABLE

log = tlog.get_logger("agent")

STATUS_REFUSED_MAX = 50  # refused learned routes listed in the status document (all are counted)
STATUS_PUBLISH_INTERVAL = 2.0  # at most one BGP status write per interval while it changes
# unchanged, the status is written again this often: `tortiectl node status` calls one older
# than 30 s stale (the agent is probably down)
STATUS_REFRESH_INTERVAL = 10.0
RETRY_DELAY = 1.0
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
               0.1, 0.25, 0.5, 1.0)
APPLY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0, 2.5)
MANAGERS = ("vxlan", "routes", "rules", "sysctls", "nat", "antispoof", "filter")



def failsafe_ports(cfg) -> dict:
    """The host endpoints' failsafe ports (validated by config.load): the agent's own health
    port always among the inbound ones."""
    from tortie.policy.host_rules import parse_ports

    inbound = parse_ports(cfg.failsafe_inbound_host_ports, "TORTIE_FAILSAFE_INBOUND_HOST_PORTS")
    return {"failsafe_in": tuple(sorted({*inbound, ("tcp", cfg.health_port)})),
            "failsafe_out": parse_ports(cfg.failsafe_outbound_host_ports, "TORTIE_FAILSAFE_OUTBOUND_HOST_PORTS")}

class Agent(EgressStatus):
    def __init__(self, cfg: agent_config.AgentConfig) -> None:
        from tortie.datastore.ipam import IPAM
        from tortie.datastore.store import ResourceStore

        self.cfg = cfg
        self.node = cfg.nodename
        self.client = EtcdClient(cfg.etcd)
        # CNI requests have a channel of their own with short deadlines: with etcd gone an
        # ADD is answered "try again later" in under 2 s, and never queues behind the syncer.
        self.cni_client = EtcdClient(replace(cfg.etcd, timeout=min(cfg.etcd.timeout, CNI_ETCD_TIMEOUT)))
        self.store = ResourceStore(self.cni_client)
        self.ipam = IPAM(self.cni_client)
        self.datastore = DatastoreMonitor(self.cni_client, on_change=self._on_datastore)
        self.calc = Calculation(self.node, prefix=cfg.etcd.prefix, own_addresses=self._own_addresses())
        self.state = self.calc.state
        self.vxlan = VxlanCalc(self.node)  # the overlay's plan, beside the calculation
        self._tunnel_task: asyncio.Task | None = None
        self._tunnel_again = False
        self._vxlan_refused: str | None = None  # on the driver thread
        self._tunnel_done: tuple | None = None  # what the last successful run was given
        self.in_sync = False
        self.stopping = asyncio.Event()
        self.health = Health()
        self.metrics = Registry()
        m = self.metrics
        self.m_rounds = m.counter("tortie_apply_rounds_total", "Dataplane driver rounds, by result")
        self.m_events = m.counter("tortie_datastore_events_total", "Datastore events, by type")
        self.m_calc_cpu = m.counter("tortie_calc_cpu_seconds_total",
                                    "CPU time the calculation spent on inputs, by input")
        self.m_sent = m.counter("tortie_dataplane_messages_total", "Messages sent to the dataplane driver")
        self.m_lag = m.histogram("tortie_event_loop_lag_seconds",
                                 "How long a ready callback waited for the event loop", LAG_BUCKETS)
        self.m_apply = m.histogram("tortie_dataplane_apply_seconds",
                                   "Duration of one dataplane manager's apply", APPLY_BUCKETS)
        self.m_failures = m.counter("tortie_dataplane_failures_total", "Failed applies, by manager")
        self.m_exports = m.gauge("tortie_bgp_exports", "Prefixes this node announces")
        self.m_routes = m.gauge("tortie_desired_routes", "Desired routes, by class")
        self.m_refused = m.gauge("tortie_bgp_routes_refused", "Learned routes not installed because they "
                                 "would take over a local pod or a part of this node's blocks")
        self.m_datastore = m.gauge("tortie_datastore_up", "1 while etcd answers the agent's probe; "
                                   "0 while it does not (CNI ADD answers 'try again later')")
        self.m_datastore.set(1)
        self.m_egress = m.gauge("tortie_egress_up", "Per egress pool: 1 while its table routes by its "
                                "next hop, 0 while its traffic is refused (node status says why)")
        self.m_bfd = m.gauge("tortie_bfd_up", "Per BFD peer (an egress next hop or a BGP peer): 1 while Up")
        self.m_vxlan = m.gauge("tortie_vxlan_up", "Per VXLAN device this node wants: 1 while the device and its "
                               "FDB and neighbour entries are in place, 0 while the kernel refuses them")
        self.m_sessions = m.gauge("tortie_bgp_session_up", "Per BGP peer: 1 while the session is established")
        self.m_pol_packets = m.counter("tortie_policy_packets_total", "Packets each policy rule matched, by "
                                       "policy, direction, rule (its index in the spec) and action")
        self.m_pol_bytes = m.counter("tortie_policy_bytes_total", "Bytes each policy rule matched")
        self.m_pol_logged = m.counter("tortie_policy_log_lines_total", "Packets Log rules handed to the agent, "
                                      "each written as one 'policy log' line")
        self.m_spoofed = m.counter("tortie_spoofed_packets_total", "Packets from pod interfaces with a source "
                                   "address not the pod's own, dropped")
        self.filter = None  # the FilterManager, once the driver is made
        self.antispoof = None  # the AntiSpoofManager, likewise
        self._policy_usage: dict[str, int] = {}  # policy key -> local endpoints it is active on
        self.egress_status: list[dict] = []  # per egress pool: up, and why not (published)
        self._egress_routes: dict = {}  # the route manager's word on the egress routes
        self._egress_seen: dict | None = None  # the same, on the driver thread
        self.bfd = None  # routing.bfd.BFD, once an egress next hop asks for BFD
        self._bfd_want: dict = {}
        self.cni = None
        self.driver = None
        self.bgp = None  # made after the first snapshot: its AS and cluster id come from there
        self._bgp_identity: tuple | None = None
        self._speaker_task: asyncio.Task | None = None
        self._starting = None  # a speaker being started
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task] = []
        self._status_dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.health.refresh = self._refresh_health
        self.metrics.collectors.append(self._collect_gauges)

    # --- inputs -> calculation -> driver ---------------------------------------------

    def _calc(self, what: str, fn, *args) -> None:
        t0 = time.thread_time()
        fn(*args)
        self.m_calc_cpu.inc(time.thread_time() - t0, input=what)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush, self._loop.time())

    def _flush(self, scheduled: float | None = None) -> None:
        """Hand what the calculation emitted since the last flush to the driver."""
        if scheduled is not None:
            # how long a ready callback waited for the loop: its lag, measured where work is
            self.m_lag.observe(self._loop.time() - scheduled)
        self._flush_scheduled = False
        if not self.in_sync:
            return
        t0 = time.thread_time()
        msgs = self._take()
        self.m_calc_cpu.inc(time.thread_time() - t0, input="take")
        if msgs:
            self.m_sent.inc(len(msgs))
            self.driver.send(msgs)
        self._update_egress()
        usage = self.calc.policy.usage()
        if usage != self._policy_usage:  # for `tortiectl get ... -o wide`, in the status document
            self._policy_usage = usage
            self._status_dirty.set()
        if self.bgp is not None:  # what the speaker sets apart for egress pools (fromPeers)
            self.bgp.set_egress_imports(self.calc.egress_imports)
        self._check_speaker()

    def _take(self) -> list:
        """The calculation's messages, and the overlay's (its device before its routes)."""
        if self.vxlan.dirty:
            self._check_tunnel()
        return [*self.vxlan.update(self.state), *self.calc.take_messages()]

    def _check_tunnel(self) -> None:
        """The node's VTEP address follows the VXLAN pools (etcd: off the loop, one at a time)."""
        if self._tunnel_task is not None and not self._tunnel_task.done():
            self._tunnel_again = True
            return
        self._tunnel_again = False
        me, pools = self.state.nodes.get(self.node), list(self.state.pools.values())
        inputs = vxlan_addr.inputs(me, pools)
        if inputs == self._tunnel_done:
            return  # nothing it reads changed (a pod came or went): no etcd round trip

        async def run() -> None:
            try:
                await asyncio.to_thread(vxlan_addr.reconcile, self.store, self.ipam, me, pools)
                self._tunnel_done = inputs
                self.health.condition("vxlan-address", None)
            except errors.TortieError as exc:
                log.error("VXLAN tunnel address not set", error=str(exc))
                self.health.condition("vxlan-address", f"no VXLAN tunnel address: {exc}")
                await asyncio.sleep(RETRY_DELAY)
                self._tunnel_again = True
            if self._tunnel_again:
                self._loop.call_soon(self._check_tunnel)

        self._tunnel_task = asyncio.create_task(run(), name="vxlan-address")

    def _on_learned_changes(self, changed: dict[str, tuple[str, ...]], removed: frozenset[str]) -> None:
        self._calc("learned", self.calc.on_learned, changed, removed)

    def _on_egress_learned(self, view: dict[str, dict[str, str]]) -> None:
        """What the peers that fromPeers pools select announce, from established sessions."""
        self._calc("egress", self.calc.on_egress_learned, view)

    def _on_released(self) -> None:
        """The speaker's first table is complete (every peer's end-of-RIB, or its settle
        time): what it streamed so far is all there is, so the routes adopted from the
        kernel and anything a previous speaker learned can go."""
        speaker = self.bgp or self._starting

        def fold() -> None:
            if speaker is not None:
                self.calc.replace_learned(speaker.learned_table())
            self.calc.drop_adopted()
        self._calc("learned", fold)

    async def _follow_datastore(self) -> None:
        from tortie.datastore.watch import Snapshot, Syncer

        # Only what the calculation reads: not the IPAM blocks' churn on every allocation,
        # nor the BGP status every node rewrites.
        prefix = self.cfg.etcd.prefix
        syncer = Syncer(self.client, [prefix + keys.RESOURCES, prefix + keys.IPAM_AFFINITY])
        try:
            async for event in syncer.events():
                if isinstance(event, Snapshot):
                    self.vxlan.dirty = True
                    self._calc("snapshot", self.calc.on_snapshot, event.items)
                    self.m_events.inc(type="snapshot")
                    log.info("datastore snapshot", revision=event.revision, keys=len(event.items))
                    if not self.in_sync:
                        self.in_sync = True
                        self._first_sync()
                else:
                    self.vxlan.note(self.state.relative(event.key))
                    self._calc("update", self.calc.on_update, event.key, event.value)
                    self.m_events.inc(type="update")
        finally:
            syncer.stop()

    def _first_sync(self) -> None:
        """The first snapshot is in: send it whole and start the driver (which adopts)."""
        loop = self._loop

        def applied(errs: dict[str, str]) -> None:
            loop.call_soon_threadsafe(self._first_applied, errs)

        self._flush_scheduled = False
        msgs = self._take()
        self.driver.send(msgs, done=applied)
        self.driver.start()
        self._check_speaker()

    def _first_applied(self, errs: dict[str, str]) -> None:
        if "routes" in errs:
            log.error("first sync not applied; retrying", error=errs["routes"])
            self.driver.send((), done=lambda e: self._loop.call_soon_threadsafe(self._first_applied, e))
            return
        if not self.health.ready:
            log.info("first sync applied; ready")
        self.health.ready = True

    # --- the BGP speaker (its identity comes from the datastore) ---------------------

    def _check_speaker(self) -> None:
        if not (self.cfg.bgp_enabled and (self.cfg.node_address or self.cfg.node_ip6)):
            return
        if self._speaker_task is not None and not self._speaker_task.done():
            return  # a (re)start is under way; it checks again when done
        if self._speaker_identity() != self._bgp_identity:
            self._speaker_task = asyncio.create_task(self._ensure_speaker(), name="bgp-start")

    def _speaker_identity(self) -> tuple:
        me = self.state.nodes.get(self.node)
        conf = self.state.bgp_config(self.node)
        local_as = (me.as_number if me else None) or self.cfg.as_number or conf.as_number
        cluster_id = me.route_reflector_cluster_id if me else None
        # ExaBGP reads its log level (logSeverityScreen) only when it starts
        return (local_as, cluster_id, conf.listen_port or 179, conf.log_severity or "Info")

    async def _ensure_speaker(self) -> None:
        """Start (or, when the node's AS or reflector cluster changed, restart) ExaBGP."""
        from tortie.bgp.export_mgr import SpeakerChanged
        from tortie.bgp.speaker import BGPSpeaker

        identity = self._speaker_identity()
        if self.bgp is not None:
            log.info("BGP identity changed; restarting the speaker", was=self._bgp_identity, now=identity)
            old, self.bgp = self.bgp, None
            await old.stop()
        local_as, cluster_id, port, log_severity = identity
        rid, source = router_id.derive(self.node, self.cfg.node_address, self.cfg.router_id)
        if source == "hash":
            log.info("router ID derived from the node name (no IPv4 address)", router_id=rid)
        speaker = BGPSpeaker(
            node_name=self.node, router_id=rid, local_as=local_as,
            local_address=self.cfg.node_address, state_dir=self.cfg.state_dir,
            listen_port=port, cluster_id=cluster_id,
            on_route_changes=self._on_learned_changes, on_released=self._on_released,
            graceful_restart=self.cfg.bgp_graceful_restart,
            local_address6=self.cfg.node_ip6.split("/")[0] if self.cfg.node_ip6 else None,
            log_severity=log_severity,
        )
        speaker.on_status = lambda: self._bgp_status_changed(speaker)
        speaker.on_egress_routes = self._on_egress_learned
        speaker.set_egress_imports(self.calc.egress_imports)
        self._calc("egress", self.calc.on_egress_learned, {})  # a new speaker: nothing learned yet
        self._bgp_identity = identity
        if "bgp" not in self.health.components:
            self.health.register("bgp", deadline=max(3 * self.cfg.resync_interval, 30))
        self._starting = speaker
        await speaker.start()
        self.bgp, self._starting = speaker, None
        self.driver.send([SpeakerChanged()])
        if self._speaker_identity() != identity:
            self._loop.call_soon(self._check_speaker)

    # --- the dataplane driver --------------------------------------------------------

    def _make_driver(self, routes, rules, nat, filt, proxy=()) -> None:
        from tortie.agent.driver import DataplaneDriver
        from tortie.bgp.export_mgr import BGPExportManager
        from tortie.policy.antispoof_mgr import AntiSpoofManager
        from tortie.policy.nftables import NftMonitor
        from tortie.routing.monitor import Monitor
        from tortie.routing.sysctl_mgr import SysctlManager
        from tortie.routing.vxlan_mgr import VxlanManager, VxlanMonitor

        loop = self._loop
        self.bgp_exports = BGPExportManager(loop, lambda: self.bgp)
        # Fed the pod routes ("workloads") like the route manager: a pod's sources are
        # allowed in the round that installs its route, before its CNI ADD is answered.
        spoof = self.antispoof = AntiSpoofManager()

        def on_status(name: str, error: str | None) -> None:
            loop.call_soon_threadsafe(self._manager_status, name, error)

        def on_applied(name: str, seconds: float) -> None:
            self.m_apply.observe(seconds, manager=name)

        self.filter = filt
        # The VXLAN devices first: the routes through them wait for them.
        self.vxlan_mgr = VxlanManager()
        self.vxlan_mgr.on_repair = routes.request_resync
        self.driver = DataplaneDriver(
            [self.vxlan_mgr, routes, rules, SysctlManager(), nat, spoof, filt, *proxy, self.bgp_exports],
            retry_delay=RETRY_DELAY, resync_interval=self.cfg.resync_interval,
            on_status=on_status, on_applied=on_applied,
            on_round=lambda ok: self._round_done(ok, routes))
        self.monitor = Monitor(route_mgr=routes, rule_mgr=rules)
        self.driver.watch(self.monitor, self.monitor.drain)
        self.vxlan_monitor = VxlanMonitor(self.vxlan_mgr)
        self.driver.watch(self.vxlan_monitor, self.vxlan_monitor.drain)
        # Someone else changed the ruleset (our own commits are recognised and ignored):
        # both nftables managers compare the kernel with what they want and repair.
        self.nft_monitor = NftMonitor()

        def nft_changed() -> None:
            if self.nft_monitor.drain():
                for mgr in (nat, spoof, filt, *proxy):
                    mgr.resync()

        self.driver.watch(self.nft_monitor, nft_changed)

    def _round_done(self, ok: bool, routes) -> None:
        """After each driver round, on the driver's thread: whether the egress routes are
        in the kernel, handed to the loop when that changed (a few routes: cheap)."""
        self.m_rounds.inc(result="ok" if ok else "error")
        status = routes.class_status(EGRESS)
        if status != self._egress_seen:
            self._egress_seen = status
            self._loop.call_soon_threadsafe(self._on_egress_routes, status)
        refused = vxlan_refused(routes.class_status(VXLAN_CLASS)) if self.vxlan.routes else None
        if refused != self._vxlan_refused:  # the overlay's routes the kernel will not take
            self._vxlan_refused = refused
            self._loop.call_soon_threadsafe(self._on_vxlan_routes, refused)

    def _on_vxlan_routes(self, refused: str | None) -> None:
        self.vxlan.refused = refused
        self.health.condition("vxlan", refused)
        self._status_dirty.set()

    def _manager_status(self, name: str, error: str | None) -> None:
        if name not in self.health.components:
            return
        if error is None:
            self.health.ok(name)
        else:
            self.m_failures.inc(manager=name)
            self.health.failed(name, error)

    async def _publish_routes(self, routes, removed) -> None:
        """The CNI server's pod routes, through the one owner (the driver's route manager)."""
        loop = self._loop
        fut = loop.create_future()

        def done(errs: dict[str, str]) -> None:
            t = time.monotonic()

            def resolve() -> None:
                self.m_lag.observe(time.monotonic() - t)
                if not fut.done():
                    fut.set_result(errs)

            loop.call_soon_threadsafe(resolve)

        self.driver.send([RouteDelta(WORKLOADS, routes, removed)], done=done)
        errs = await fut
        if "routes" in errs:
            raise errors.DataplaneError(f"pod route not installed: {errs['routes']}")

    def _on_datastore(self, up: bool, error: str | None) -> None:
        """etcd went away or came back. The dataplane stays as it is either way: only
        readiness (the node cannot start pods) and the CNI server's fast answers change."""
        self.m_datastore.set(1 if up else 0)
        self.health.condition("datastore", None if up else f"etcd unreachable: {error}")
        if up and self.cni is not None:
            self.cni.pending.kick()

    # --- health, metrics and status: read when asked, written when changed --------------

    def _refresh_health(self) -> None:
        """Heartbeats from the driver's state (it applies every manager on its resync timer
        even when nothing changes), read when health is asked for."""
        if self.driver is None or not self.in_sync:
            return
        for name, st in self.driver.states.items():
            if name in self.health.components and st.error is None and st.last_ok is not None:
                self.health.components[name].last_ok = max(self.health.components[name].last_ok, st.last_ok)

    def _collect_gauges(self) -> None:
        self.m_exports.set(len(self.calc.exports))
        for cls in ("blocks", "workloads", "bgp"):
            self.m_routes.set(self.calc.route_count(cls), **{"class": cls})
        self.m_refused.set(len(self.calc.refused))
        self.m_vxlan.values.clear()
        for d in self._vxlan_status():
            self.m_vxlan.set(1 if d["up"] else 0, device=d["device"])

    def _vxlan_status(self) -> list[dict]:
        st = self.driver.states.get("vxlan") if self.driver is not None else None
        return self.vxlan.status(st.error if st is not None else "not applied yet")

    def _start_policy_log(self) -> None:
        """`action: Log` packets arrive over NFLOG (policy.nflog); read on the loop, non-blocking."""
        from tortie.policy.nflog import NflogReader

        try:
            reader = NflogReader()
        except OSError as exc:
            log.warning("policy Log rules cannot be read: their packets are not logged", error=str(exc))
            return
        self._loop.add_reader(reader.fileno(), lambda: self.m_pol_logged.inc(reader.log_all()))

    async def _on_scrape(self) -> None:
        await self._sample_lag()
        if self.filter is not None:  # the rules' counters, read off the loop
            try:
                counts = await asyncio.to_thread(self.filter.read_counters)
                dropped = await asyncio.to_thread(self.antispoof.read_dropped)
            except errors.DataplaneError as exc:
                log.warning("policy counters not read", error=str(exc))
                return
            if dropped is not None:
                self.m_spoofed.set(dropped[0])
            for metric in (self.m_pol_packets, self.m_pol_bytes):
                metric.values.clear()  # rules gone are gone from the metrics too
            for (policy, direction, rule, action), (packets, size) in counts.items():
                labels = dict(policy=policy, direction=direction, rule=str(rule), action=action)
                self.m_pol_packets.set(packets, **labels)
                self.m_pol_bytes.set(size, **labels)

    async def _sample_lag(self) -> None:
        """Event-loop lag at a scrape: how long a callback made ready now waits for the loop.
        Work measures it where it happens (the calculation's flush, a CNI request's route); an
        idle loop has none to measure, and no timer wakes it to find that out."""
        loop = self._loop
        ready = loop.create_future()
        t0 = loop.time()
        loop.call_soon(ready.set_result, None)
        await ready
        self.m_lag.observe(loop.time() - t0)

    async def _publish_status(self) -> None:
        """The BGP status in etcd: written when the speaker says it changed (at most once per
        STATUS_PUBLISH_INTERVAL), and every STATUS_REFRESH_INTERVAL so readers know it is live."""
        key = self.cfg.etcd.prefix + keys.bgp_status_key(self.node)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), STATUS_REFRESH_INTERVAL)
            self._status_dirty.clear()
            if self.bgp is None or not self.in_sync:
                continue
            refused = dict(sorted(self.calc.refused.items())[:STATUS_REFUSED_MAX])
            body = json.dumps({**self.bgp.status_json(), "egress": self.egress_status, "refused": refused,
                               "vxlan": self._vxlan_status(),
                               "policies": self._policy_usage,
                               "bfd": {p: st["state"] for p, st in self.bfd.states().items()} if self.bfd else {}},
                              sort_keys=True).encode()
            try:
                await asyncio.to_thread(self.client.put, key, body)
            except errors.DatastoreUnavailable:
                self._status_dirty.set()  # again after the pause
            await asyncio.sleep(STATUS_PUBLISH_INTERVAL)

    def _bgp_status_changed(self, speaker) -> None:
        """The metric at once; the status document in etcd at the publisher's pace."""
        up = {p.peer: p.state == "established" for p in speaker.status()}
        for key in [k for k in self.m_sessions.values if dict(k).get("peer") not in up]:
            del self.m_sessions.values[key]
        for peer, established in up.items():
            self.m_sessions.set(1 if established else 0, peer=peer)
        self._status_dirty.set()

    def _own_addresses(self) -> frozenset[str]:
        return frozenset(a.split("/")[0] for a in (self.cfg.node_ip, self.cfg.node_ip6) if a)

    # --- lifecycle ----------------------------------------------------------------

    def register_node(self) -> None:
        """Create or update this node's Node resource, keeping labels set by others."""
        node_registration.register_node(self.store, self.node, self.cfg)

    async def run(self) -> None:
        from tortie.agent.cni_server import CNIServer
        from tortie.policy.filter_mgr import FilterManager
        from tortie.policy.nat_mgr import NatManager
        from tortie.routing.route_mgr import RouteManager
        from tortie.routing.rule_mgr import RuleManager

        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for name in MANAGERS:
            self.health.register(name, deadline=max(3 * self.cfg.resync_interval, 30))
        while True:
            try:
                await asyncio.to_thread(self.register_node)
                break
            except errors.DatastoreUnavailable as exc:
                log.warning("datastore unavailable; retrying", error=str(exc))
                await asyncio.sleep(RETRY_DELAY)
        self.vxlan.uplink_mtu = await asyncio.to_thread(vxlan_addr.uplink_mtu, self.cfg.node_ip)
        routes, rules = RouteManager(), RuleManager()
        # Adopt what a previous agent left in the kernel before anything is applied: learned
        # routes stay as they are until the peers' full tables arrive.
        await asyncio.to_thread(routes.resync)
        self.calc.adopt(r for r in routes.actual().values() if r.gateways and r.table == MAIN_TABLE)
        self._make_driver(routes, rules, NatManager(), FilterManager(**failsafe_ports(self.cfg)),
                          self._proxy_managers())
        self._start_policy_log()
        await start_http(self.health, self.metrics, self.cfg.health_host, self.cfg.health_port,
                         self.cfg.metrics_host, self.cfg.metrics_port, on_scrape=self._on_scrape)
        self.cni = CNIServer(self.cfg.cni_socket, node_name=self.node, ipam=self.ipam, store=self.store,
                             publish_routes=self._publish_routes, datastore_up=lambda: self.datastore.up,
                             datastore_failed=self.datastore.report,
                             state_dir=self.cfg.state_dir)
        self.cni.pod_mtu = lambda ips: self.vxlan.pod_mtu(self.state, ips)
        await self.cni.start()
        self._tasks = [
            asyncio.create_task(self._follow_datastore(), name="syncer"),
            asyncio.create_task(self._publish_status(), name="bgp-status"),
            asyncio.create_task(self.datastore.run(), name="datastore-monitor"),
        ]
        log.info("agent started", node=self.node, node_ip=self.cfg.node_ip, cni_socket=self.cfg.cni_socket)
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception():
                log.error("component died", task=task.get_name(), error=repr(task.exception()))
        await self.shutdown()
        if stop not in done:
            raise errors.TortieError("a component of the agent died; see the log")

    def _proxy_managers(self) -> tuple:
        """tortie's Service proxy and its health check node ports (TORTIE_PROXY_MODE=tortie),
        or none (kube-proxy serves Services)."""
        if self.cfg.proxy_mode != "tortie":
            return ()
        from tortie.policy.healthcheck import HealthCheckManager
        from tortie.policy.proxy_mgr import ProxyManager

        managers = (ProxyManager(), HealthCheckManager())
        for m in managers:
            self.health.register(m.name, deadline=max(3 * self.cfg.resync_interval, 30))
        return managers

    async def shutdown(self) -> None:
        """Stop serving; leave the kernel as it is so pods keep working (the next agent adopts it)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cni is not None:
            await self.cni.stop()
        if self.driver is not None:
            await asyncio.to_thread(self.driver.stop)
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        if getattr(self, "nft_monitor", None) is not None:
            self.nft_monitor.close()
        if getattr(self, "vxlan_monitor", None) is not None:
            self.vxlan_monitor.close()
        if self.bfd is not None:
            self.bfd.stop()
        if self.bgp is not None:
            await self.bgp.stop()
        self.client.close()
        self.cni_client.close()
        log.info("agent stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = agent_config.load()
        tlog.configure(fmt=cfg.log_format)
        asyncio.run(Agent(cfg).run())
        return 0
    except errors.TortieError as exc:
        print(f"tortie-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
