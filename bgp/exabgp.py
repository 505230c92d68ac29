"""ExaBGP as a supervised child process: started, restarted with backoff, reloaded, stopped.

Files in its state directory: `exabgp.log`, `exabgp.out` (its stdout/stderr),
`exabgp.pid`. ExaBGP dies with the agent (PR_SET_PDEATHSIG), so a restarted agent can
bind 179; one left behind by a previous run in the same state directory is killed before
a new one starts (it would refuse to start while its pid file names a live process).

Reloads are confirmed in ExaBGP's log and signalled again until they take (5.0.15 drops
SIGUSR1 while routes are queued); if one never takes, ExaBGP is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable

from tortie.log import get_logger
from tortie.process import (
    die_with_parent,  # must not outlive a killed agent: the next one binds 179
)

log = get_logger("bgp")


def exabgp_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "exabgp")
    return here if os.path.exists(here) else (shutil.which("exabgp") or "exabgp")


class ExaBGPProcess:
    """One ExaBGP at a time, reading `conf_path`, run by `supervise()` until `stopping`."""

    def __init__(self, state_dir: str, conf_path: str, binary: str | None = None,
                 backoff: tuple[float, float] = (0.5, 30.0),
                 signalled: Callable[[], None] | None = None) -> None:
        self.state_dir = state_dir
        self.conf_path = conf_path
        self.binary = binary or exabgp_binary()
        self.backoff = backoff
        self.log_path = os.path.join(state_dir, "exabgp.log")
        self.pid_path = os.path.join(state_dir, "exabgp.pid")
        self.out_path = os.path.join(state_dir, "exabgp.out")
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False
        self.reloader: asyncio.Task | None = None
        self._reload_again = False
        # a signal does not cut the reactor's sleep short: this wakes it (bgp.wake)
        self.signalled = signalled or (lambda: None)

    @property
    def pid(self) -> int | None:
        """The pid of the running ExaBGP (None while none runs)."""
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def supervise(self, environment: Callable[[], dict[str, str]], on_spawn: Callable[[], None],
                        on_exit: Callable[[int | None], None]) -> None:
        """Run ExaBGP, restart it when it exits (backoff doubling up to backoff[1], reset after
        a minute of running). `environment()` gives its settings at each start; `on_spawn()` is
        called just before, `on_exit(rc)` after each exit."""
        delay = self.backoff[0]
        while not self.stopping:
            env = dict(os.environ)
            env.update(environment())
            # ExaBGP refuses to start while its pid file names a live process: a killed
            # predecessor not yet reaped, or an unrelated process that reused the pid
            await self._kill_leftover()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_path)
            started = time.monotonic()
            on_spawn()
            with open(self.out_path, "ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    self.binary, self.conf_path, env=env, cwd=self.state_dir,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=die_with_parent, start_new_session=True)
            log.info("exabgp started", pid=self.proc.pid)
            rc = await self.proc.wait()
            on_exit(rc)
            if self.stopping:
                return
            if time.monotonic() - started > 60:
                delay = self.backoff[0]
            log.warning("exabgp exited; restarting", rc=rc, retry_in=delay)
            self.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    def request_reload(self) -> None:
        """Make ExaBGP read its file again (once more if a reload is under way)."""
        if self.reloader is None or self.reloader.done():
            self.reloader = asyncio.create_task(self._reload_until_done(), name="bgp-reload")
        else:
            self._reload_again = True

    async def _reload_until_done(self, attempts: int = 10) -> None:
        """SIGUSR1 until ExaBGP's log shows it reloaded.

        ExaBGP 5.0.15 drops a SIGUSR1 that arrives while any session still has routes
        to send (the signal is re-armed, then the reload skipped), so one signal is not
        enough. If it never takes, restart ExaBGP: the peers keep forwarding over the
        graceful restart, and it reads the file afresh.
        """
        while True:
            self._reload_again = False
            for attempt in range(attempts):
                proc = self.proc
                if proc is None or proc.returncode is not None or self.stopping:
                    return
                offset = _size(self.log_path)
                proc.send_signal(signal.SIGUSR1)
                self.signalled()
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    if b"performing reload" in _tail(self.log_path, offset):
                        break
                else:
                    log.info("exabgp did not reload yet; signalling again", attempt=attempt + 1)
                    continue
                break
            else:
                log.warning("exabgp ignores reloads; restarting it", attempts=attempts)
                if self.proc and self.proc.returncode is None:
                    self.proc.send_signal(signal.SIGTERM)
                return
            if not self._reload_again:
                return

    async def terminate(self) -> None:
        """SIGTERM, then SIGKILL to its process group after 5 s."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            self.signalled()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_path)

    async def _kill_leftover(self) -> None:
        """An ExaBGP left by a previous agent in this state_dir holds the port: stop it."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            return
        if b"exabgp" not in cmdline or self.conf_path.encode() not in cmdline:
            return
        log.warning("stopping exabgp left by a previous run", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}"):
                break
            await asyncio.sleep(0.05)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _tail(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""
