"""Pure parts of bgp/: config rendering (checked by ExaBGP's own parser), the learned
RIB with graceful-restart semantics, status formatting."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys

import pytest

from tortie.bgp import config as cfg
from tortie.bgp.peers import Peer
from tortie.bgp.rib import LearnedRoutes
from tortie.bgp.speaker import BGPSpeaker
from tortie.bgp.status import PeerStatus, notification_text, parse, table, to_json
from tortie.errors import ValidationError

LOCAL = cfg.LocalSettings(router_id="10.0.0.1", local_as=64512, local_address="10.0.0.1",
                          local_address6="fd00::1")
PEERS = [Peer("10.0.0.2", 64512, passive=True, name="node:b"),
         Peer("10.0.0.254", 65000, port=1179, password="s3 cret", hold_time=30, kind="global", name="tor"),
         Peer("10.0.0.253", 65000, keepalive=5, kind="node", name="tor2"),
         Peer("fd00::2", 64512)]


def exabgp_validate(path: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "exabgp")
    env = dict(os.environ, **{"exabgp.daemon.user": "root", "exabgp.api.cli": "false"})
    return subprocess.run([exe, "validate", path], capture_output=True, text=True, env=env)


def test_render_is_valid_exabgp_and_deterministic(tmp_path):
    text = cfg.render(PEERS, LOCAL, "/run/x/api.sock")
    assert text == cfg.render(list(reversed(PEERS)), LOCAL, "/run/x/api.sock")
    path = tmp_path / "exabgp.conf"
    path.write_text(text)
    result = exabgp_validate(str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    block = text.split("neighbor 10.0.0.254 {")[1].split("\n}")[0]
    assert "connect 1179;" in block and 'md5-password "s3 cret";' in block and "hold-time 30;" in block
    assert "hold-time 15;" in text.split("neighbor 10.0.0.253 {")[1]  # 3 x keepalive
    assert "passive true;" in text.split("neighbor 10.0.0.2 {")[1].split("}")[0]
    assert "local-address fd00::1;" in text.split("neighbor fd00::2 {")[1]
    assert text.count("manual-eor true;") == 4


def test_log_severity_screen_is_exabgps_log_level(tmp_path):
    """BGPConfiguration.logSeverityScreen (issue 12, finding 6): each of Calico's
    severities becomes a log level ExaBGP takes."""
    path = tmp_path / "exabgp.conf"
    path.write_text(cfg.render(PEERS, LOCAL, "/run/x/api.sock"))
    assert cfg.environment(LOCAL, "log", "pid")["exabgp.log.level"] == "INFO"
    for severity in ("Debug", "Info", "Warning", "Error", "Fatal"):
        local = cfg.LocalSettings(**{**LOCAL.__dict__, "log_severity": severity})
        env = cfg.environment(local, "log", "pid")
        assert env["exabgp.log.level"] == severity.upper().replace("FATAL", "CRITICAL")
        exe = os.path.join(os.path.dirname(sys.executable), "exabgp")
        r = subprocess.run([exe, "validate", str(path)], capture_output=True, text=True,
                           env={**os.environ, **env, "exabgp.log.destination": "stderr"})
        assert r.returncode == 0, r.stdout + r.stderr


def test_invalid_exabgp_config_is_caught_by_validate(tmp_path):
    # the check above can fail: ExaBGP's parser rejects a broken neighbor
    path = tmp_path / "bad.conf"
    path.write_text(cfg.render(PEERS, LOCAL, "/x").replace("peer-as 65000;", "peer-as banana;"))
    assert exabgp_validate(str(path)).returncode != 0


def test_render_refuses_what_exabgp_cannot_hold():
    with pytest.raises(ValidationError):
        cfg.render([Peer("10.0.0.9", 1, password='a"b')], LOCAL, "/x")
    with pytest.raises(ValidationError):
        cfg.render([Peer("fd00::9", 1)], cfg.LocalSettings("10.0.0.1", 1, "10.0.0.1"), "/x")


def test_environment_settings():
    env = cfg.environment(LOCAL, "/s/exabgp.log", "/s/exabgp.pid")
    assert env["exabgp.daemon.user"] == "root" and env["exabgp.api.cli"] == "false"
    assert env["exabgp.tcp.bind"] == "10.0.0.1 fd00::1" and env["exabgp.api.ack"] == "true"
    assert env["exabgp.log.destination"] == "/s/exabgp.log"


def test_rib_ecmp_and_filter():
    rib = LearnedRoutes(lambda peer, prefix: peer != "10.0.0.254" or prefix.startswith("10.50."))
    rib.update("10.0.0.2", {"10.244.1.0/26": "10.0.0.2", "10.244.9.9/32": "10.0.0.2"}, [])
    rib.update("10.0.0.3", {"10.244.1.0/26": "10.0.0.3"}, [])
    rib.update("10.0.0.254", {"10.50.0.0/24": "10.0.0.254", "0.0.0.0/0": "10.0.0.254"}, [])
    assert rib.table() == {"10.244.1.0/26": ("10.0.0.2", "10.0.0.3"), "10.244.9.9/32": ("10.0.0.2",),
                           "10.50.0.0/24": ("10.0.0.254",)}
    assert rib.count("10.0.0.254") == 2  # received, though one is filtered out
    assert rib.accepted("10.0.0.254") == 1 and rib.accepted("10.0.0.2") == 2
    assert rib.update("10.0.0.3", {}, ["10.244.1.0/26"])
    assert not rib.update("10.0.0.3", {}, ["10.244.1.0/26"])  # nothing left to change
    assert rib.table()["10.244.1.0/26"] == ("10.0.0.2",) and rib.accepted("10.0.0.3") == 0
    rib.update("10.0.0.2", {"10.244.1.0/26": "10.0.0.9"}, [])  # a new path: still one route
    assert rib.accepted("10.0.0.2") == 2
    rib.set_filter(lambda *_: True)  # the filter changed: the default route is now accepted
    assert rib.table()["0.0.0.0/0"] == ("10.0.0.254",) and rib.accepted("10.0.0.254") == 2
    rib.drop("10.0.0.254")
    assert set(rib.table()) == {"10.244.1.0/26", "10.244.9.9/32"} and rib.accepted("10.0.0.254") == 0


def test_rib_graceful_restart_keeps_then_sweeps():
    rib = LearnedRoutes()
    rib.update("p", {"10.1.0.0/26": "10.9.9.9", "10.2.0.0/26": "10.9.9.9", "fd00:1::/64": "fd00::9"}, [])
    assert not rib.peer_down("p", graceful=True)  # kept: nothing changes for the agent
    assert rib.is_stale("p") and rib.count("p") == 3
    rib.update("p", {"10.1.0.0/26": "10.9.9.9"}, [])  # re-announced after the restart: fresh
    assert rib.end_of_rib("p", "ipv4 unicast")  # 10.2.0.0/26 was not: gone
    assert set(rib.table()) == {"10.1.0.0/26", "fd00:1::/64"}
    assert rib.is_stale("p")  # the IPv6 route waits for its own end-of-RIB
    assert rib.expire("p") and set(rib.table()) == {"10.1.0.0/26"}
    assert rib.peer_down("p", graceful=False) and rib.table() == {}


def test_status_round_trip_and_table():
    peers = [PeerStatus("10.0.0.2", "mesh", "established", 1000.0, 3, 2, prefixes_filtered=1),
             PeerStatus("10.0.0.254", "global", "down", 990.0, 0, 0, "MD5 mismatch", port=1179)]
    doc, back = parse(to_json("n1", peers, {"router_id": "10.0.0.1"}))
    assert back == peers and doc["node"] == "n1" and doc["router_id"] == "10.0.0.1"
    text = table(back, now=1100.0)
    lines = text.splitlines()
    assert lines[0].split()[:7] == ["PEER", "TYPE", "STATE", "SINCE", "RECEIVED", "FILTERED", "SENT"]
    assert lines[1].split() == ["10.0.0.2", "mesh", "established", "100s", "3", "1", "2"]
    assert lines[2].startswith("10.0.0.254:1179") and lines[2].endswith("MD5 mismatch")
    assert notification_text(4, 0) == "hold timer expired (4/0)"
    assert notification_text(6, 99) == "cease (6/99)"


def test_rib_take_changes_is_the_delta():
    rib = LearnedRoutes()
    rib.update("10.0.0.2", {"10.1.0.0/26": "10.0.0.2", "10.2.0.0/26": "10.0.0.2"}, [])
    rib.take_changes()
    assert rib.take_changes() == ({}, frozenset())
    rib.update("10.0.0.3", {"10.1.0.0/26": "10.0.0.3"}, [])  # a second ECMP leg
    rib.update("10.0.0.2", {}, ["10.2.0.0/26"])
    assert rib.take_changes() == ({"10.1.0.0/26": ("10.0.0.2", "10.0.0.3")}, frozenset({"10.2.0.0/26"}))
    # applying every delta to a copy gives table()
    copy = rib.table()
    rib.update("10.0.0.3", {"10.3.0.0/26": "10.0.0.3"}, ["10.1.0.0/26"])
    changed, removed = rib.take_changes()
    copy.update(changed)
    for p in removed:
        copy.pop(p)
    assert copy == rib.table()


def test_config_with_md5_passwords_is_private(tmp_path):
    """ExaBGP's file holds the peers' MD5 passwords: 0600, in a 0700 directory of its own,
    also over a leftover file and directory with looser modes."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    sp = BGPSpeaker(node_name="n1", router_id="10.0.0.1", local_as=64512, local_address="10.0.0.1",
                    local_address6="fd00::1",
                    state_dir=str(state), on_routes=lambda routes: None)
    conf_dir = os.path.dirname(sp.conf_path)
    os.makedirs(conf_dir, mode=0o755)
    os.chmod(conf_dir, 0o755)
    with open(sp.conf_path, "w") as f:
        f.write("stale\n")
    os.chmod(sp.conf_path, 0o644)
    sp.set_peers(PEERS)
    asyncio.run(sp.apply())  # no ExaBGP yet: only the file is written
    text = open(sp.conf_path).read()
    assert 'md5-password "s3 cret";' in text
    assert stat.S_IMODE(os.stat(sp.conf_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(conf_dir).st_mode) == 0o700
    assert os.path.dirname(conf_dir) == str(state)
    assert sorted(os.listdir(conf_dir)) == ["exabgp.conf"]  # no temporary file left


def test_config_write_is_atomic_and_private(tmp_path):
    path = tmp_path / "d" / "exabgp.conf"
    cfg.write(str(path), "one\n")
    old_umask = os.umask(0)
    try:
        cfg.write(str(path), "two\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "two\n"
    assert (os.stat(path).st_mode & 0o777, os.stat(path.parent).st_mode & 0o777) == (0o600, 0o700)


class _Writer:
    """Stands in for the wake process's connection: what the agent told it."""

    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_waker_busy_while_commands_are_in_flight_or_sessions_settle():
    from tortie.bgp.wake import Waker

    async def run() -> None:
        w, conn = Waker(), _Writer()
        w.attach(conn)
        assert conn.sent == b"i"  # told where it stands on connect
        w.hold()
        w.hold()
        w.release()
        assert conn.sent == b"ib"  # busy until the last batch is acknowledged
        w.release()
        assert conn.sent == b"ibwi"  # then one more turn (to send what it queued), and idle
        w.settle(0.05)
        assert conn.sent.endswith(b"b")
        await asyncio.sleep(0.1)
        assert conn.sent.endswith(b"i") and not w.busy  # the window ends by itself
        w.settle()
        w.settled()  # every session up: at once
        assert conn.sent.endswith(b"bi") and not w.busy
        w.wake()
        assert conn.sent.endswith(b"w")

    asyncio.run(run())
