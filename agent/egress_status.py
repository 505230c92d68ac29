"""The agent's egress pools and BFD sessions, as the loop sees them: each pool up or down
and why (node status, readiness, `tortie_egress_up`), the ECMP sysctls its next hops need,
and the BFD sessions to egress next hops and BGP peers (`tortie_bfd_up`).

`EgressStatus` is part of `agent.main.Agent` (a base class of it): its methods run on the
loop and use the agent's calculation, driver, health, metrics and status document.
"""

from __future__ import annotations

from tortie import log as tlog
from tortie.agent.calc import host_prefix
from tortie.routing import bfd
from tortie.routing.messages import SysctlUpdate

log = tlog.get_logger("agent")

# per family: only what an egress pool of that family needs (a host without IPv6 has no
# net/ipv6 settings at all)
ECMP_SYSCTLS = {4: frozenset({("net/ipv4/fib_multipath_use_neigh", "1"), ("net/ipv4/fib_multipath_hash_policy", "1")}),
                6: frozenset({("net/ipv6/fib_multipath_hash_policy", "1")})}


class EgressStatus:
    """Egress pools' status and BFD sessions, for `Agent` (see the module's docstring)."""

    def _on_egress_routes(self, status: dict) -> None:
        self._egress_routes = status
        self._update_egress()

    def _update_egress(self) -> None:
        """Each egress pool up or down, and why: node status, readiness, tortie_egress_up.
        Down means refused (the unreachable rule under its table), never rerouted."""
        self._update_bfd()
        out = []
        for plan in self.calc.egress:
            if not plan.routes:
                why = plan.problem
            else:  # fromPeers with several prefixes: up while any of its routes is in
                whys = [self._egress_routes.get(r.key, "not written yet") for r in plan.routes]
                why = None if None in whys else whys[0]
            if why is not None and plan.fallback == "main":
                why += " (fallback: the main table's routes)"
            down = sorted({b[0] for b in plan.bfd} - self.calc.bfd_up)
            entry = {"pool": plan.pool, "table": plan.table, "nextHop": ",".join(plan.next_hops),
                     "up": why is None, "reason": why, "bfdDown": down}
            if plan.from_peers is not None:  # the next hops are the ones learned just now
                entry.update(fromPeers=plan.from_peers, notAnnounced=list(plan.missing))
            if plan.address:
                entry.update(address=plan.address, advertised=host_prefix(plan.address) in self.calc.exports)
            out.append(entry)
        if out == self.egress_status:
            return
        for o in out:
            if o not in self.egress_status:
                (log.info if o["up"] else log.error)(
                    "egress " + ("up" if o["up"] else "down"),
                    pool=o["pool"], table=o["table"], next_hop=o["nextHop"], reason=o["reason"])
        self.egress_status = out
        self.m_egress.values.clear()
        for o in out:
            self.m_egress.set(1 if o["up"] else 0, pool=o["pool"])
        # ECMP over several next hops: the kernel skips one whose neighbour failed, and
        # spreads flows by their ports (not only by addresses: one pod, one server).
        families = {6 if ":" in p.cidr else 4 for p in self.calc.egress if len(p.next_hops) > 1}
        self.driver.send([SysctlUpdate("egress", frozenset().union(*(ECMP_SYSCTLS[f] for f in families)))])
        down = [f"pool {o['pool']}: {o['reason']}" for o in out if not o["up"]]
        self.health.condition("egress", "; ".join(down) or None)
        self._status_dirty.set()

    def _update_bfd(self) -> None:
        """BFD sessions to the egress next hops and BGP peers that ask for them (started on
        first use: it listens on UDP 3784)."""
        asks = [(h, tx, rx, mult) for plan in self.calc.egress for h, tx, rx, mult in plan.bfd]
        asks += [(a, *timers) for a, timers in self.calc.bfd_peers.items()]
        want = bfd.fastest((a, bfd.Timers(tx / 1000, rx / 1000, mult)) for a, tx, rx, mult in asks)
        if want == self._bfd_want:
            return
        self._bfd_want = want
        if want and self.bfd is None:
            loop = self._loop

            def changed(peer: str, up: bool) -> None:  # on BFD's thread
                loop.call_soon_threadsafe(self._on_bfd, peer, up)

            self.bfd = bfd.BFD(on_change=changed)
            self.bfd.start()
        if self.bfd is not None:
            self.bfd.set_sessions(want)
            for key in [k for k in self.m_bfd.values if dict(k).get("peer") not in want]:
                del self.m_bfd.values[key]

    def _on_bfd(self, peer: str, up: bool) -> None:
        self.m_bfd.set(1 if up else 0, peer=peer)
        self._status_dirty.set()
        self._calc("bfd", self.calc.on_bfd, peer, up)
        if not up and peer in self.calc.bfd_peers and self.bgp is not None:
            # the calculation already leaves the peer's routes out; closing the session also
            # tells the peer, and a session that comes back re-sends its table from scratch
            self.bgp.teardown(peer, "BFD Down")
