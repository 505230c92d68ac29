"""ExaBGP's configuration file and environment, generated from typed peers.

Every neighbor carries the same API section: one process (the relay back to the agent)
receives state changes, parsed updates, OPENs and NOTIFICATIONs as JSON. Announcements
never live in the file; the agent sends them over the API, so a reload never touches them.
A second process, in no neighbor's API section, only wakes the reactor (`bgp.wake`).

Choices that matter:
- `manual-eor true`: ExaBGP would otherwise send end-of-RIB straight after the OPEN,
  before the agent has re-announced anything, and a graceful-restart helper would then
  flush our old routes. The speaker sends end-of-RIB itself once the export is complete.
- `graceful-restart <time>`: peers keep our routes while we restart.
- `adj-rib-out false`: ExaBGP keeps no copy to replay on reconnect. The bridge sends each
  session that comes up the whole current export set itself, so a replayed copy could
  only bring back prefixes withdrawn while the session was down.
- ExaBGP has no separate keepalive setting (it sends one every hold-time / 3), so a
  peer's keepalive only matters when it has no hold time: then hold = 3 * keepalive.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from tortie.bgp.peers import Peer
from tortie.errors import ValidationError

PROCESS = "tortie"
WAKE_PROCESS = "tortie-wake"  # wakes the reactor (bgp.wake); in no neighbor's api section
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_relay.py")
GRACEFUL_RESTART_TIME = 120
DEFAULT_HOLD_TIME = 90
# ExaBGP's reactor sleeps speed/100 s a turn when no socket or API pipe it polls is ready:
# 0.2 s. At 0.25 (2.5 ms) an idle ExaBGP took 5-7% of a core. What it does not poll is
# woken through the wake process (bgp.wake); its timers run on whole seconds. The same
# number is its spin guard: after a session closed, the reactor polls the closed
# descriptor, which returns at once, and after `speed` such turns in a second it sleeps
# speed/100 s a turn (time.sleep, which no wake cuts short) until the descriptor number is
# used again -- so this is also how late a node with a peer down may act, at most.
REACTOR_SPEED = "20"


@dataclass(frozen=True)
class LocalSettings:
    router_id: str
    local_as: int
    local_address: str | None  # None on an IPv6-only node
    local_address6: str | None = None
    listen_port: int = 179
    graceful_restart: int = GRACEFUL_RESTART_TIME
    log_severity: str = "Info"  # BGPConfiguration.logSeverityScreen: ExaBGP's log level


# BGPConfiguration.logSeverityScreen (Calico's names) -> ExaBGP's log levels
LOG_LEVELS = {"Debug": "DEBUG", "Info": "INFO", "Warning": "WARNING", "Error": "ERROR", "Fatal": "CRITICAL"}


def _quote(text: str) -> str:
    # ExaBGP's tokenizer takes a quoted string; it has no escapes, so refuse what it can't hold
    if any(c in text for c in "\"'\n;{}") or not text.isprintable():
        raise ValidationError("may not contain quotes, ';', braces or control characters",
                              field="password")
    return f'"{text}"'


def hold_time(peer: Peer) -> int:
    if peer.hold_time:
        return max(3, int(peer.hold_time))
    if peer.keepalive:
        return max(3, 3 * int(peer.keepalive))
    return DEFAULT_HOLD_TIME


def neighbor_block(peer: Peer, local: LocalSettings) -> str:
    version = ipaddress.ip_address(peer.address).version
    local_addr = peer.local_address or (local.local_address if version == 4 else local.local_address6)
    if not local_addr:
        raise ValidationError(f"no local IPv{version} address for peer {peer.address}",
                              field="localAddress")
    family = "ipv4 unicast" if version == 4 else "ipv6 unicast"
    lines = [
        f"neighbor {peer.address} {{",
        f"    description {_quote(peer.kind + ' ' + (peer.name or peer.address))};",
        f"    router-id {local.router_id};",
        f"    local-address {local_addr};",
        f"    local-as {local.local_as};",
        f"    peer-as {peer.as_number};",
        f"    hold-time {hold_time(peer)};",
        f"    passive {'true' if peer.passive else 'false'};",
        "    manual-eor true;",
        "    adj-rib-out false;",
        "    adj-rib-in false;",
        "    group-updates true;",
    ]
    if peer.port != local.listen_port and not peer.passive:
        lines.append(f"    connect {peer.port};")
    if peer.password:
        lines.append(f"    md5-password {_quote(peer.password)};")
    lines += [
        f"    capability {{ graceful-restart {local.graceful_restart}; route-refresh disable; }}",
        f"    family {{ {family}; }}",
        "    api {",
        f"        processes [ {PROCESS} ];",
        "        neighbor-changes;",
        "        receive { parsed; update; open; notification; }",
        "    }",
        "}",
    ]
    return "\n".join(lines)


def render(peers: Iterable[Peer], local: LocalSettings, api_socket: str,
           python: str = sys.executable) -> str:
    """The whole configuration file. Deterministic: the same input gives the same text."""
    parts = [
        "# generated by tortie; do not edit",
        f"process {PROCESS} {{",
        f"    run {python} -I -S {RELAY} {api_socket};",
        "    encoder json;",
        "}",
        f"process {WAKE_PROCESS} {{",
        f"    run {python} -I -S {RELAY} {api_socket} wake;",
        "    encoder json;",
        "}",
    ]
    for peer in sorted(peers, key=lambda p: (p.address, p.port)):
        parts.append(neighbor_block(peer, local))
    return "\n".join(parts) + "\n"


def environment(local: LocalSettings, log_file: str, pid_file: str,
                peers: Iterable[Peer] = ()) -> dict[str, str]:
    """ExaBGP's settings as environment variables (see `exabgp env`). It listens on the
    node's addresses and on every other address a peer is spoken to from."""
    addresses = [local.local_address, local.local_address6, *(p.local_address for p in peers)]
    binds = " ".join(dict.fromkeys(a for a in addresses if a))
    return {
        "exabgp.daemon.user": "root",  # else it drops to nobody and cannot run the API program
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": pid_file,
        "exabgp.api.cli": "false",  # else it wants named pipes in /run/exabgp
        "exabgp.api.ack": "true",
        "exabgp.api.encoder": "json",
        "exabgp.api.compact": "true",  # NLRIs as bare strings: less to write and to parse
        "exabgp.api.respawn": "true",
        "exabgp.reactor.speed": REACTOR_SPEED,
        "exabgp.tcp.bind": binds,
        "exabgp.tcp.port": str(local.listen_port),
        "exabgp.log.destination": log_file,
        "exabgp.log.level": LOG_LEVELS.get(local.log_severity, "INFO"),
        "exabgp.log.network": "true",
        "exabgp.log.reactor": "true",
        "exabgp.log.processes": "false",  # else one line per announced route
        "exabgp.log.statistics": "false",
        "exabgp.log.short": "false",
    }


def write(path: str, text: str) -> None:
    """Write the file atomically, readable by its owner only: it holds the peers' MD5
    passwords. Its directory is made (or made again) 0700, the file 0600 -- also when a
    leftover file or directory had looser modes."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)
