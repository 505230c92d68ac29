"""The lab's etcd: one member in <lab>-ctl, or three in namespaces of their own (`up(...,
etcd_members=3)`), optionally over TLS with a lab CA (`lab.pki`). Starting the members,
what every component needs to reach them (`_etcd_env`), and stopping, starting, pausing
them and asking who leads (the failover tests).
"""

from __future__ import annotations

import os
import signal

from tortie.errors import AlreadyExists, DataplaneError, NotFound, ValidationError
from tortie.lab import family, pki, state, topology
from tortie.lab.etcd_server import EtcdServer
from tortie.lab.state import LabState, Proc
from tortie.lab.topology import Plan


class LabEtcd:
    """The etcd half of `tortie.lab.cluster.Lab` (a mixin: it uses the lab's `state`,
    `plan`, `_record` and `_dsops`)."""

    def _pki_dir(self) -> str:
        return os.path.join(state.lab_dir(self.name), "pki")

    def _etcd_dir(self, plan: Plan, member: topology.EtcdMember) -> str:
        name = "etcd" if len(plan.members) == 1 else f"etcd-{member.name}"
        return os.path.join(state.lab_dir(self.name), name)

    @staticmethod
    def _etcd_role(plan: Plan, member: topology.EtcdMember) -> str:
        return "etcd" if len(plan.members) == 1 else f"etcd:{member.name}"

    def _etcd_server(self, plan: Plan, member: topology.EtcdMember) -> EtcdServer:
        cluster = None
        if len(plan.members) > 1:
            scheme = "https" if plan.etcd_tls else "http"
            cluster = ",".join(f"{m.name}={scheme}://{m.ip}:{topology.ETCD_PORT + 1}" for m in plan.members)
        data = self._etcd_dir(plan, member)
        host = family.bracket(family.of(member.ip, plan.versions[0]))  # IPv6-only: over IPv6
        return EtcdServer(host=host, client_port=topology.ETCD_PORT, peer_port=topology.ETCD_PORT + 1,
                          data_dir=data, netns=member.netns, name=member.name, initial_cluster=cluster,
                          pki=pki.Pki(self._pki_dir()) if plan.etcd_tls else None, log_path=data + ".log",
                          die_with_owner=False)

    def _etcd_env(self, st: LabState, plan: Plan) -> dict[str, str]:
        """What every component needs to reach the lab's etcd: all members, and the
        client certificate with TLS (set empty otherwise, so a caller's own is not used)."""
        env = {"TORTIE_ETCD_ENDPOINTS": ",".join(plan.etcd_endpoints), "TORTIE_ETCD_PREFIX": st.etcd_prefix,
               "TORTIE_ETCD_CA": "", "TORTIE_ETCD_CERT": "", "TORTIE_ETCD_KEY": ""}
        if plan.etcd_tls:
            p = pki.Pki(self._pki_dir())
            env.update(TORTIE_ETCD_CA=p.ca, TORTIE_ETCD_CERT=p.client[0], TORTIE_ETCD_KEY=p.client[1])
        return env

    def _start_etcd(self, st: LabState, plan: Plan, timeout: float, only: str | None = None) -> None:
        """Start the members (all, or `only`) together, then wait until each is healthy: a
        member of a cluster is healthy only once a quorum runs."""
        servers = [self._etcd_server(plan, m) for m in plan.members if only in (None, m.name)]
        for etcd, member in zip(servers, [m for m in plan.members if only in (None, m.name)], strict=True):
            etcd.launch()
            assert etcd.proc is not None
            state._children[etcd.proc.pid] = etcd.proc
            proc = Proc(role=self._etcd_role(plan, member), pid=etcd.proc.pid, start=state.start_time(etcd.proc.pid),
                        netns=member.netns, log=etcd.log_path or "", cmd=("etcd", member.name))
            self._record(lambda s, proc=proc: s.procs.append(proc))
        try:
            for etcd in servers:
                etcd.wait_healthy(timeout)
        except RuntimeError as exc:
            raise DataplaneError(str(exc)) from exc

    def _member(self, member: str | None) -> topology.EtcdMember:
        plan = self.plan()
        names = [m.name for m in plan.members]
        if member in (None, "etcd") and len(names) == 1:
            return plan.members[0]
        if member == "leader":
            name = self.etcd_leader()
            if name is None:
                raise NotFound(f"the etcd cluster of lab {self.name} has no leader now")
            member = name
        for m in plan.members:
            if m.name == member:
                return m
        if member is None:
            raise ValidationError(f"lab {self.name} runs {len(names)} etcd members: name one "
                                  f"({', '.join(names)}, or leader)", field="member")
        raise NotFound(f"lab {self.name} has no etcd member {member!r} (has: {', '.join(names)}, or leader)")

    def _etcd_proc(self, member: str | None = None, *, running: bool = True) -> Proc | None:
        m = self._member(member)
        proc = self.state().proc(self._etcd_role(self.plan(), m))
        if running and (proc is None or not state.alive(proc)):
            raise NotFound(f"etcd member {m.name} of lab {self.name} is not running")
        return proc

    def etcd_stop(self, member: str | None = None, sig: signal.Signals = signal.SIGTERM) -> str:
        """Stop one etcd member (SIGKILL: as a crash); its data stays for etcd_start. Its name."""
        m = self._member(member)
        proc = self._etcd_proc(m.name)
        os.killpg(proc.pid, signal.SIGCONT)  # a paused member takes the signal too
        state.stop(proc, first=sig)
        self._record(lambda s: s.procs.remove(proc) if proc in s.procs else None)
        return m.name

    def etcd_start(self, member: str | None = None, timeout: float = 30.0) -> None:
        """Start a stopped etcd member again on its data; returns once it is healthy (a
        member of a cluster: once it has a leader again, so also once a quorum runs)."""
        m = self._member(member)
        old = self._etcd_proc(m.name, running=False)
        if old is not None and state.alive(old):
            raise AlreadyExists(f"etcd member {m.name} of lab {self.name} is running; stop it first")
        self._record(lambda s: s.procs.remove(old) if old in s.procs else None)  # one that died
        st = self.state()
        self._start_etcd(st, topology.plan_of(st), timeout, only=m.name)

    def _running_members(self) -> list[Proc]:
        plan = self.plan()
        st = self.state()
        procs = [p for m in plan.members if (p := st.proc(self._etcd_role(plan, m))) and state.alive(p)]
        if not procs:
            raise NotFound(f"no etcd member of lab {self.name} is running")
        return procs

    def etcd_pause(self) -> None:
        """Freeze every running etcd member (SIGSTOP): connections stay open, nothing answers."""
        for proc in self._running_members():
            os.killpg(proc.pid, signal.SIGSTOP)

    def etcd_resume(self) -> None:
        for proc in self._running_members():
            os.killpg(proc.pid, signal.SIGCONT)

    def etcd_members(self) -> list[dict]:
        """Each member: name, namespace, address, endpoint, running, paused, leader (a bool;
        each running member is asked whom it follows)."""
        st = self.state()
        plan = topology.plan_of(st)
        out = []
        for m, endpoint in zip(plan.members, plan.etcd_endpoints, strict=True):
            proc = st.proc(self._etcd_role(plan, m))
            alive = proc is not None and state.alive(proc)
            out.append({"name": m.name, "namespace": m.netns, "address": m.address, "endpoint": endpoint,
                        "pid": proc.pid if alive else None, "running": alive,
                        "paused": alive and state.proc_state(proc.pid) == "T", "leader": False})
        if len(out) == 1:  # a lone running member leads itself: no need to ask
            out[0]["leader"] = out[0]["running"] and not out[0]["paused"]
            return out
        if not any(m["running"] and not m["paused"] for m in out):
            return out
        said = {s["endpoint"]: s for s in self._dsops("members")}
        ids = {s["id"]: s["endpoint"] for s in said.values() if s.get("id")}
        leaders = {ids.get(s["leader"]) for s in said.values() if s.get("leader") and s["leader"] != "0"}
        for m in out:
            m["leader"] = m["endpoint"] in leaders and len(leaders) == 1
        return out

    def etcd_leader(self) -> str | None:
        return next((m["name"] for m in self.etcd_members() if m["leader"]), None)
