"""The lab's top-of-rack routers (`--tor bird|frr`) driven: started with the lab's
configuration (`lab.routers` writes it), powered off and on, their TCP MD5 passwords, BFD
and announced prefixes changed on the fly (kept across restarts), their sessions read.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

from tortie.errors import AlreadyExists, DataplaneError, NotFound, ValidationError
from tortie.lab import nsutil, routers, state, topology, underlay
from tortie.lab.state import LabState
from tortie.lab.topology import Plan, TorPlan


class LabRouters:
    """The router half of `tortie.lab.cluster.Lab` (a mixin: it uses the lab's `state`,
    `plan`, `node`, `_record` and `ctl`)."""

    def _router(self, tor: TorPlan, st: LabState | None = None) -> routers.RouterRun:
        lab_dir = state.lab_dir(self.name)
        announce = tuple((st or self.state()).router_announce.get(tor.name, ()))
        return routers.RouterRun(tor, os.path.join(lab_dir, tor.name), os.path.join(lab_dir, "logs"), announce)

    def _start_router(self, st: LabState, plan: Plan, tor: TorPlan, deadline: float) -> None:
        run = self._router(tor, st)
        os.makedirs(run.rdir, exist_ok=True)
        self._record(lambda s: s.data_dirs.extend(run.leftovers()))
        cmd = run.prepare(plan, st.bgp_passwords, st.router_bfd)
        proc = state.spawn(tor.name, cmd, netns=tor.netns,
                           log_path=os.path.join(st.dir, "logs", f"{tor.name}.log"))
        self._record(lambda s: s.procs.append(proc))
        while not run.ready():
            if state.exited(proc) is not None:
                raise DataplaneError(f"{tor.kind} in {tor.netns} exited; log: {proc.log}\n" + state.log_tail(proc.log))
            if time.monotonic() > deadline:
                raise DataplaneError(f"{tor.kind} in {tor.netns} not up in time; log: {proc.log}")
            time.sleep(0.05)

    def _wait_sessions(self, seconds: float) -> str:
        """Wait a while for every router session to be Established; a line saying how they are."""
        deadline = time.monotonic() + seconds
        while True:
            sessions = self.bgp_sessions()
            states = [st for per in sessions.values() for st in per.values()]
            if (states and all(st == "Established" for st in states)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        up = sum(st == "Established" for st in states)
        detail = "; ".join(f"{t}: " + ", ".join(f"{n} {st}" for n, st in sorted(per.items()))
                           for t, per in sessions.items())
        return f"BGP sessions established {up}/{len(states)} ({detail})"

    def router_password(self, node: str, password: str | None) -> None:
        """Set (None: remove) the TCP MD5 password every router uses for `node`'s session.

        The router is reconfigured at once, which restarts that session; the node's side is
        the password of its BGPPeer, set with `ctl apply` like any other resource."""
        n = self.node(node)
        if password is not None:
            routers.check_password(password)

        def put(s: LabState) -> None:
            if password is None:
                s.bgp_passwords.pop(n.name, None)
            else:
                s.bgp_passwords[n.name] = password

        st = self._record(put)
        plan = topology.plan_of(st)
        if not plan.tors:
            raise ValidationError(f"lab {self.name} has no routers (--tor none)", field="tor")
        for tor in plan.tors:
            self._router(tor, st).set_password(plan, st.bgp_passwords, n.name, st.router_bfd)

    def router_bfd(self, on: bool) -> None:
        """BFD (100 ms x 3) on every router with every node's address on its links, for
        egress next hops that ask for it (IPPool nextHops[].bfd); kept across router restarts."""
        st = self._record(lambda s: setattr(s, "router_bfd", on))
        plan = topology.plan_of(st)
        if not plan.tors:
            raise ValidationError(f"lab {self.name} has no routers (--tor none)", field="tor")
        # On: the routers first, then the lab's BGPPeers ask for it. Off: the other way round,
        # and the routers only once the nodes have ended their sessions (AdminDown), so that
        # neither side takes BFD going away for a dead path.
        if on:
            for tor in plan.tors:
                self._router(tor, st).set_bfd(plan, st.bgp_passwords, on)
        names = {f"{tor.name}-{n.name}{sfx}" for tor in plan.tors for n, _ in plan.links_of(tor.name)
                 for sfx in ("", "-v6")}  # each family's BGPPeer (-v6: labs with IPv6)
        peers = [p for p in json.loads(self.ctl("get", "bgppeers", "-o", "json").stdout)["items"]
                 if p["metadata"]["name"] in names]
        for p in peers:
            p["metadata"] = {k: v for k, v in p["metadata"].items() if k in ("name", "labels")}
            p["spec"].pop("bfd", None)
            if on:
                p["spec"]["bfd"] = routers.LAB_BFD
        if peers:
            self.ctl("apply", "-f", "-", input="\n---\n".join(json.dumps(p) for p in peers))
        if not on:
            # (a node's egress next hops may keep a session Up: then this just waits 3 s)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(
                    "Up" in self._router(tor, st).bfd_sessions(plan).values() for tor in plan.tors):
                time.sleep(0.1)
            for tor in plan.tors:
                self._router(tor, st).set_bfd(plan, st.bgp_passwords, on)

    def router_announce(self, name: str, prefix: str, on: bool = True) -> None:
        """The router originates `prefix` to every node it peers with (on), or withdraws it;
        kept across router restarts. For IPPool egress.fromPeers: `0.0.0.0/0` is the default
        route an uplink router gives its nodes."""
        _, _, tor = self._tor(name)
        if tor.kind != "bird":
            raise ValidationError("announcing from the lab's FRR routers is not supported yet (use --tor bird)",
                                  field="router")
        try:
            net = ipaddress.ip_network(prefix)
        except ValueError:
            raise ValidationError(f"{prefix!r} is not a CIDR", field="prefix") from None
        if net.version != 4:
            raise ValidationError(f"{prefix}: the routers announce IPv4 prefixes only (IPv6 is not supported yet)",
                                  field="prefix")

        def put(s: LabState) -> None:
            have = [p for p in s.router_announce.get(tor.name, []) if p != str(net)]
            s.router_announce[tor.name] = [*have, str(net)] if on else have

        st = self._record(put)
        if st.proc(tor.name) is not None:  # a stopped router takes it when it starts
            self._router(tor, st).reconfigure(topology.plan_of(st), st.bgp_passwords, st.router_bfd)

    def bfd_sessions(self, router: str) -> dict[str, str]:
        """A router's BFD sessions: node address -> state (Up, Down, Init)."""
        _, _, tor = self._tor(router)
        return self._router(tor).bfd_sessions(self.plan())

    def birdc(self, router: str, *args: str) -> str:
        """A BIRD router's answer to `birdc ARGS` (e.g. "show", "route", "all")."""
        _, _, tor = self._tor(router)
        if tor.kind != "bird":
            raise ValidationError(f"router {router} is {tor.kind}, not bird", field="router")
        return routers.birdc(tor.netns, self._router(tor).control, *args)

    def bgp_sessions(self) -> dict[str, dict[str, str]]:
        """Per router: its BGP sessions' states by node name (Established, Active, ...)."""
        plan = self.plan()
        return {t.name: self._router(t).sessions(plan) for t in plan.tors}

    def _tor(self, name: str) -> tuple[LabState, Plan, TorPlan]:
        st = self.state()
        plan = topology.plan_of(st)
        tor = next((t for t in plan.tors if t.name == name), None)
        if tor is None:
            raise NotFound(f"lab {self.name} has no router {name!r} (has: {', '.join(t.name for t in plan.tors) or 'none'})")
        return st, plan, tor

    def _router_links(self, tor: TorPlan, up: bool) -> None:
        out = nsutil.run(["ip", "-n", tor.netns, "-o", "link", "show"], timeout=10).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        nsutil.ip_batch(tor.netns, [f"link set {n} {'up' if up else 'down'}" for n in names if n != "lo"])

    def router_stop(self, name: str) -> None:
        """A router powered off: its daemon killed, its links down (it forwards nothing);
        the nodes' own links stay up, as with a real switch port whose far end died."""
        _, _, tor = self._tor(name)
        proc = self.state().proc(tor.name)
        if proc is None:
            raise NotFound(f"router {name} is not running")
        # Links first: a daemon killed while they are up has its kernel close the sessions
        # (FIN/RST), which a router losing power never sends; its peers must find out by
        # themselves (hold time, BFD, neighbour state).
        self._router_links(tor, up=False)
        state.stop(proc, first=signal.SIGKILL)
        self._record(lambda s: s.procs.remove(proc) if proc in s.procs else None)

    def router_start(self, name: str, timeout: float = 30.0) -> None:
        """The router back: links up, its daemon started with the lab's configuration."""
        st, plan, tor = self._tor(name)
        if st.proc(tor.name) is not None:
            raise AlreadyExists(f"router {name} is running; stop it first")
        self._router_links(tor, up=True)
        nsutil.ip_batch(tor.netns, underlay.cross_routes(plan, tor))  # its links going down took them
        self._start_router(st, plan, tor, time.monotonic() + timeout)
