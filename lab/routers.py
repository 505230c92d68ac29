"""The lab's top-of-rack router in `<lab>-tor`: BIRD2 or FRR (bgpd + zebra) from Debian.

The router peers over eBGP with every node on that node's own link, installs what it
learns (the nodes' pod blocks) in its kernel so the outside host behind it reaches the
pods, and re-announces each node's blocks to the others. The datastore side -- mesh off,
one BGPPeer per node pointing at the router -- is `bgp_resources()`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tortie.errors import DataplaneError, ValidationError
from tortie.lab import family, nsutil
from tortie.lab.services import CLUSTER_CIDR, LB_CIDR
from tortie.lab.topology import Plan, TorPlan

API_VERSION = "tortie.io/v1"
HOLD_TIME = 9  # seconds: a lab wants quick failure detection
# The restart time the lab's agents offer (TORTIE_BGP_GRACEFUL_RESTART): peers keep a vanished
# node's routes this long -- enough for a killed agent to come back, and within HOLD_TIME, so a
# node that is gone for good is withdrawn within the hold time.
GRACEFUL_RESTART = 6
KERNEL_PROTO = {"bird": "bird", "frr": "bgp"}  # the route protocol each puts on learned routes


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_password(password: str) -> str:
    # both configs take it as a double-quoted / bare token: refuse what would break them
    if not password or not password.isprintable() or any(c in password for c in "\"\\ ;{}"):
        raise ValidationError("want printable characters without quotes, backslashes, spaces, ';' "
                              "or braces", field="password")
    return password


def bird_config(plan: Plan, tor: TorPlan, log_path: str, passwords: Mapping[str, str] | None = None,
                bfd: bool = False, announce: Sequence[str] = ()) -> str:
    """BIRD 2 configuration: one eBGP session per node, learned routes to the kernel.

    `passwords`: node name -> the TCP MD5 password of that node's session. `bfd`: BFD
    sessions (100 ms x 3) with every node's address on this router's links, for the
    nodes' egress next hops. `announce`: prefixes the router originates to every node
    (`tortie-lab router announce`, e.g. a default route for IPPool egress.fromPeers); only
    announced: they never enter the router's own kernel, which forwards by its links."""
    lines = [
        f'log "{log_path}" {{ info, warning, error, fatal }};',
        f"router id {tor.ip};",
        "protocol device { scan time 5; }",
        "protocol direct { ipv4; }",
        "protocol kernel {",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "  merge paths on;",
        "}",
        "template bgp node {",
        f"  local as {tor.as_number};",
        f"  hold time {HOLD_TIME};",
        "  connect retry time 1;",
        "  error wait time 1, 10;",
        # what the nodes gave it, and what it originates itself (protocol static "announced")
        '  ipv4 { import all; export where source = RTS_BGP || proto = "announced"; next hop self; };',
        "}",
    ]
    if announce:
        lines.append("protocol static announced { ipv4; " + "".join(f"route {p} blackhole; " for p in announce) + "}")
    if 6 in plan.versions:
        lines += bird_ipv6_lines(plan, tor, passwords)
    for node, link in plan.links_of(tor.name) if 4 in plan.versions else ():
        lines += [
            f"protocol bgp {node.name} from node {{",
            f"  local {link.gateway} as {tor.as_number};",
            f"  neighbor {link.ip} as {node.as_number};",
            *([f'  password "{check_password(pw)}";'] if (pw := (passwords or {}).get(node.name)) else []),
            "}",
        ]
    if bfd:
        lines += ["protocol bfd {",
                  '  interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };',
                  *(f"  neighbor {ip};" for _node, ip, _local in sessions_of(plan, tor)),
                  "}"]
    return "\n".join(lines) + "\n"


def bird_ipv6_lines(plan: Plan, tor: TorPlan, passwords: Mapping[str, str] | None = None) -> list[str]:
    """BIRD's IPv6 half: a session over IPv6 per node (`nodeI_v6`, IPv6 routes only), its
    learned routes to the kernel. The IPv4 half stays as it is (Calico peers per family)."""
    lines = ["protocol direct direct6 { ipv6; }",
             "protocol kernel kernel6 {",
             "  ipv6 { import none; export where source = RTS_BGP; };",
             "  merge paths on;",
             "}",
             "template bgp node6 {",
             f"  local as {tor.as_number};",
             f"  hold time {HOLD_TIME};",
             "  connect retry time 1;",
             "  error wait time 1, 10;",
             "  ipv6 { import all; export where source = RTS_BGP; next hop self; };",
             "}"]
    for node, link in plan.links_of(tor.name):
        lines += [f"protocol bgp {node.name}{V6_SUFFIX} from node6 {{",
                  f"  local {family.v6(link.gateway)} as {tor.as_number};",
                  f"  neighbor {family.v6(link.ip)} as {node.as_number};",
                  *([f'  password "{check_password(pw)}";'] if (pw := (passwords or {}).get(node.name)) else []),
                  "}"]
    return lines


V6_SUFFIX = "_v6"  # a node's IPv6 session, as the routers name it (node1_v6)


def sessions_of(plan: Plan, tor: TorPlan) -> list[tuple]:
    """(node, its address, the router's address) of each session the router has, per link
    and per family of the lab, IPv4 first."""
    return [(node, family.of(link.ip, v), family.of(link.gateway, v))
            for v in plan.versions for node, link in plan.links_of(tor.name)]


def bird_command(conf: str, control: str) -> list[str]:
    # -f: stay in the foreground, so the PID the lab records is BIRD's own.
    return ["bird", "-f", "-c", conf, "-s", control]


def birdc(netns: str, control: str, *args: str) -> str:
    r = nsutil.run(["ip", "netns", "exec", netns, "birdc", "-s", control, *args], check=False, timeout=10)
    return r.stdout


def bird_sessions(netns: str, control: str) -> dict[str, str]:
    """BGP session state per protocol name (node1: Established, ...)."""
    out = birdc(netns, control, "show", "protocols")
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "BGP":
            states[parts[0]] = parts[5] if parts[3] == "up" else (parts[5] if len(parts) > 5 else parts[3])
    return states


def bird_ready(netns: str, control: str) -> bool:
    if not os.path.exists(control):
        return False
    r = subprocess.run(["ip", "netns", "exec", netns, "birdc", "-s", control, "show", "status"],
                       capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and bool(re.search(r"Daemon is up and running", r.stdout))


FRR_DIR = "/usr/lib/frr"


def frr_config(plan: Plan, tor: TorPlan, log_path: str, passwords: Mapping[str, str] | None = None,
               bfd: bool = False) -> str:
    """FRR configuration: one eBGP session per node; zebra puts the learned routes in the kernel.

    `bfd`: bfdd runs a session (100 ms x 3) with every node's address on this router's links
    (for the nodes' egress next hops), and the BGP sessions follow it."""
    lines = [
        "frr defaults datacenter",
        f"hostname {tor.netns}",
        f"log file {log_path}",
    ]
    lines += [
        f"router bgp {tor.as_number}",
        f" bgp router-id {tor.ip}",
        " no bgp ebgp-requires-policy",
        " bgp bestpath as-path multipath-relax",
    ]
    v6 = [(node, family.v6(link.ip), family.v6(link.gateway)) for node, link in plan.links_of(tor.name)
          if 6 in plan.versions]
    for node, ip6, local6 in v6:
        lines += [f" neighbor {ip6} remote-as {node.as_number}", f" neighbor {ip6} update-source {local6}",
                  f" neighbor {ip6} timers 3 {HOLD_TIME}", f" neighbor {ip6} timers connect 1"]
        if pw := (passwords or {}).get(node.name):
            lines.append(f" neighbor {ip6} password {check_password(pw)}")
        if bfd:
            lines.append(f" neighbor {ip6} bfd profile {FRR_BFD_PROFILE}")
    for node, link in plan.links_of(tor.name) if 4 in plan.versions else ():
        lines += [f" neighbor {link.ip} remote-as {node.as_number}",
                  f" neighbor {link.ip} update-source {link.gateway}",
                  f" neighbor {link.ip} timers 3 {HOLD_TIME}",
                  f" neighbor {link.ip} timers connect 1"]
        if pw := (passwords or {}).get(node.name):
            lines.append(f" neighbor {link.ip} password {check_password(pw)}")
        if bfd:
            lines.append(f" neighbor {link.ip} bfd profile {FRR_BFD_PROFILE}")
    lines += [" address-family ipv4 unicast", "  maximum-paths 16",
              *(f"  no neighbor {ip6} activate" for _n, ip6, _l in v6), " exit-address-family"]
    if v6:  # IPv6 routes over the IPv6 sessions only (MP-BGP, as the nodes' ExaBGP speaks it)
        lines += [" address-family ipv6 unicast", "  maximum-paths 16",
                  *(f"  neighbor {ip6} activate" for _n, ip6, _l in v6), " exit-address-family"]
    if bfd:  # last: every daemon reads the whole file, and bgpd stops at bfdd's top-level `exit`
        lines += frr_bfd_lines(plan, tor)
    return "\n".join(lines) + "\n"


FRR_BFD_PROFILE = "lab"


def frr_bfd_lines(plan: Plan, tor: TorPlan) -> list[str]:
    """bfdd's part: the lab's timers as a profile, and a static session per node address."""
    lines = ["bfd", f" profile {FRR_BFD_PROFILE}",
             f"  receive-interval {LAB_BFD['minRx']}", f"  transmit-interval {LAB_BFD['minTx']}",
             f"  detect-multiplier {LAB_BFD['multiplier']}", " exit"]
    for _node, ip, local in sessions_of(plan, tor):
        lines += [f" peer {ip} local-address {local}", f"  profile {FRR_BFD_PROFILE}", " exit"]
    return [*lines, "exit"]


def frr_command(rdir: str, conf: str, name: str, daemons: tuple[str, ...] = ("bfdd", "bgpd")) -> list[str]:
    """zebra and `daemons` in one process group (a shell that starts zebra, waits until it
    listens, starts the daemons and execs the last), so stopping the group stops the router
    as a power failure would.

    Every path is in the lab's dir; the daemons run as Debian's `frr` user, which owns it.
    """
    q = shlex.quote
    common = f"-N {q(name)} --vty_socket {q(rdir)} -z {q(rdir)}/zserv.api -f {q(conf)} -A 127.0.0.1 -P 0"
    extra = {"bfdd": f" --bfdctl {q(rdir)}/bfdd.sock", "bgpd": " -p 179"}

    def daemon(d: str) -> str:
        return f"{FRR_DIR}/{d} {common} -i {q(rdir)}/{d}.pid{extra.get(d, '')}"

    zserv = q(os.path.join(rdir, "zserv.api"))
    script = (f"{daemon('zebra')} & for i in $(seq 100); do [ -S {zserv} ] && break; sleep 0.05; done; "
              + "".join(f"{daemon(d)} & " for d in daemons[:-1]) + f"exec {daemon(daemons[-1])}")
    return ["sh", "-c", script]


def frr_prepare_dir(rdir: str) -> None:
    """FRR's daemons drop to the `frr` user: let them write their sockets and pid files."""
    try:
        user = pwd.getpwnam("frr")
    except KeyError:
        return
    os.chown(rdir, user.pw_uid, user.pw_gid)


def vtysh(netns: str, rdir: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "vtysh", "--vty_socket", rdir, "-c", command],
                          capture_output=True, text=True, timeout=10)


def frr_ready(netns: str, rdir: str) -> bool:
    r = vtysh(netns, rdir, "show bgp summary json")
    return r.returncode == 0 and r.stdout.lstrip().startswith("{")


def frr_sessions(netns: str, rdir: str, plan: Plan, tor_name: str) -> dict[str, str]:
    r = vtysh(netns, rdir, "show bgp summary json")
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return {}
    peers = {**doc.get("ipv4Unicast", {}).get("peers", {}), **doc.get("ipv6Unicast", {}).get("peers", {})}
    by_ip = {link.ip: n.name for n, link in plan.links_of(tor_name)}
    by_ip.update({family.v6(link.ip): n.name + V6_SUFFIX for n, link in plan.links_of(tor_name)})
    return {by_ip.get(ip, ip): p.get("state", "?") for ip, p in peers.items()}


@dataclass(frozen=True)
class RouterRun:
    """How the lab runs one router: its command, readiness check and session view."""
    tor: TorPlan
    rdir: str
    log_dir: str
    announce: tuple[str, ...] = ()  # prefixes it originates (`tortie-lab router announce`)

    @property
    def conf(self) -> str:
        return os.path.join(self.rdir, "bird.conf" if self.tor.kind == "bird" else "frr.conf")

    @property
    def control(self) -> str:
        return os.path.join(self.rdir, "bird.ctl") if self.tor.kind == "bird" else self.rdir

    @property
    def log_path(self) -> str:
        return os.path.join(self.log_dir, f"{self.tor.name}-{self.tor.kind}.log")

    def _write_config(self, plan: Plan, passwords: Mapping[str, str] | None, bfd: bool = False) -> None:
        if self.tor.kind == "bird":
            text = bird_config(plan, self.tor, self.log_path, passwords, bfd, self.announce)
        else:
            text = frr_config(plan, self.tor, self.log_path, passwords, bfd)
        with open(self.conf, "w") as f:
            f.write(text)

    def set_bfd(self, plan: Plan, passwords: Mapping[str, str], on: bool) -> None:
        """BFD with every node on this router's links, on or off (reconfigured live: BIRD
        rereads its file, FRR takes the same lines through vtysh)."""
        if self.tor.kind == "bird":
            self.reconfigure(plan, passwords, on)
            return
        self._write_config(plan, passwords, on)
        links = sessions_of(plan, self.tor)
        if on:
            cmds = [line.strip() for line in frr_bfd_lines(plan, self.tor)]
            cmds += [f"router bgp {self.tor.as_number}",
                     *(f"neighbor {ip} bfd profile {FRR_BFD_PROFILE}" for _n, ip, _l in links), "exit"]
        else:
            cmds = [f"router bgp {self.tor.as_number}", *(f"no neighbor {ip} bfd" for _n, ip, _l in links),
                    "exit", "bfd", *(f"no peer {ip} local-address {local}" for _n, ip, local in links),
                    f"no profile {FRR_BFD_PROFILE}", "exit"]
        self._vtysh_config(cmds)

    def _vtysh_config(self, cmds: list[str]) -> None:
        args = ["ip", "netns", "exec", self.tor.netns, "vtysh", "--vty_socket", self.rdir, "-c", "configure terminal"]
        for c in cmds:
            args += ["-c", c]
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
        if r.returncode != 0 or "%" in r.stdout:
            raise DataplaneError(f"vtysh: {(r.stdout + r.stderr).strip()}")

    def bfd_sessions(self, plan: Plan) -> dict[str, str]:
        """BFD sessions: node address -> state as BIRD writes it (Up, Down, Init, AdminDown)."""
        if self.tor.kind == "bird":
            out = birdc(self.tor.netns, self.control, "show", "bfd", "sessions")
            return {cols[0]: cols[2] for line in out.splitlines() if len(cols := line.split()) >= 3
                    and _is_ip(cols[0])}
        r = vtysh(self.tor.netns, self.rdir, "show bfd peers json")
        try:
            peers = json.loads(r.stdout or "[]")
        except ValueError:
            return {}
        names = {"up": "Up", "down": "Down", "init": "Init", "shutdown": "AdminDown"}
        return {p["peer"]: names.get(p.get("status", ""), p.get("status", "?")) for p in peers if "peer" in p}

    def reconfigure(self, plan: Plan, passwords: Mapping[str, str], bfd: bool) -> None:
        """Write the configuration again and make the running BIRD take it (sessions whose
        definition is unchanged stay up)."""
        self._write_config(plan, passwords, bfd)
        out = birdc(self.tor.netns, self.control, "configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise DataplaneError(f"birdc configure: {out.strip()}")

    def prepare(self, plan: Plan, passwords: Mapping[str, str] | None = None, bfd: bool = False) -> list[str]:
        """Write the configuration; the command that runs the router in the foreground."""
        if self.tor.kind == "bird":
            cmd = bird_command(self.conf, self.control)
        else:
            frr_prepare_dir(self.rdir)
            cmd = frr_command(self.rdir, self.conf, self.tor.netns)
        self._write_config(plan, passwords, bfd)
        if self.tor.kind == "frr":
            open(self.log_path, "a").close()
            frr_prepare_dir(self.log_path)
        return cmd

    def set_password(self, plan: Plan, passwords: Mapping[str, str], node: str, bfd: bool = False) -> None:
        """Rewrite the config with `passwords` and make the running router use them for `node`'s
        session (which restarts that session)."""
        if self.tor.kind == "bird":
            self.reconfigure(plan, passwords, bfd)
            return
        self._write_config(plan, passwords, bfd)
        pw = passwords.get(node)
        cmds = []
        for n, ip, _local in sessions_of(plan, self.tor):
            if n.name == node:
                cmds.append(f"neighbor {ip} password {check_password(pw)}" if pw else f"no neighbor {ip} password")
        self._vtysh_config([f"router bgp {self.tor.as_number}", *cmds])

    def leftovers(self) -> list[str]:
        """Directories the router makes outside the lab dir (FRR's per-pathspace run dir)."""
        return [os.path.join("/var/run/frr", self.tor.netns)] if self.tor.kind == "frr" else []

    def ready(self) -> bool:
        if self.tor.kind == "bird":
            return bird_ready(self.tor.netns, self.control)
        return frr_ready(self.tor.netns, self.rdir)

    def sessions(self, plan: Plan) -> dict[str, str]:
        if self.tor.kind == "bird":
            return bird_sessions(self.tor.netns, self.control)
        return frr_sessions(self.tor.netns, self.rdir, plan, self.tor.name)


# What nodes import from the routers (BGPPeer acceptPrefixes): the pod address space the lab's
# pools live in. Nodes reach other nodes' blocks by their default route anyway; what they
# need from the router are the /32s other nodes borrowed from their own blocks, which
# would otherwise hit the block's blackhole.
POD_SPACE = "10.64.0.0/10"
POD_SPACE6 = "fd60::/12"  # the same for IPv6 (the lab's default IPv6 pool fd65::/48 is in it)


LAB_BFD = {"minTx": 100, "minRx": 100, "multiplier": 3}  # the routers' BFD timers (bird_config)


def bgp_resources(plan: Plan, pool: str | None = None, bfd: bool = False, pool6: str | None = None) -> list[dict]:
    """Mesh off; each node peers with each router on its link to it, and keeps its own AS.

    Nodes accept from the routers what lies in POD_SPACE or in `pool` (the lab's pool).
    Each BGPPeer carries the label `router: <router name>`. IPv6 labs: a BGPPeer per node
    and router over IPv6 too (`<router>-<node>-v6`, accepting POD_SPACE6 or `pool6`).
    `bfd`: the BGPPeers ask for BFD (the routers run it: `bird_config(bfd=True)`)."""
    if not plan.tors:
        return []
    accept = {4: [POD_SPACE], 6: [POD_SPACE6]}
    for space, p in ((POD_SPACE, pool), (POD_SPACE6, pool6)):
        net = ipaddress.ip_network(p, strict=False) if p else None
        if net and net.version == ipaddress.ip_network(space).version and not net.subnet_of(ipaddress.ip_network(space)):
            accept[net.version].append(p)
    res: list[dict] = [{
        "apiVersion": API_VERSION, "kind": "BGPConfiguration", "metadata": {"name": "default"},
        "spec": {"nodeToNodeMeshEnabled": False, "asNumber": plan.nodes[0].as_number - 1,
                 # the lab's Service ranges (lab.services, IPv4 only), announced to the routers by every node
                 **({"serviceClusterIPs": [{"cidr": CLUSTER_CIDR}], "serviceLoadBalancerIPs": [{"cidr": LB_CIDR}]}
                    if 4 in plan.versions else {})},
    }]
    res += [{"apiVersion": API_VERSION, "kind": "BGPConfiguration", "metadata": {"name": f"node.{n.name}"},
             "spec": {"asNumber": n.as_number}} for n in plan.nodes]
    for tor in plan.tors:
        # labelled with the router's name, for IPPool.spec.bgp.peers and egress.fromPeers
        res += [{"apiVersion": API_VERSION, "kind": "BGPPeer",
                 "metadata": {"name": f"{tor.name}-{n.name}{'-v6' if v == 6 else ''}", "labels": {"router": tor.name}},
                 "spec": {"node": n.name, "peerIP": family.of(link.gateway, v), "asNumber": tor.as_number,
                          "holdTime": f"{HOLD_TIME}s", "acceptPrefixes": accept[v],
                          **({"bfd": LAB_BFD} if bfd else {})}}
                for v in plan.versions for n, link in plan.links_of(tor.name)]
    return res
