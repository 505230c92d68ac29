"""Host endpoints in the filter table: the base chains that guard a node's own interfaces,
and the failsafe ports that stay open whatever the policies say (Calico's
failsafeInboundHostPorts / failsafeOutboundHostPorts).

    chain host-input  (hook input, priority filter)
        ct state established,related accept
        iifname "lo" accept ; IPv6 neighbour discovery accept
        <failsafe inbound>  tcp dport { 22, 179, 2379, 2380, ... } accept
        iifname vmap @host-in               "<interface>" : jump hep-in-<interface>
        iifname != "tor*" jump hep-in-all   (a HostEndpoint with interfaceName "*")
    chain host-output (hook output, priority filter): the same, oifname, outbound ports

    chain host-forward-in / host-forward-out (hook forward): iifname / oifname vmap
        @hostfwd-in|out -> hepfwd-in|out-<interface>: the applyOnForward policies only

    chain host-prerouting (hook prerouting, priority -110: before DNAT): failsafe inbound,
        iifname vmap @hostpre-in -> heppre-in-<interface>: the preDNAT policies, whose
        Allow and Deny end only this stage; what no rule matches goes on to the rest

    chain host-raw-in / host-raw-out (prerouting / output, priority -300: before conntrack):
        failsafe ports both ways, iifname / oifname vmap @hostraw-in|out ->
        hepraw-in|out-<interface>: the doNotTrack policies, rendered as their own chains
        (pol-rawin|rawout-...) whose Allow is `notrack ... accept`; unmatched goes on

Forwarded traffic (pods' through the uplink) meets only the policies with applyOnForward,
and passes when none selects the endpoint. Replies of accepted connections pass, so a
session opened on a failsafe port (BGP, etcd) lives on.
"""

from __future__ import annotations

from tortie.cni.wiring import HOST_PREFIX
from tortie.errors import ValidationError
from tortie.policy.nftables import Base, Chain

# Calico's defaults (Felix's FailsafeInboundHostPorts / FailsafeOutboundHostPorts)
FAILSAFE_INBOUND = "tcp:22,udp:68,tcp:179,tcp:2379,tcp:2380,tcp:5473,tcp:6443,tcp:6666,tcp:6667"
FAILSAFE_OUTBOUND = "udp:53,udp:67,tcp:179,tcp:2379,tcp:2380,tcp:5473,tcp:6443,tcp:6666,tcp:6667"
HOST_MAPS = {"in": "host-in", "out": "host-out"}
FORWARD_MAPS = {"in": "hostfwd-in", "out": "hostfwd-out"}
PRE_MAPS = {"in": "hostpre-in", "out": "hostpre-out"}  # "out" stays empty: ingress only
RAW_MAPS = {"in": "hostraw-in", "out": "hostraw-out"}
HOST_KEY, FORWARD_KEY, PRE_KEY, RAW_KEY = "host:", "hostfwd:", "hostpre:", "hostraw:"
PRE_DNAT_PRIORITY = -110  # before DNAT (dstnat, -100)
RAW_PRIORITY = -300  # before conntrack
STAGE_MAPS = {"host": HOST_MAPS, "hostfwd": FORWARD_MAPS, "hostpre": PRE_MAPS, "hostraw": RAW_MAPS}
# Packets an untracked (doNotTrack) policy allowed carry no connection: the later stages
# take them as they are (as Calico's filter chains accept them).
_UNTRACKED = "ct state untracked accept"
_ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept"


def parse_ports(text: str, field: str) -> tuple[tuple[str, int], ...]:
    """"tcp:22,udp:68" (or "none") as ((protocol, port), ...); one line naming the field."""
    if text.strip().lower() == "none":
        return ()
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        proto, sep, port = item.partition(":")
        if not sep or proto.lower() not in ("tcp", "udp", "sctp") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValidationError(f"{item!r} is not protocol:port (tcp, udp or sctp; 1-65535)", field=field)
        out.append((proto.lower(), int(port)))
    return tuple(sorted(set(out)))


def _failsafe(ports: tuple[tuple[str, int], ...], port: str = "dport") -> list[str]:
    out = []
    for proto in sorted({p for p, _ in ports}):
        numbers = ", ".join(str(n) for p, n in ports if p == proto)
        out.append(f"meta l4proto {proto} th {port} {{ {numbers} }} accept")
    return out


def host_chain(interface: str, direction: str, stage: str = "host") -> str:
    prefix = {"host": "hep", "hostfwd": "hepfwd", "hostpre": "heppre", "hostraw": "hepraw"}[stage]
    return f"{prefix}-{direction}-all" if interface == "*" else f"{prefix}-{direction}-{interface}"


def base_chains(inbound: tuple[tuple[str, int], ...], outbound: tuple[tuple[str, int], ...],
                any_interface: bool, any_forward: bool, any_pre: bool = False, any_raw: bool = False) -> dict[str, Chain]:
    """The base chains, given the failsafe ports and whether a `*` host endpoint exists
    (and has applyOnForward policies). Forwarded traffic is checked as it arrives on a host
    endpoint (ingress) and as it leaves by one (egress), each in its own base chain: an
    accept ends only its own chain."""
    out = {}
    for name, hook, field, direction, ports in (("host-input", "input", "iifname", "in", inbound),
                                                ("host-output", "output", "oifname", "out", outbound)):
        rules = ["ct state established,related accept", _UNTRACKED, f'{field} "lo" accept', _ND, *_failsafe(ports),
                 f"{field} vmap @{HOST_MAPS[direction]}"]
        if any_interface:
            rules.append(f'{field} != "{HOST_PREFIX}*" jump {host_chain("*", direction)}')
        out[name] = Chain(tuple(rules), Base("filter", hook, 0))
    for name, field, direction in (("host-forward-in", "iifname", "in"), ("host-forward-out", "oifname", "out")):
        rules = ["ct state established,related accept", _UNTRACKED, f"{field} vmap @{FORWARD_MAPS[direction]}"]
        if any_forward:
            rules.append(f'{field} != "{HOST_PREFIX}*" jump {host_chain("*", direction, "hostfwd")}')
        out[name] = Chain(tuple(rules), Base("filter", "forward", 0))
    rules = ["ct state established,related accept", 'iifname "lo" accept', _ND, *_failsafe(inbound),
             f"iifname vmap @{PRE_MAPS['in']}"]
    if any_pre:
        rules.append(f'iifname != "{HOST_PREFIX}*" jump {host_chain("*", "in", "hostpre")}')
    out["host-prerouting"] = Chain(tuple(rules), Base("filter", "prerouting", PRE_DNAT_PRIORITY))
    # Untracked: no conntrack yet, so every packet, replies too. The failsafe ports both
    # ways: a connection to them and the replies of one we opened.
    for name, hook, field, direction, mine, theirs in (
            ("host-raw-in", "prerouting", "iifname", "in", inbound, outbound),
            ("host-raw-out", "output", "oifname", "out", outbound, inbound)):
        rules = [f'{field} "lo" accept', _ND, *_failsafe(mine), *_failsafe(theirs, "sport"),
                 f"{field} vmap @{RAW_MAPS[direction]}"]
        if any_raw:
            rules.append(f'{field} != "{HOST_PREFIX}*" jump {host_chain("*", direction, "hostraw")}')
        out[name] = Chain(tuple(rules), Base("filter", hook, RAW_PRIORITY))
    return out
