"""BFD against itself and against BIRD's, in two namespaces joined by a veth pair."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from tortie.lab.nsutil import in_netns
from tortie.routing import bfd as b

pytestmark = pytest.mark.timeout(60)

A, B = "10.77.0.1", "10.77.0.2"
FAST = b.Timers(min_tx=0.05, min_rx=0.05, multiplier=3)


@pytest.fixture
def pair(netns):
    na, nb = netns.new("bfda"), netns.new("bfdb")
    subprocess.run(["ip", "-n", na, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", nb], check=True)
    for ns, dev, addr in ((na, "va", A), (nb, "vb", B)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    return na, nb


class Watch:
    """A BFD instance started in a namespace, recording its state changes."""

    def __init__(self, ns: str) -> None:
        self.events: list[tuple[float, str, bool]] = []
        self.changed = threading.Event()
        self.bfd = b.BFD(on_change=self._on)
        with in_netns(ns):
            self.bfd.start()

    def _on(self, peer: str, up: bool) -> None:
        self.events.append((time.monotonic(), peer, up))
        self.changed.set()

    def wait(self, peer: str, up: bool, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.events and self.events[-1][1:] == (peer, up):
                return self.events[-1][0]
            self.changed.wait(0.05)
            self.changed.clear()
        raise AssertionError(f"{peer} not {'Up' if up else 'Down'} within {seconds}s: {self.bfd.states()}")


def test_codec_round_trip_and_discards():
    raw = b.encode(b.UP, 0, 3, 7, 9, 0.05, 0.1, poll=True)
    p = b.decode(raw)
    assert (p.state, p.mult, p.my_disc, p.your_disc, p.poll, p.final) == (b.UP, 3, 7, 9, True, False)
    assert p.min_tx == pytest.approx(0.05) and p.min_rx == pytest.approx(0.1)
    assert b.decode(b.encode(b.UP, 0, 3, 7, 0, 1, 1)) is None  # Up with no your-discriminator
    assert b.decode(b.encode(b.DOWN, 0, 0, 7, 0, 1, 1)) is None  # detect multiplier 0
    assert b.decode(b.encode(b.DOWN, 0, 3, 0, 0, 1, 1)) is None  # my-discriminator 0
    assert b.decode(raw[:20]) is None
    assert b.decode(bytes([2 << 5]) + raw[1:]) is None  # version 2


def test_two_speakers_come_up_and_a_silent_peer_is_down_within_its_detection_time(pair):
    na, nb = pair
    wa, wb = Watch(na), Watch(nb)
    try:
        wa.bfd.set_sessions({B: FAST})
        wb.bfd.set_sessions({A: FAST})
        wa.wait(B, True, 5)
        wb.wait(A, True, 5)
        time.sleep(0.5)  # the Poll Sequence moves both to 50 ms
        assert wa.bfd.states()[B]["state"] == "Up"
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", nb, "link", "set", "vb", "down"], check=True)  # the path dies
        down = wa.wait(B, False, 2) - t0
        assert down < 0.5, down  # 3 x 50 ms, plus B's last packet in flight
        assert wa.bfd.states()[B]["diag"] == b.DIAG_DETECT_EXPIRED
        subprocess.run(["ip", "-n", nb, "link", "set", "vb", "up"], check=True)  # and back
        wa.wait(B, True, 5)
        # B ends its session: AdminDown, which A's client is not told of as a failure
        told = len(wa.events)
        wb.bfd.set_sessions({})
        deadline = time.monotonic() + 2
        while wa.bfd.states()[B]["remote_state"] != "AdminDown":
            assert time.monotonic() < deadline, wa.bfd.states()
            time.sleep(0.02)
        time.sleep(0.5)  # past A's detection time
        assert len(wa.events) == told, wa.events[told:]
    finally:
        wa.bfd.stop()
        wb.bfd.stop()


def _bird(ns: str, conf: str, tmp: str) -> subprocess.Popen:
    path = os.path.join(tmp, "bird.conf")
    with open(path, "w") as f:
        f.write(conf)
    return subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", path, "-s", os.path.join(tmp, "bird.ctl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_bird_as_the_peer(pair):
    """BIRD's BFD (protocol bfd, a static neighbour) and ours: Up, and Down within the
    detection time when BIRD dies."""
    na, nb = pair
    conf = ("router id 10.77.0.2;\nprotocol device {}\n"
            "protocol bfd {\n  interface \"vb\" { min rx interval 50 ms; min tx interval 50 ms; multiplier 3; };\n"
            f"  neighbor {A};\n}}\n")
    with tempfile.TemporaryDirectory() as tmp:
        _up_then_down_when_killed(na, _bird(nb, conf, tmp))


def _up_then_down_when_killed(ns: str, peer: subprocess.Popen, check_up=lambda: None) -> None:
    """Our BFD in `ns` comes Up with the peer process (its own process group), and goes
    Down within the detection time once the peer is killed."""
    wa = Watch(ns)
    try:
        wa.bfd.set_sessions({B: FAST})
        wa.wait(B, True, 10)
        time.sleep(0.5)
        check_up()
        t0 = time.monotonic()
        os.killpg(peer.pid, signal.SIGKILL)
        peer.wait()
        down = wa.wait(B, False, 3) - t0
        assert down < 0.5, down
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
            peer.wait()
        wa.bfd.stop()


def test_timers_negotiate_as_rfc_5880_says():
    """Sending at max(our DesiredMinTx, their RequiredMinRx); detection after their
    multiplier x max(our RequiredMinRx, their DesiredMinTx) (RFC 5880 6.8.2, 6.8.4); at
    least 1 s while not Up; a Poll is answered with Final at once."""
    import socket

    bfd = b.BFD()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s = b.Session("10.77.0.2", b.Timers(min_tx=0.05, min_rx=0.05, multiplier=3), 7, sock)
        bfd._sessions[s.peer] = s
        bfd._by_disc[s.my_disc] = s
        assert s.min_tx == b.SLOW  # not Up: 1 s advertised
        peer = b.Packet(0, b.INIT, True, False, 5, 99, 0, 0.2, 0.3)  # slower peer, polling
        bfd._on_packet("10.77.0.2", peer)
        assert s.state == b.UP and s.remote_disc == 99
        assert s.final and s.next_tx == 0.0  # the Poll answered at once, with Final
        assert s.min_tx == 0.05
        assert all(0.75 * 0.3 <= s.tx_interval() <= 0.3 for _ in range(100))  # their RequiredMinRx
        assert s.detect_time() == pytest.approx(5 * 0.2)  # their multiplier x their DesiredMinTx
        assert b.decode(s.packet()).final and not s.final
    finally:
        sock.close()
        os.close(bfd._wake_r)
        os.close(bfd._wake_w)


def test_a_peer_turning_bfd_off_is_not_a_path_failure():
    """RFC 5882 3.2: a session the peer takes AdminDown goes Down, but the client is not
    told (nothing is known about the path); when the peer turns BFD on again and the session
    is Up, there is nothing new to tell either. A real failure after that is told."""
    import socket

    told: list[tuple[str, bool]] = []
    bfd = b.BFD(on_change=lambda peer, up: told.append((peer, up)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s = b.Session("10.77.0.2", FAST, 7, sock)
        bfd._sessions[s.peer] = s
        bfd._by_disc[s.my_disc] = s
        bfd._on_packet(s.peer, b.Packet(0, b.INIT, False, False, 3, 99, 7, 0.05, 0.05))
        assert s.state == b.UP and told == [(s.peer, True)]
        bfd._on_packet(s.peer, b.Packet(b.DIAG_ADMIN_DOWN, b.ADMIN_DOWN, False, False, 3, 99, 7, 0.05, 0.05))
        assert s.state == b.DOWN and told == [(s.peer, True)]
        bfd._on_packet(s.peer, b.Packet(0, b.DOWN, False, False, 3, 99, 7, 0.05, 0.05))
        bfd._on_packet(s.peer, b.Packet(0, b.UP, False, False, 3, 99, 7, 0.05, 0.05))
        assert s.state == b.UP and told == [(s.peer, True)]
        bfd._on_packet(s.peer, b.Packet(0, b.DOWN, False, False, 3, 99, 7, 0.05, 0.05))  # a real Down
        assert s.state == b.DOWN and told == [(s.peer, True), (s.peer, False)]
    finally:
        sock.close()
        os.close(bfd._wake_r)
        os.close(bfd._wake_w)


def test_frr_bfdd_as_the_peer(pair):
    """FRR's bfdd (a static peer with 50 ms timers, zebra beside it) and ours: Up, and Down
    within the detection time when bfdd dies."""
    from tortie.lab import routers

    na, nb = pair
    rdir = tempfile.mkdtemp(prefix="tortie-frr-")  # under /tmp: bfdd runs as `frr`, pytest's tmp_path is 0700
    conf = os.path.join(rdir, "frr.conf")
    with open(conf, "w") as f:
        f.write(f"frr defaults datacenter\nlog file {rdir}/frr.log\nbfd\n peer {A} local-address {B}\n"
                "  receive-interval 50\n  transmit-interval 50\n  detect-multiplier 3\n exit\nexit\n")
    open(os.path.join(rdir, "frr.log"), "a").close()
    routers.frr_prepare_dir(rdir)
    routers.frr_prepare_dir(os.path.join(rdir, "frr.log"))
    frr = subprocess.Popen(["ip", "netns", "exec", nb, *routers.frr_command(rdir, conf, nb, daemons=("bfdd",))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def bfdd_says_up() -> None:
        out = routers.vtysh(nb, rdir, "show bfd peers json").stdout
        assert '"status":"up"' in out.replace(" ", ""), out

    try:
        _up_then_down_when_killed(na, frr, bfdd_says_up)
    finally:
        for d in (rdir, os.path.join("/var/run/frr", nb)):
            shutil.rmtree(d, ignore_errors=True)


def test_one_session_per_address_takes_the_quickest_detection():
    from tortie.routing.bfd import Timers, fastest

    egress = Timers(0.3, 0.3, 3)  # 0.9 s detection
    peer = Timers(0.1, 0.1, 5)  # 0.5 s
    other = Timers(1.0, 1.0, 3)
    assert fastest([("10.0.0.1", egress), ("10.0.0.1", peer), ("10.0.0.2", other)]) == {
        "10.0.0.1": peer, "10.0.0.2": other}
    assert fastest([("10.0.0.1", peer), ("10.0.0.1", egress)]) == {"10.0.0.1": peer}  # order does not matter
    assert fastest([("a", Timers(0.5, 0.3, 3)), ("a", Timers(0.2, 0.3, 3))]) == {"a": Timers(0.2, 0.3, 3)}
