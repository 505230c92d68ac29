"""BFD against itself and against BIRD's, in two namespaces joined by a veth pair."""

from __future__ import annotations

import os
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
        wb.bfd.set_sessions({})  # B stops talking (as a dead router would)
        down = wa.wait(B, False, 2) - t0
        assert down < 0.5, down  # 3 x 50 ms, plus B's last packet in flight
        assert wa.bfd.states()[B]["diag"] == b.DIAG_DETECT_EXPIRED
        wb.bfd.set_sessions({A: FAST})  # and back
        wa.wait(B, True, 5)
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
    wa = Watch(na)
    with tempfile.TemporaryDirectory() as tmp:
        bird = _bird(nb, conf, tmp)
        try:
            wa.bfd.set_sessions({B: FAST})
            wa.wait(B, True, 10)
            time.sleep(0.5)
            t0 = time.monotonic()
            os.killpg(bird.pid, signal.SIGKILL)
            bird.wait()
            down = wa.wait(B, False, 3) - t0
            assert down < 0.5, down
        finally:
            if bird.poll() is None:
                os.killpg(bird.pid, signal.SIGKILL)
                bird.wait()
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
