"""The lab's pods: each a namespace wired by the CNI plugin exec'd inside its node, as a
container runtime does (`lab.cniexec`), and served on 80/81 by the pod server (`lab.podserver`,
in the control namespace); added, deleted and labelled.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tortie.errors import AlreadyExists, DataplaneError, TortieError
from tortie.lab import cniexec, nsutil, podserver, state, topology
from tortie.lab.state import LabState, Pod
from tortie.lab.teardown import Echo


class LabPods:
    """The pod half of `tortie.lab.cluster.Lab` (a mixin: it uses the lab's `state`, `node`,
    `pod`, `cni_socket`, `_record`, `_env`, `_dsops` and `svc_sync`)."""

    def _install_cni(self, st: LabState, echo: Echo) -> None:
        bin_dir = os.path.join(st.dir, "bin")
        nsutil.run([state.python(), "-m", "tortie.cni.install", "--bin-dir", bin_dir])
        self._record(lambda s: setattr(s, "bin_dir", bin_dir))

    def _start_podserver(self, st: LabState) -> None:
        control = os.path.join(st.dir, "podserver.sock")
        proc = state.spawn(
            "podserver",
            [state.python(), "-m", "tortie.lab.podserver", "--control", control,
             "--state", state.state_path(self.name)],
            log_path=os.path.join(st.dir, "logs", "podserver.log"),
            netns=topology.plan_of(st).ctl_netns, env=self._env())
        self._record(lambda s: s.procs.append(proc))
        for _ in range(200):
            with contextlib.suppress(OSError, DataplaneError, ValueError):
                podserver.request(control, {"op": "list"}, timeout=1.0)
                return
            if state.exited(proc) is not None:
                raise DataplaneError(f"pod server exited; log: {proc.log}")
            time.sleep(0.05)
        raise DataplaneError(f"pod server not answering on {control}; log: {proc.log}")

    def pod_add(self, node: str, ref: str, labels: Mapping[str, str] | None = None,
                pool: str | None = None, ports: Sequence[Mapping[str, Any]] = ()) -> str:
        """Create a pod namespace, wire it with the CNI plugin inside its node, serve 80/81; its IP.
        `ports`: its named container ports ({name, protocol, port}), handed to the CNI
        plugin in args.cni.ports as a runtime would (they become the endpoint's spec.ports)."""
        ns, name = topology.split_pod(ref)
        n = self.node(node)
        netns = topology.pod_netns(self.name, ns, name)
        pod = Pod(namespace=ns, name=name, node=n.name, netns=netns,
                  container_id=uuid.uuid4().hex, labels=dict(labels or {}), pool=pool,
                  ports=[dict(p) for p in ports])

        def claim(s: LabState) -> None:
            if s.phase != "ready":
                raise TortieError(f"lab {self.name} is {s.phase}, not ready")
            if pod.ref in s.pods or nsutil.netns_exists(netns):
                raise AlreadyExists(f"pod {pod.ref} exists in lab {self.name}")
            s.pods[pod.ref] = pod  # recorded before it exists, so teardown finds it

        st = self._record(claim)
        try:
            nsutil.netns_add(netns)
            versions = None  # a dual-stack pod's pools go to their family's list
            if pool and topology.plan_of(st).ip_family != "ipv4":
                versions = self._dsops("pool-versions", *[x for x in pool.split(",") if x])
            result = self._cni(st, pod, "ADD", versions)
            ips = result.get("ips") or []
            if not ips:
                raise DataplaneError(f"CNI ADD for {pod.ref} returned no address: {result}")
            cidrs = sorted((i["address"] for i in ips), key=lambda c: ":" in c)  # IPv4 first
            host_if = next((i.get("name") for i in result.get("interfaces", [])
                            if not i.get("sandbox")), None)
            podserver.request(self._podserver_sock(), {"op": "add", "pod": pod.ref, "netns": netns})
            done = replace(pod, address=cidrs[0].split("/")[0], address_cidr=cidrs[0], host_ifname=host_if,
                           addresses=[c.split("/")[0] for c in cidrs])
            self._record(lambda s: s.pods.__setitem__(pod.ref, done))
        except BaseException:
            self._remove_pod(pod, st)
            raise
        self.svc_sync()
        return done.address or ""

    def pod_del(self, ref: str) -> None:
        pod = self.pod(ref)
        err = self._remove_pod(pod, self.state())
        self.svc_sync()
        if err:
            raise err

    def _remove_pod(self, pod: Pod, st: LabState) -> TortieError | None:
        """Undo a pod step by step, going on past failures; the first error is returned."""
        first: TortieError | None = None
        with contextlib.suppress(OSError, TortieError):
            podserver.request(self._podserver_sock(), {"op": "del", "pod": pod.ref})
        if nsutil.netns_exists(pod.netns):
            try:
                self._cni(st, pod, "DEL")
            except TortieError as exc:
                first = exc
        nsutil.netns_del(pod.netns)
        self._record(lambda s: s.pods.pop(pod.ref, None))
        return first

    def pod_label(self, ref: str, set_labels: Mapping[str, str] | None = None,
                  remove: Sequence[str] = ()) -> dict[str, str]:
        """Set / remove labels on the pod's WorkloadEndpoint (and in the lab's record)."""
        pod = self.pod(ref)
        args = ["label", pod.namespace, pod.name]
        for k, v in (set_labels or {}).items():
            args += ["--set", f"{k}={v}"]
        for k in remove:
            args += ["--remove", k]
        labels = self._dsops(*args)
        self._record(lambda s: s.pods.__setitem__(pod.ref, replace(s.pods[pod.ref], labels=labels))
                     if pod.ref in s.pods else None)
        self.svc_sync()
        return labels

    def wep(self, ref: str) -> dict | None:
        """The pod's WorkloadEndpoint resource from etcd, or None."""
        ns, name = topology.split_pod(ref)
        return self._dsops("wep", ns, name)

    def _podserver_sock(self) -> str:
        return os.path.join(state.lab_dir(self.name), "podserver.sock")

    def _cni(self, st: LabState, pod: Pod, command: str, pool_versions: dict[str, int] | None = None) -> dict:
        """Exec the CNI plugin inside the pod's node namespace, as a container runtime does."""
        return cniexec.run_plugin(st, topology.plan_of(st), pod, command, self.cni_socket(pod.node), pool_versions)
