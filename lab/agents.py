"""The lab's per-node daemons: `tortie-agent` (or the CNI server standing in for it)
started in each node's namespace with the TORTIE_* environment, waited on until ready,
stopped and started again, and asked over HTTP (health, metrics).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Sequence

from tortie.errors import AlreadyExists, DataplaneError, NotFound, ValidationError
from tortie.lab import family, nsutil, routers, state, topology
from tortie.lab.state import LabState
from tortie.lab.topology import NodePlan, Plan

HEALTH_PORT = 9099
METRICS_PORT = 9091


class LabAgents:
    """The agent half of `tortie.lab.cluster.Lab` (a mixin: it uses the lab's `state`,
    `node`, `_record`, `_env` and `_etcd_env`)."""

    def node_dir(self, node: str) -> str:
        return os.path.join(state.lab_dir(self.name), node)

    def cni_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "cni.sock")

    def _start_agent(self, st: LabState, plan: Plan, node: NodePlan) -> None:
        ndir = self.node_dir(node.name)
        os.makedirs(ndir, exist_ok=True)
        sock = self.cni_socket(node.name)
        env = {
            "TORTIE_NODENAME": node.name,
            **self._etcd_env(st, plan),
            **family.node_env(node.address, plan.ip_family),
            "TORTIE_AS_NUMBER": str(node.as_number),
            "TORTIE_CNI_SOCKET": sock,
            "TORTIE_STATE_DIR": ndir,
            "TORTIE_HEALTH_PORT": str(HEALTH_PORT),
            "TORTIE_METRICS_PORT": str(METRICS_PORT),
            "TORTIE_LOG_FORMAT": "json",
            "TORTIE_BGP_GRACEFUL_RESTART": str(routers.GRACEFUL_RESTART),
            "TORTIE_PROXY_MODE": "tortie",  # the lab has no kube-proxy: tortie serves Services
            **st.agent_env,
        }
        if st.agent == "agent":
            cmd = [state.python(), "-m", "tortie.agent.main"]
        else:
            cmd = [state.python(), "-m", "tortie.agent.cni_server", "--socket", sock, "--node", node.name]
        proc = state.spawn(f"agent:{node.name}", cmd, netns=node.netns, env=self._env(env),
                           log_path=os.path.join(st.dir, "logs", f"agent-{node.name}.log"))
        self._record(lambda s: (s.procs.append(proc),
                                None if ndir in s.data_dirs else s.data_dirs.append(ndir)))

    def _wait_ready(self, plan: Plan, agent: str, deadline: float, only: Sequence[str] | None = None) -> None:
        if agent == "none":
            return
        pending = {n.name: n for n in plan.nodes if only is None or n.name in only}
        while pending:
            st = self.state()
            for name, node in list(pending.items()):
                proc = st.proc(f"agent:{name}")
                if proc is None:
                    raise DataplaneError(f"no agent recorded for {name}")
                code = state.exited(proc)
                if code is not None:
                    raise DataplaneError(f"{agent} on {name} exited ({code}); log: {proc.log}\n"
                                         + state.log_tail(proc.log))
                if self._agent_ready(node, agent):
                    del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                logs = "; ".join(f"{n}: {st.proc('agent:' + n).log}" for n in pending)
                raise DataplaneError(f"{agent} not ready on {', '.join(sorted(pending))} in time ({logs})")
            time.sleep(0.1)

    def _agent_ready(self, node: NodePlan, agent: str) -> bool:
        if agent == "cni-server":
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    s.connect(self.cni_socket(node.name))
                return True
            except OSError:
                return False
        return self.http_get(node.name, HEALTH_PORT, "/readiness")[0] == 200

    # --- a node's agent: kill it, start it again (it must adopt what it left in the kernel) ---

    def agent_stop(self, node: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the node's agent (its whole process group) with sig; SIGKILL after 5 s."""
        n = self.node(node)
        proc = self.state().proc(f"agent:{n.name}")
        if proc is None:
            raise NotFound(f"no agent running on {n.name}")
        state.stop(proc, first=sig)
        self._record(lambda s: s.procs.remove(proc) if proc in s.procs else None)

    def agent_start(self, node: str, timeout: float = 30.0) -> None:
        """Start the node's agent again with the environment of `up`; wait until it is ready."""
        n = self.node(node)
        st = self.state()
        if st.agent == "none":
            raise ValidationError(f"lab {self.name} runs no agents (cni {st.cni})", field="agent")
        if st.proc(f"agent:{n.name}") is not None:
            raise AlreadyExists(f"the agent on {n.name} is running; stop it first")
        self._start_agent(st, topology.plan_of(st), n)
        self._wait_ready(topology.plan_of(st), st.agent, time.monotonic() + timeout, only=[n.name])

    def http_get(self, node: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, str]:
        """GET http://127.0.0.1:port/path inside the node's namespace (the agent's health
        listens on loopback only): (status, body); 0 if no answer."""
        return nsutil.http_get(self.node(node).netns, "127.0.0.1", port, path, timeout)
