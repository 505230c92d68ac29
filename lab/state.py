"""The lab's record: `/run/tortie-lab/<lab>/state.json`, and the processes it names.

Every command reads the record; every change is a locked read-modify-write that
replaces the file atomically, so concurrent `pod add`s and a crash half way through
`up` both leave a record that `down` can finish from. Processes are recorded with
their start time so `down` never signals a recycled PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from tortie.errors import NotFound
from tortie.log import get_logger

log = get_logger("lab")

RUN_DIR = os.environ.get("TORTIE_LAB_RUN_DIR", "/run/tortie-lab")
STATE_VERSION = 1

# Popen objects of the processes this Python process started, so it can reap them.
_children: dict[int, subprocess.Popen] = {}


def lab_dir(lab: str) -> str:
    return os.path.join(RUN_DIR, lab)


def state_path(lab: str) -> str:
    return os.path.join(lab_dir(lab), "state.json")


@dataclass(frozen=True)
class Proc:
    role: str        # etcd, agent:node1, podserver, ...
    pid: int         # also its process group (started in a new session)
    start: int       # /proc/<pid>/stat starttime, guards against PID reuse
    netns: str | None
    log: str
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    address: str | None = None        # the pod's first address, IPv4 if it has one (no prefix length)
    address_cidr: str | None = None   # as the CNI result gave it
    host_ifname: str | None = None
    pool: str | None = None           # the IPPool the pod asked for (--pool), if any
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[dict] = field(default_factory=list)  # named ports: {name, protocol, port}
    addresses: list[str] = field(default_factory=list)  # every address, IPv4 first (dual-stack labs)

    def address_of(self, version: int) -> str | None:
        """The pod's address of IP version 4 or 6 (None when it has none)."""
        return next((a for a in self.addresses or [self.address] if a and (":" in a) == (version == 6)), None)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class LabState:
    name: str
    dir: str
    tor: str = "none"
    cni: str = "tortie"               # tortie | ptp (the reference plugins, a baseline)
    agent: str = "none"               # agent | cni-server | none
    phase: str = "building"           # building | ready | tearing-down
    plan: dict = field(default_factory=dict)
    netns: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    data_dirs: list[str] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)  # extra agent environment (--agent-env)
    bgp_passwords: dict[str, str] = field(default_factory=dict)  # node -> the routers' MD5 password for it
    router_bfd: bool = False  # the routers run BFD with every node (`router bfd on`)
    reflectors: int = 0  # the last that many nodes are route reflectors, the mesh off
    router_announce: dict[str, list[str]] = field(default_factory=dict)  # router -> prefixes it originates
    etcd_prefix: str = "/tortie/"
    bin_dir: str = ""
    created: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["procs"] = [asdict(p) for p in self.procs]
        d["pods"] = {k: asdict(p) for k, p in self.pods.items()}
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        d = json.loads(text)
        d["procs"] = [Proc(**{**p, "cmd": tuple(p.get("cmd", ()))}) for p in d.get("procs", [])]
        d["pods"] = {k: Pod(**p) for k, p in d.get("pods", {}).items()}
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})

    def proc(self, role: str) -> Proc | None:
        return next((p for p in self.procs if p.role == role), None)


def load(lab: str) -> LabState:
    try:
        with open(state_path(lab)) as f:
            return LabState.from_json(f.read())
    except FileNotFoundError:
        raise NotFound(f"no lab {lab!r} (no {state_path(lab)}); start one with `tortie-lab up`") from None


def save(state: LabState) -> None:
    """Replace state.json atomically (write a temp file, fsync, rename)."""
    path = os.path.join(state.dir, "state.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def lock(lab: str) -> Iterator[None]:
    """An exclusive lock on the lab's record (flock on a file in the lab dir)."""
    os.makedirs(lab_dir(lab), exist_ok=True)
    fd = os.open(os.path.join(lab_dir(lab), "state.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def modify(lab: str) -> Iterator[LabState]:
    """Locked read-modify-write of the record; saved when the block ends without error."""
    with lock(lab):
        st = load(lab)
        yield st
        save(st)


# --- processes -----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2:].split()


def proc_state(pid: int) -> str | None:
    """The process's state letter (R, S, T for stopped, Z, ...), None if it is gone."""
    st = _stat(pid)
    return st[0] if st else None


def start_time(pid: int) -> int:
    st = _stat(pid)
    return int(st[19]) if st else 0


def alive(proc: Proc) -> bool:
    """The recorded process still runs (not a zombie, not a recycled PID)."""
    st = _stat(proc.pid)
    return bool(st) and st[0] != "Z" and int(st[19]) == proc.start


def group_members(pgid: int, not_before: int) -> list[int]:
    """Live processes of process group pgid that started no earlier than our leader."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st and st[0] != "Z" and int(st[2]) == pgid and int(st[19]) >= not_before:
            pids.append(int(entry))
    return pids


def python() -> str:
    """The interpreter the lab runs its Python components with (the one running the lab)."""
    return sys.executable


def log_tail(path: str, lines: int = 15) -> str:
    """The last lines of a process's log ("" if it cannot be read), for an error message."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def spawn(role: str, cmd: Sequence[str], *, log_path: str, netns: str | None = None,
          env: dict[str, str] | None = None) -> Proc:
    """Start cmd in its own process group (inside netns if given), output to log_path."""
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    with open(log_path, "ab") as out:
        p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
    _children[p.pid] = p
    start = 0
    for _ in range(100):  # /proc entry appears with the fork; starttime is then fixed
        start = start_time(p.pid)
        if start:
            break
        time.sleep(0.001)
    log.debug("spawned", role=role, pid=p.pid, netns=netns)
    return Proc(role=role, pid=p.pid, start=start, netns=netns, log=log_path, cmd=tuple(cmd))


def exited(proc: Proc) -> int | None:
    """Exit status if the process has ended (reaping it if it is our child), else None."""
    child = _children.get(proc.pid)
    if child is not None:
        return child.poll()
    return None if alive(proc) else -1


def stop(proc: Proc, grace: float = 5.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process group (SIGTERM), SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 2.0)):
        members = group_members(proc.pid, proc.start) if proc.start else []
        if not members:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen process (etcd pause) acts on it too
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            child = _children.get(proc.pid)
            if child is not None:
                child.poll()
            if not group_members(proc.pid, proc.start):
                break
            time.sleep(0.02)
    child = _children.pop(proc.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(1)
