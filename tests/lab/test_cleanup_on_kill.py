"""What a test run or benchmark starts goes when it is stopped from outside: an etcd dies
with the process that started it (even on SIGKILL), and a pytest run stopped by SIGTERM (a
CI or `timeout` deadline) tears its session down as Ctrl-C does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True  # dead, waiting for init to reap it
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _stop(pid: int) -> None:
    if not _gone(pid, 0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_an_etcd_dies_with_the_process_that_started_it():
    code = ("from tortie.lab.etcd_server import EtcdServer; import time\n"
            "e = EtcdServer().start(); print(e.proc.pid, e.data_dir, flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid_s, data_dir = owner.stdout.readline().split()
    pid = int(pid_s)
    try:
        owner.kill()  # SIGKILL: no finalizer runs
        owner.wait()
        assert _gone(pid), "etcd outlived the process that started it"
    finally:
        _stop(pid)
        subprocess.run(["rm", "-rf", data_dir, data_dir + ".log"], check=False)


def test_a_pytest_run_stopped_by_sigterm_stops_its_etcd_and_removes_its_data(tmp_path):
    (tmp_path / "test_sleeps.py").write_text(textwrap.dedent("""
        import time

        def test_sleeps(etcd_server):
            print("ETCD", etcd_server.proc.pid, etcd_server.data_dir, flush=True)
            time.sleep(120)
    """))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-p", "no:cacheprovider",
                            str(tmp_path / "test_sleeps.py")], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": TESTS})
    pid, data_dir = None, None
    try:
        for line in run.stdout:
            if line.startswith("ETCD"):
                pid, data_dir = int(line.split()[1]), line.split()[2]
                break
        assert pid, "the inner run never got its etcd"
        run.send_signal(signal.SIGTERM)
        run.wait(30)
        assert _gone(pid, 0), "etcd left running"
        assert not os.path.exists(data_dir) and not os.path.exists(data_dir + ".log"), "etcd's data left behind"
    finally:
        if run.poll() is None:
            run.kill()
        if pid:
            _stop(pid)


if os.geteuid() != 0:
    pytestmark = pytest.mark.skip(reason="etcd runs as root here")
