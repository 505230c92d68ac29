"""The Lab API: a whole tortie cluster on one machine, in network namespaces.

    lab = Lab.up(name="t1", nodes=2)      # etcd, the underlay, agents; waits until ready
    ip = lab.pod_add("node1", "default/a")
    lab.probe("default/a", "default/b", 80, udp=True).ok
    lab.down()                            # or teardown("t1") from any process

The CLI (`tortie-lab`), the demo, the pytest fixture and the benchmarks all use this.
What runs where:
    <lab>-net    the underlay bridge br0 (nodes and ctl attach with veths)
    <lab>-ctl    etcd; the pod server; tortiectl and datastore helpers run here
    <lab>-nodeN  one agent each (tortie-agent, or the CNI server standing in for it)
    <lab>-pod-*  pods, wired by the real CNI plugin exec'd inside their node
Everything the lab makes is written to /run/tortie-lab/<lab>/state.json before it is
made, so `teardown()` can always finish the job, also after a crash part way.
Here: building the lab (`up`), lookups, status, probes and tortiectl. The rest of `Lab`
comes from a mixin per concern: `LabEtcd` (etcd_members.py), `LabRouters`
(router_control.py), `LabAgents` (agents.py), `LabPods` (pods.py), `LabServices`
(services.py); the namespaces and links are built by underlay.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

from tortie.errors import AlreadyExists, NotFound, TortieError, ValidationError
from tortie.lab import family, nsutil, pki, routers, state, topology, underlay
from tortie.lab import subnets as lab_subnets
from tortie.lab.agents import LabAgents
from tortie.lab.etcd_members import LabEtcd
from tortie.lab.pods import LabPods
from tortie.lab.probe import DEFAULT_TIMEOUT, Endpoint, Matrix, ProbeResult, probe, run_matrix
from tortie.lab.router_control import LabRouters
from tortie.lab.services import LabServices, lab_resources
from tortie.lab.state import LabState, Pod
from tortie.lab.teardown import Echo, quiet, teardown
from tortie.lab.topology import NodePlan, Plan
from tortie.log import get_logger

log = get_logger("lab")

AGENT_MODES = ("auto", "agent", "cni-server", "none")
CNI_MODES = ("tortie", "ptp")

RR_CLUSTER_ID = "244.0.0.1"  # the lab's reflectors share one cluster id, as redundant reflectors do


def reflector_resources(plan: Plan, count: int) -> list[dict]:
    """Mesh off; the last `count` nodes are route reflectors (the others peer with them)."""
    if not count:
        return []
    res: list[dict] = [{"apiVersion": routers.API_VERSION, "kind": "BGPConfiguration", "metadata": {"name": "default"},
                        "spec": {"nodeToNodeMeshEnabled": False}}]
    res += [{"apiVersion": routers.API_VERSION, "kind": "Node",
             "metadata": {"name": n.name, "labels": {"route-reflector": "true"}},
             "spec": {"bgp": {"routeReflectorClusterID": RR_CLUSTER_ID}}} for n in plan.nodes[-count:]]
    return res


def resolve_agent(mode: str) -> str:
    """Which per-node daemon to run: `auto` is the agent (it serves CNI through agent.cni_server)."""
    if mode not in AGENT_MODES:
        raise ValidationError(f"--agent {mode!r}: want one of {', '.join(AGENT_MODES)}", field="agent")
    return "agent" if mode == "auto" else mode


class Lab(LabEtcd, LabRouters, LabAgents, LabPods, LabServices):
    """A handle on a running lab; every method re-reads its state file."""

    def __init__(self, name: str = topology.DEFAULT_LAB) -> None:
        self.name = topology.check_lab_name(name)

    # --- life cycle -----------------------------------------------------------------

    @classmethod
    def up(cls, name: str = topology.DEFAULT_LAB, nodes: int = 1, tor: str = "none", *,
           uplinks: int = 1, cni: str = "tortie", agent: str = "auto", agent_env: Mapping[str, str] | None = None,
           pool: str = topology.DEFAULT_POOL_CIDR, block_size: int = topology.DEFAULT_BLOCK_SIZE,
           timeout: float = 60.0, bfd: bool = False, reflectors: int = 0, etcd_members: int = 1,
           etcd_tls: bool = False, subnets: int = 1, ip_family: str = family.DEFAULT_FAMILY,
           pool6: str = family.DEFAULT_POOL6_CIDR, echo: Echo = quiet) -> Lab:
        """Build the lab and wait until it is ready; on any failure tear down what was made.
        `bfd`: the routers run BFD with every node (for egress next hops that ask for it).
        `reflectors`: the mesh is off and the last that many nodes are route reflectors
        (one cluster id), every other node their client.
        `etcd_members` 3: a cluster, each member in its own namespace; `etcd_tls`: every
        client and peer link over TLS with certificates of a lab CA.
        `ip_family` ipv6 or dual: IPv6 on every link and in every pod (lab/family.py), the
        pods' IPv6 addresses from the pool `pool6` (default-ipv6, blocks of /122)."""
        plan = topology.make_plan(name, nodes, tor, uplinks, etcd_members=etcd_members, etcd_tls=etcd_tls,
                                  subnets=subnets, ip_family=ip_family)
        if ip_family != "ipv4" and cni != "tortie":
            raise ValidationError(f"--cni {cni} with --ip-family {ip_family} is not supported yet", field="cni")
        if bfd and tor == "none":
            raise ValidationError("--bfd needs routers (--tor bird or frr)", field="bfd")
        if reflectors and (tor != "none" or not 0 < reflectors < nodes):
            raise ValidationError(f"--reflectors wants --tor none and 1-{max(nodes - 1, 1)} of the {nodes} nodes",
                                  field="reflectors")
        if cni not in CNI_MODES:
            raise ValidationError(f"--cni {cni!r}: want one of {', '.join(CNI_MODES)}", field="cni")
        agent_mode = resolve_agent(agent) if cni == "tortie" else "none"
        lab = cls(name)
        with state.lock(name):
            if os.path.exists(state.state_path(name)):
                raise AlreadyExists(f"lab {name!r} exists; `tortie-lab down --name {name}` first")
            leftovers = [n for n in nsutil.netns_list() if topology.is_lab_netns(name, n)]
            if leftovers:
                raise AlreadyExists(f"namespaces of lab {name!r} exist ({', '.join(leftovers[:3])}...); "
                                    f"`tortie-lab down --name {name}` first")
            st = LabState(name=name, dir=state.lab_dir(name), tor=tor, cni=cni, agent=agent_mode,
                          plan=asdict(plan), agent_env=dict(agent_env or {}), router_bfd=bfd,
                          reflectors=reflectors)
            os.makedirs(os.path.join(st.dir, "logs"), exist_ok=True)
            state.save(st)
        try:
            lab._build(plan, {4: pool, 6: pool6}, block_size, timeout, echo)
        except BaseException:
            echo(f"lab {name}: up failed, tearing down")
            teardown(name)
            raise
        return lab

    def _record(self, fn: Callable[[LabState], None]) -> LabState:
        with state.modify(self.name) as st:
            fn(st)
        return st

    def _build(self, plan: Plan, pools: dict[int, str], block_size: int, timeout: float, echo: Echo) -> None:
        deadline = time.monotonic() + timeout
        st = self.state()
        t0 = time.monotonic()
        names = plan.netns_names()
        self._record(lambda s: s.netns.extend(names))  # recorded first: teardown finds them
        underlay.build(plan)
        if plan.segments:
            echo(f"core segment {plan.subnet} on {plan.bridge} in {plan.net_netns}; outside host {plan.ext_netns}; "
                 f"{len(plan.nodes)} node(s) on {len(plan.segments)} uplink segments "
                 f"({', '.join(f'{seg.subnet} via {t.netns}' for t in plan.tors if (seg := t.segment))})")
        elif plan.tors:
            echo(f"core segment {plan.subnet} on {plan.bridge} in {plan.net_netns}; router {plan.tors[0].netns}, "
                 f"outside host {plan.ext_netns}; {len(plan.nodes)} node(s), each on its own link")
        else:
            echo(f"underlay {plan.subnet} on {plan.bridge} in {plan.net_netns}; "
                 f"{len(plan.nodes)} node namespace(s)")

        if plan.etcd_tls:
            pki.make_pki(self._pki_dir(), [(m.name, m.ip) for m in plan.members])
            echo(f"lab CA and certificates in {self._pki_dir()} (a member certificate each, a client one)")
        dirs = [self._etcd_dir(plan, m) for m in plan.members]
        self._record(lambda s: s.data_dirs.extend(dirs))
        self._start_etcd(st, plan, max(deadline - time.monotonic(), 5.0))
        if len(plan.members) == 1:
            echo(f"etcd healthy at {plan.etcd_endpoint} (in {plan.ctl_netns})")
        else:
            echo(f"etcd cluster healthy: {', '.join(f'{m.name} {m.ip} in {m.netns}' for m in plan.members)}"
                 f"{' (TLS)' if plan.etcd_tls else ''}")

        if st.cni == "tortie":
            pool = pools[4]
            resources = routers.bgp_resources(plan, pool, st.router_bfd, pools[6]) + \
                reflector_resources(plan, st.reflectors) + (lab_resources() if 4 in plan.versions else [])
            if 6 in plan.versions:
                resources.insert(0, family.pool6_resource(pools[6]))
            extra = [a for r in resources for a in ("--resource", json.dumps(r))]
            v4 = ["--cidr", pool, "--block-size", str(block_size)] if 4 in plan.versions else []
            created = self._dsops("bootstrap", *v4, *extra)
            if v4:
                echo(f"IPPool default-ipv4 {pool} blockSize {block_size} "
                     f"({'created' if created.get('ippool') else 'exists'}); IPAMConfig default")
            if 6 in plan.versions:
                echo(f"IPPool default-ipv6 {pools[6]} blockSize {family.DEFAULT_BLOCK_SIZE6} "
                     f"({'created' if created.get('ippool/default-ipv6') else 'exists'})")
            self._install_cni(st, echo)

        if st.cni == "ptp":
            underlay.ptp_routes(plan)
        for tor in plan.tors:
            self._start_router(st, plan, tor, deadline)
            echo(f"{tor.kind} running in {tor.netns}, AS {tor.as_number}, "
                 f"{len(plan.nodes)} BGP neighbor(s); node-to-node mesh off")
        self._start_podserver(st)
        for node in plan.nodes:
            nsutil.sysctl(node.netns, "net.ipv4.ip_forward", "1")
            if 6 in plan.versions:
                nsutil.sysctl(node.netns, "net.ipv6.conf.all.forwarding", "1")
            if st.agent != "none":
                self._start_agent(st, plan, node)
        self._wait_ready(plan, st.agent, deadline)
        if st.agent != "none":
            echo(f"{st.agent} ready on {', '.join(n.name for n in plan.nodes)}")
            if plan.tors:
                echo(self._wait_sessions(min(10.0, max(deadline - time.monotonic(), 1.0))))
        self._record(lambda s: setattr(s, "phase", "ready"))
        echo(f"lab {self.name} ready in {time.monotonic() - t0:.1f}s")

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def link_set(self, node: str, ifname: str, *, up: bool) -> None:
        """A node's link down or up, as a cut cable would (the other end stays up)."""
        n = self.node(node)
        r = subprocess.run(["ip", "-n", n.netns, "link", "set", "dev", ifname, "up" if up else "down"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ValidationError(f"{node} has no link {ifname!r}: {r.stderr.strip()}", field="ifname")

    def down(self) -> None:
        teardown(self.name)

    # --- lookups --------------------------------------------------------------------

    def state(self) -> LabState:
        return state.load(self.name)

    def plan(self) -> Plan:
        return topology.plan_of(self.state())

    def node(self, name: str) -> NodePlan:
        for n in self.plan().nodes:
            if name in (n.name, n.netns):
                return n
        raise NotFound(f"lab {self.name} has no node {name!r}")

    def pod(self, ref: str) -> Pod:
        ns, name = topology.split_pod(ref)
        pod = self.state().pods.get(f"{ns}/{name}")
        if pod is None:
            raise NotFound(f"lab {self.name} has no pod {ns}/{name}")
        return pod

    @property
    def etcd_endpoints(self) -> list[str]:
        return list(self.plan().etcd_endpoints)

    def status(self) -> dict:
        """The lab's map (design.md, "The lab"): the document `status -o json` prints."""
        st = self.state()
        plan = topology.plan_of(st)
        procs = {p.role: p for p in st.procs}
        doc = family.status_view  # the plan's addresses as the lab's families have them
        nodes = []
        for n in plan.nodes:
            agent = procs.get(f"agent:{n.name}")
            nodes.append({
                "name": n.name, "namespace": n.netns, "address": n.address, "ip": n.ip,
                "as_number": n.as_number, "cni_socket": self.cni_socket(n.name),
                "uplinks": [{"ifname": u.ifname, "address": u.address, "gateway": u.gateway, "router": u.router}
                            for u in n.uplinks],
                "agent": {"kind": st.agent, "pid": agent.pid, "alive": state.alive(agent), "log": agent.log}
                if agent else None,
            })
        return doc({
            "name": st.name,
            "phase": st.phase,
            "tor_kind": st.tor,
            "cni": st.cni,
            "state_dir": st.dir,
            "etcd": {"namespace": plan.members[0].netns, "endpoints": list(plan.etcd_endpoints),
                     "prefix": st.etcd_prefix, "members": self.etcd_members(),
                     "tls": {k.removeprefix("TORTIE_ETCD_").lower(): v for k, v in self._etcd_env(st, plan).items()
                             if k in ("TORTIE_ETCD_CA", "TORTIE_ETCD_CERT", "TORTIE_ETCD_KEY")}
                     if plan.etcd_tls else None},
            "etcd_endpoints": list(plan.etcd_endpoints),
            "underlay": {"namespace": plan.net_netns, "bridge": plan.bridge, "subnet": plan.subnet},
            "nodes": nodes,
            "tors": [{"kind": t.kind, "name": t.name, "namespace": t.netns, "address": t.address,
                      "ip": t.ip, "as_number": t.as_number,
                      "segment": asdict(t.segment) if t.segment else None,
                      "sessions": self._router(t).sessions(plan) if st.phase == "ready" else {},
                      "peers": {n.name: {"address": u.address, "local": u.gateway, "as_number": n.as_number}
                                for n, u in plan.links_of(t.name)}}
                     for t in plan.tors],
            "uplink_segments": [{"namespace": plan.net_netns, **asdict(seg)} for seg in plan.segments],
            "subnets": lab_subnets.status(plan),
            "outside": {"namespace": plan.ext_netns, "address": plan.ext_address,
                        "ip": plan.ext_address.split("/")[0]} if plan.ext_netns and plan.ext_address else None,
            "pods": [
                {"name": p.ref, "namespace": p.namespace, "pod": p.name, "node": p.node, "netns": p.netns,
                 "netns_path": nsutil.netns_path(p.netns), "address": p.address, "labels": p.labels,
                 "addresses": p.addresses or [a for a in (p.address,) if a]}
                for p in sorted(st.pods.values(), key=lambda p: p.ref)
            ],
            "services": self.svc_list() if st.phase == "ready" else [],
        }, plan)

    # --- using the lab --------------------------------------------------------------

    def netns_of(self, who: str) -> str:
        """The namespace of a node (node1), a pod (ns/name) or a lab role (ctl, net)."""
        plan = self.plan()
        if who in ("ctl", plan.ctl_netns):
            return plan.ctl_netns
        if who in ("net", plan.net_netns):
            return plan.net_netns
        if plan.ext_netns and who in ("ext", plan.ext_netns):
            return plan.ext_netns
        for t in plan.tors:
            if who in (t.name, t.netns):
                return t.netns
        for n in plan.nodes:
            if who in (n.name, n.netns):
                return n.netns
        return self.pod(who).netns

    def probe(self, src: str, dst: str, port: int = 80, *, udp: bool = False,
              timeout: float = DEFAULT_TIMEOUT, family: int | None = None) -> ProbeResult:
        """From node or pod src to pod dst (or an IP address); .ok iff it answered.
        `family` 4 or 6: which of the pod's addresses (default: IPv4, where the lab has it)."""
        src_ns = self.netns_of(src)
        expect = None
        if dst.startswith("svc:"):  # a Service: its cluster IP; any of its pods may answer
            return probe(src_ns, self.svc_address(dst[4:]), port, udp=udp, timeout=timeout, src=src, dst=dst)
        try:
            addr = str(ipaddress.ip_address(dst))
        except ValueError:
            p = self.pod(dst)
            version = family or self.plan().versions[0]
            addr = p.address_of(version)
            if not addr:
                raise NotFound(f"pod {p.ref} has no IPv{version} address") from None
            expect, dst = p.ref, p.ref
        return probe(src_ns, addr, port, udp=udp, timeout=timeout, expect=expect, src=src, dst=dst)

    def matrix(self, port: int = 80, *, nodes: bool = True, timeout: float = DEFAULT_TIMEOUT,
               family: int | None = None) -> Matrix:
        """Every node and pod to every pod, TCP and UDP, in parallel; over IPv4, or IPv6
        with `family` 6 (default: IPv4 where the lab has it)."""
        st = self.state()
        plan = topology.plan_of(st)
        version = family or plan.versions[0]
        pods = [Endpoint(p.ref, p.netns, p.address_of(version)) for p in sorted(st.pods.values(), key=lambda p: p.ref)
                if p.address_of(version)]
        sources = [Endpoint(n.name, n.netns, None) for n in plan.nodes] if nodes else []
        if nodes and plan.ext_netns:
            sources.append(Endpoint("ext", plan.ext_netns, None))
        return run_matrix(sources + pods, pods, port=port, timeout=timeout)

    def exec(self, who: str, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run cmd inside a pod's (or node's) namespace; kwargs go to subprocess.run."""
        return subprocess.run(["ip", "netns", "exec", self.netns_of(who), *cmd], **kw)

    def ctl(self, *args: str, input: str | None = None, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """tortiectl ARGS inside the control namespace, against the lab's etcd (every
        member, and the client certificate with TLS); `env` overrides (tests)."""
        st = self.state()
        plan = topology.plan_of(st)
        env = self._env({**self._etcd_env(st, plan), **(env or {})})
        r = subprocess.run(["ip", "netns", "exec", plan.ctl_netns, state.python(), "-c",
                            "import sys; from tortie.ctl.main import main; sys.exit(main())", *args],
                           input=input, capture_output=True, text=True, env=env)
        if check and r.returncode != 0:
            raise TortieError(f"tortiectl {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def _dsops(self, *args: str, module: str = "tortie.lab.dsops"):
        st = self.state()
        plan = topology.plan_of(st)
        r = nsutil.run(["ip", "netns", "exec", plan.ctl_netns, state.python(), "-m", module,
                        "--endpoints", ",".join(plan.etcd_endpoints), "--prefix", st.etcd_prefix, *args],
                       check=False, env=self._env({**self._etcd_env(st, plan), "TORTIE_LOG_LEVEL": "warning"}))
        if r.returncode != 0:
            try:
                err = json.loads(r.stderr.strip().splitlines()[-1])
            except (ValueError, IndexError):
                err = {"error": r.stderr.strip()}
            cls = NotFound if err.get("type") == "NotFound" else TortieError
            raise cls(f"datastore {args[0]}: {err.get('error')}")
        return json.loads(r.stdout)
