"""Fixtures for the datastore tests: a TCP proxy in front of etcd that a test can cut,
to drop the syncer's connection for real, and a private etcd a test may compact."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.lab.etcd_server import EtcdServer, free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; cut() drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        self._spawn(self._accept, lst)

    def cut(self) -> None:
        with self._lock:
            lst, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self.cut()
        for t in self._threads:
            t.join(2)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not lst:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def private_etcd():
    """An etcd of this test's own, for things that affect the whole server (compaction)."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def proxied(private_etcd):
    """(proxy, client through the proxy, direct client) on the private etcd."""
    proxy = TcpProxy(private_etcd.host, private_etcd.client_port)
    via = EtcdClient(EtcdConfig(endpoints=(proxy.endpoint,), prefix="/tortie/", timeout=2.0))
    direct = EtcdClient(EtcdConfig(endpoints=(private_etcd.endpoint,), prefix="/tortie/"))
    try:
        yield proxy, via, direct
    finally:
        via.close()
        direct.close()
        proxy.close()
