"""ExaBGP's API processes: relay its stdin/stdout to the agent's unix socket.

ExaBGP runs this (`python -I -S api_relay.py SOCKET [wake]`); it only moves bytes, so it
uses the C-level modules and starts in a few milliseconds. It exits when either side
closes, which makes ExaBGP respawn it (and the agent sees a fresh connection).

Two roles, one process each:
- relay (default): the API stream itself, commands in and acks and messages out.
- wake: ExaBGP's reactor sleeps between turns unless a descriptor it polls is readable, and
  it polls only the peers' sockets and its API processes' pipes -- not its listening
  socket, a connect in progress, nor the work it still has queued. This process is the
  agent's way to wake it: after `silence-ack` (so nothing comes back), each wake is one
  `#` (a comment: a no-op command) on ExaBGP's stdin. From the agent, one byte at a time:
  `w` wake once, `b` busy (wake every TICK seconds), `i` idle (stop).
"""

import _socket
import fcntl
import os
import select
import sys
import time

TICK = 0.002  # while busy: the reactor's turn when tortie ran it at speed 0.25
FIONREAD = 0x541B


def _connect(path: str, wait: float = 10.0) -> _socket.socket:
    deadline = time.monotonic() + wait
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _deepen(sock: _socket.socket) -> None:
    # ExaBGP writes to us synchronously: while the agent is busy (installing a burst of
    # routes) deep buffers let ExaBGP keep reading BGP instead of blocking on the pipe
    try:
        fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ on stdin: 1 MiB
    except OSError:
        pass
    for opt in (32, _socket.SO_SNDBUF):  # SO_SNDBUFFORCE (root), else capped by wmem_max
        try:
            sock.setsockopt(_socket.SOL_SOCKET, opt, 8 << 20)
            break
        except OSError:
            continue


def relay(sock: _socket.socket) -> int:
    sfd = sock.fileno()
    while True:
        ready, _, _ = select.select([0, sfd], [], [])
        if 0 in ready:
            data = os.read(0, 65536)
            if not data:
                return 0
            sock.sendall(data)
        if sfd in ready:
            data = sock.recv(65536)
            if not data:
                return 0
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]


def _pending() -> int:
    """Bytes in the pipe to ExaBGP that it has not read yet."""
    buf = bytearray(4)
    fcntl.ioctl(1, FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def wake(sock: _socket.socket) -> int:
    os.write(1, b"silence-ack\n")
    sfd = sock.fileno()
    busy = False
    while True:
        ready, _, _ = select.select([0, sfd], [], [], TICK if busy else None)
        kick = busy and not ready
        if 0 in ready and not os.read(0, 65536):  # ExaBGP tells us nothing we need
            return 0
        if sfd in ready:
            data = sock.recv(4096)
            if not data:
                return 0
            kick = kick or b"w" in data
            for c in data:
                if c == 98:  # b
                    busy = True
                elif c == 105:  # i
                    busy = False
        # one wake at a time: a `#` it has not read yet will wake it anyway
        if kick and not _pending():
            os.write(1, b"#\n")


def main() -> int:
    role = sys.argv[2] if len(sys.argv) > 2 else "relay"
    sock = _connect(sys.argv[1])
    if role == "relay":
        _deepen(sock)
    # first line tells the agent which ExaBGP this process belongs to, and its role
    sock.sendall(b"#%s %d\n" % (role.encode(), os.getppid()))
    return wake(sock) if role == "wake" else relay(sock)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, KeyboardInterrupt):
        sys.exit(1)
