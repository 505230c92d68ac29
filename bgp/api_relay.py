"""ExaBGP's API process: relays its stdin/stdout to the agent's unix socket.

ExaBGP runs this (`python -I -S api_relay.py SOCKET`); it only moves bytes, so it uses
the C-level modules and starts in a few milliseconds. It exits when either side closes,
which makes ExaBGP respawn it (and the agent sees a fresh connection).
"""

import _socket
import fcntl
import os
import select
import sys
import time


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


def main() -> int:
    sock = _connect(sys.argv[1])
    _deepen(sock)
    # first line tells the agent which ExaBGP this relay belongs to
    sock.sendall(b"#relay %d\n" % os.getppid())
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, KeyboardInterrupt):
        sys.exit(1)
