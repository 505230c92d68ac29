"""Taking a lab down: everything it made, from its record and from the naming scheme."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable

from tortie.errors import NotFound
from tortie.lab import nsutil, state, topology
from tortie.lab.state import LabState
from tortie.log import get_logger

log = get_logger("lab")

Echo = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def teardown(name: str, echo: Echo = quiet) -> list[str]:
    """Remove everything of lab `name`: processes, namespaces, data dirs, the state dir.

    Works from the record when there is one and from the naming scheme when there is
    not, and goes on past every failure. Returns what it could not remove (empty = clean).
    """
    topology.check_lab_name(name)
    problems: list[str] = []
    st: LabState | None = None
    with contextlib.suppress(NotFound, ValueError, TypeError, OSError):
        st = state.load(name)
    if st is not None:
        with contextlib.suppress(OSError):
            st.phase = "tearing-down"
            state.save(st)
        # Processes first (agents before etcd, so they do not spin on a vanished datastore).
        for proc in sorted(st.procs, key=lambda p: p.role.partition(":")[0] == "etcd"):
            try:
                state.stop(proc)
            except OSError as exc:
                problems.append(f"stop {proc.role} pid {proc.pid}: {exc}")
            else:
                echo(f"stopped {proc.role} (pid {proc.pid})")
    recorded = set(st.netns) if st else set()
    recorded |= {p.netns for p in st.pods.values()} if st else set()
    found = {n for n in nsutil.netns_list() if topology.is_lab_netns(name, n)}
    # Pods before nodes before the underlay: the reverse of building it.
    order = sorted(recorded | found, key=lambda n: (0 if "-pod-" in n else 1 if "-node" in n else 2, n))
    for ns in order:
        if not nsutil.netns_exists(ns):
            continue
        # Anything still running inside a lab namespace was started by the lab (or its agents).
        for pid in nsutil.netns_pids(ns):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        nsutil.netns_del(ns)
        if nsutil.netns_exists(ns):
            problems.append(f"namespace {ns} still exists")
    if found or recorded:
        echo(f"deleted {len(order)} namespace(s)")
    for d in (st.data_dirs if st else []):
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(state.lab_dir(name), ignore_errors=True)
    if os.path.exists(state.lab_dir(name)):
        problems.append(f"{state.lab_dir(name)} still exists")
    for p in problems:
        log.warning("teardown incomplete", lab=name, problem=p)
    return problems
