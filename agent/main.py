"""tortie-agent: the per-node daemon.

One asyncio loop. Inputs are events -- the datastore syncer, CNI requests, routes learned
over BGP, netlink notifications, timers -- and each only marks the agent dirty. The loop
then recomputes desired state (agent.calc, pure) and lets each manager apply the
difference. Order of a round, and why:
  1. routes: blackholes, workload and learned routes first, so that anything we announce
     next is already forwardable here;
  2. NAT, then the NetworkPolicy filter table (each one atomic nftables transaction);
  3. BGP peers, then exports: a new block is announced only once its blackhole exists.
Nothing is applied before the first datastore snapshot: a restarted agent would otherwise
see empty desired state and delete the routes of live pods it is about to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import sys
import time

from tortie import errors
from tortie import log as tlog
from tortie.agent import config as agent_config
from tortie.agent.calc import ClusterState, desired, network_policy, node_addresses
from tortie.datastore.etcd import EtcdClient
from tortie.health import Health, start_http
from tortie.metrics import Registry
from tortie.routing.model import MAIN_TABLE
from tortie.routing.monitor import Monitor

log = tlog.get_logger("agent")

STATUS_PUBLISH_INTERVAL = 2.0
RETRY_DELAY = 1.0


class Agent:
    def __init__(self, cfg: agent_config.AgentConfig) -> None:
        from tortie.agent.cni_server import CNIServer
        from tortie.datastore.ipam import IPAM
        from tortie.datastore.store import ResourceStore
        from tortie.policy.filter_mgr import FilterManager
        from tortie.policy.nat_mgr import NatManager
        from tortie.routing.route_mgr import RouteManager
        from tortie.routing.rule_mgr import RuleManager

        self.cfg = cfg
        self.node = cfg.nodename
        self.client = EtcdClient(cfg.etcd)
        self.store = ResourceStore(self.client)
        self.ipam = IPAM(self.client)
        self.state = ClusterState(prefix=cfg.etcd.prefix)
        self.routes = RouteManager()
        self.rules = RuleManager()
        self.nat = NatManager()
        self.filter = FilterManager()
        self.learned: dict[str, tuple[str, ...]] = {}
        self.in_sync = False
        self.dirty = asyncio.Event()
        self.stopping = asyncio.Event()
        self.health = Health()
        self.metrics = Registry()
        self.m_rounds = self.metrics.counter("tortie_apply_rounds_total", "Reconcile rounds, by result")
        self.m_routes = self.metrics.gauge("tortie_desired_routes", "Desired routes, by class")
        self.m_exports = self.metrics.gauge("tortie_bgp_exports", "Prefixes this node announces")
        self.m_apply_seconds = self.metrics.gauge("tortie_last_apply_seconds", "Duration of the last round")
        self.m_events = self.metrics.counter("tortie_datastore_events_total", "Datastore events, by type")
        self.cni = CNIServer(
            cfg.cni_socket, node_name=self.node, ipam=self.ipam, store=self.store,
            route_manager=self.routes, on_change=self.mark_dirty,
        )
        self.bgp = None  # made after the first snapshot: its AS and cluster id come from there
        self._bgp_identity: tuple | None = None
        # Routes learned over BGP as the kernel had them at start: kept until the speaker
        # has the peers' full tables, so a restarted agent never withdraws live paths.
        self._adopted_bgp: frozenset = frozenset()
        self._tasks: list[asyncio.Task] = []
        self._last_status: bytes | None = None

    # --- inputs -------------------------------------------------------------------

    def mark_dirty(self, *_args) -> None:
        self.dirty.set()

    def _on_learned(self, rib: dict[str, tuple[str, ...]]) -> None:
        self.learned = dict(rib)
        self._adopted_bgp = frozenset()
        self.mark_dirty()

    def _on_learned_changes(self, changed: dict[str, tuple[str, ...]], removed: frozenset[str]) -> None:
        # after the first full table (_on_learned) the speaker hands over only what changed
        self.learned.update(changed)
        for prefix in removed:
            self.learned.pop(prefix, None)
        self.mark_dirty()

    async def _ensure_speaker(self) -> None:
        """Start (or, when the node's AS or reflector cluster changed, restart) ExaBGP."""
        from tortie.bgp.speaker import BGPSpeaker

        if not (self.cfg.bgp_enabled and self.cfg.node_address):
            return
        me = self.state.nodes.get(self.node)
        conf = self.state.bgp_config(self.node)
        local_as = (me.as_number if me else None) or self.cfg.as_number or conf.as_number
        cluster_id = me.route_reflector_cluster_id if me else None
        identity = (local_as, cluster_id, conf.listen_port or 179)
        if self.bgp is not None and identity == self._bgp_identity:
            return
        if self.bgp is not None:
            log.info("BGP identity changed; restarting the speaker", was=self._bgp_identity, now=identity)
            await self.bgp.stop()
        self.bgp = BGPSpeaker(
            node_name=self.node, router_id=self.cfg.node_address, local_as=local_as,
            local_address=self.cfg.node_address, state_dir=self.cfg.state_dir,
            listen_port=identity[2], on_routes=self._on_learned, cluster_id=cluster_id,
            on_route_changes=self._on_learned_changes,
            graceful_restart=self.cfg.bgp_graceful_restart,
            local_address6=self.cfg.node_ip6.split("/")[0] if self.cfg.node_ip6 else None,
        )
        self._bgp_identity = identity
        if "bgp" not in self.health.components:
            self.health.register("bgp", deadline=max(3 * self.cfg.resync_interval, 30))
        await self.bgp.start()

    async def _follow_datastore(self) -> None:
        from tortie.datastore.watch import Snapshot, Syncer

        # Only what the calculation reads: not the IPAM blocks' churn on every allocation,
        # nor the BGP status every node rewrites.
        prefix = self.cfg.etcd.prefix
        syncer = Syncer(self.client, [prefix + "resources/", prefix + "ipam/affinity/"])
        try:
            async for event in syncer.events():
                if isinstance(event, Snapshot):
                    self.state.clear()
                    for key, value in event.items.items():
                        self.state.apply(key, value)
                    self.m_events.inc(type="snapshot")
                    log.info("datastore snapshot", revision=event.revision, keys=len(event.items))
                    self.in_sync = True
                    self.mark_dirty()
                elif self.state.apply(event.key, event.value):
                    self.m_events.inc(type="update")
                    self.mark_dirty()
        finally:
            syncer.stop()

    async def _timers(self) -> None:
        """Slow full resync: re-read the kernel so drift the monitor missed is repaired."""
        while True:
            await asyncio.sleep(self.cfg.resync_interval)
            # The managers re-read the kernel in their next apply, on this loop.
            self.routes.request_resync()
            self.rules.request_resync()
            self.nat.check()
            self.filter.check()
            self.mark_dirty()

    async def _publish_status(self) -> None:
        key = f"{self.cfg.etcd.prefix}status/bgp/{self.node}"
        while True:
            await asyncio.sleep(STATUS_PUBLISH_INTERVAL)
            if self.bgp is None or not self.in_sync:
                continue
            body = json.dumps(self.bgp.status_json(), sort_keys=True).encode()
            if body != self._last_status:
                with contextlib.suppress(errors.DatastoreUnavailable):
                    await asyncio.to_thread(self.client.put, key, body)
                    self._last_status = body

    # --- the round ----------------------------------------------------------------

    def _own_addresses(self) -> frozenset[str]:
        return frozenset(a.split("/")[0] for a in (self.cfg.node_ip, self.cfg.node_ip6) if a)

    async def apply_round(self) -> None:
        t0 = time.perf_counter()
        await self._ensure_speaker()
        want = desired(self.state, self.node, self.learned, self._own_addresses())
        self.routes.set_routes("blocks", want.block_routes)
        self.routes.set_routes("workloads", want.workload_routes)
        self.routes.set_routes("bgp", want.bgp_routes | self._adopted_bgp)
        self.routes.set_routes("egress", want.egress_routes)
        self.routes.apply()
        # Rules after routes: a rule must never point at an egress table not yet filled.
        self.rules.set_rules("egress", want.rules)
        self.rules.apply()
        pools = self.state.pools.values()
        self.nat.on_update(
            nat_pools=[p.cidr for p in pools if p.nat_outgoing],
            all_pools=[p.cidr for p in pools],
            node_addresses=node_addresses(self.state),
        )
        self.nat.apply()
        # NetworkPolicy after routes: a new pod's filter is written in the round that
        # routes it (its veth exists already; CNI made it). A rejected ruleset is reported
        # and retried without holding up the BGP half of the round.
        self.filter.on_update(network_policy(self.state, self.node))
        try:
            self.filter.apply()
            self.health.ok("netpol")
        except errors.DataplaneError as exc:
            self.health.failed("netpol", str(exc))
            log.error("network policy not applied; retrying", error=str(exc))
            asyncio.get_running_loop().call_later(RETRY_DELAY, self.mark_dirty)
        for cls, n in (("blocks", len(want.block_routes)), ("workloads", len(want.workload_routes)),
                       ("bgp", len(want.bgp_routes))):
            self.m_routes.set(n, **{"class": cls})
        self.health.ok("routes")
        if self.bgp is not None:
            from tortie.bgp.peers import compute_peers

            me = self.state.nodes.get(self.node)
            if me is not None:
                self.bgp.set_peers(compute_peers(
                    me, list(self.state.nodes.values()), list(self.state.bgp_peers.values()),
                    self.state.bgp_config(self.node)))
            communities = getattr(self.state.bgp_config(self.node), "communities", ())
            self.bgp.set_import_pools(p.cidr for p in self.state.pools.values())
            self.bgp.set_exports(want.exports, communities)
            await self.bgp.apply()
            self.m_exports.set(len(want.exports))
            self.health.ok("bgp")
        self.m_apply_seconds.set(time.perf_counter() - t0)

    async def _reconcile_loop(self) -> None:
        while True:
            await self.dirty.wait()
            await asyncio.sleep(0.005)  # coalesce a burst of events into one round
            self.dirty.clear()
            if not self.in_sync:
                continue
            try:
                await self.apply_round()
                self.m_rounds.inc(result="ok")
                if not self.health.ready:
                    log.info("first sync applied; ready")
                self.health.ready = True
            except Exception as exc:  # an error only marks us dirty again; a timer retries
                self.m_rounds.inc(result="error")
                self.health.failed("routes", str(exc))
                log.exception("apply failed; retrying", error=str(exc))
                asyncio.get_running_loop().call_later(RETRY_DELAY, self.mark_dirty)

    # --- lifecycle ----------------------------------------------------------------

    def register_node(self) -> None:
        """Create or update this node's Node resource, keeping labels set by others."""
        try:
            node = self.store.get("node", self.node)
        except errors.NotFound:
            node = {"apiVersion": "tortie.io/v1", "kind": "Node", "metadata": {"name": self.node}, "spec": {}}
        bgp = node.setdefault("spec", {}).setdefault("bgp", {})
        if self.cfg.node_ip:
            bgp["ipv4Address"] = str(ipaddress.ip_interface(self.cfg.node_ip))
        if self.cfg.node_ip6:
            bgp["ipv6Address"] = str(ipaddress.ip_interface(self.cfg.node_ip6))
        if self.cfg.as_number:
            bgp["asNumber"] = self.cfg.as_number
        if not bgp:
            del node["spec"]["bgp"]
        # All of this node's own addresses (every uplink), so other nodes' natOutgoing
        # never translates traffic to any of them; entries of other types are kept.
        mine = local_addresses()
        others = [a for a in node["spec"].get("addresses", []) if a.get("type") != NODE_ADDRESS_TYPE]
        if mine or others:
            node["spec"]["addresses"] = others + [{"address": a, "type": NODE_ADDRESS_TYPE} for a in mine]
        self.store.apply(node)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.health.register("routes", deadline=max(3 * self.cfg.resync_interval, 30))
        self.health.register("netpol", deadline=max(3 * self.cfg.resync_interval, 30))
        while True:
            try:
                await asyncio.to_thread(self.register_node)
                break
            except errors.DatastoreUnavailable as exc:
                log.warning("datastore unavailable; retrying", error=str(exc))
                await asyncio.sleep(RETRY_DELAY)
        # Adopt what a previous agent left in the kernel before anything is applied.
        await asyncio.to_thread(self.routes.resync)
        await asyncio.to_thread(self.rules.resync)
        self._adopted_bgp = frozenset(
            r for r in self.routes.actual().values() if r.gateways and r.table == MAIN_TABLE)
        await start_http(self.health, self.metrics, self.cfg.health_host, self.cfg.health_port,
                         self.cfg.metrics_port)
        await self.cni.start()
        self._tasks = [
            asyncio.create_task(self._follow_datastore(), name="syncer"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
            asyncio.create_task(self._timers(), name="resync-timer"),
            asyncio.create_task(self._publish_status(), name="bgp-status"),
        ]
        self._watch_nftables()
        self.monitor = Monitor(route_mgr=self.routes, rule_mgr=self.rules)
        self.monitor.attach(loop, self.mark_dirty)
        log.info("agent started", node=self.node, node_ip=self.cfg.node_ip, cni_socket=self.cfg.cni_socket)
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception():
                log.error("component died", task=task.get_name(), error=repr(task.exception()))
        await self.shutdown()
        if stop not in done:
            raise errors.TortieError("a component of the agent died; see the log")

    def _watch_nftables(self) -> None:
        """Any nftables change in this namespace: compare our table with what we wrote."""
        from tortie.policy.nftables import open_monitor_socket

        sock = open_monitor_socket()
        self._nft_sock = sock

        def readable() -> None:
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
            nat_drift = self.nat.check()
            if self.filter.check() or nat_drift:
                self.mark_dirty()

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    async def shutdown(self) -> None:
        """Stop serving; leave the kernel as it is so pods keep working (the next agent adopts it)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        await self.cni.stop()
        if self.bgp is not None:
            await self.bgp.stop()
        self.client.close()
        log.info("agent stopped")


NODE_ADDRESS_TYPE = "CalicoNodeIP"  # the Node.spec.addresses entries the agent owns


def local_addresses() -> list[str]:
    """The global-scope addresses on this namespace's interfaces (pod veths carry none)."""
    import subprocess

    proc = subprocess.run(["ip", "-j", "address", "show", "scope", "global"], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("cannot list the node's addresses", error=proc.stderr.strip())
        return []
    found = {str(ipaddress.ip_address(a["local"])) for link in json.loads(proc.stdout or "[]")
             for a in link.get("addr_info", []) if a.get("local")}
    return sorted(found, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


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
