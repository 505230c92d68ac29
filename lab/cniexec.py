"""A pod's network set up the way a container runtime does it: the CNI plugin exec'd in
the pod's node namespace with the CNI_* environment and the network config on stdin --
tortie's own plugin, or Debian's ptp/host-local as the reference to measure against."""

from __future__ import annotations

import json
import os

from tortie.errors import DataplaneError, NotFound
from tortie.lab import family, nsutil
from tortie.lab.state import LabState, Pod
from tortie.lab.topology import Plan

REF_CNI_DIR = "/usr/lib/cni"
PTP_SUBNET = "10.66.{i}.0/24"  # the reference plugins' host-local range for node i


def run_plugin(st: LabState, plan: Plan, pod: Pod, command: str, agent_socket: str,
               pool_versions: dict[str, int] | None = None) -> dict:
    """CNI `command` (ADD, DEL, CHECK) for `pod`; its result, or DataplaneError. `agent_socket`:
    the node agent's CNI socket (tortie's plugin only). `pool_versions`: the pod's pools
    with their IP versions (labs with IPv6)."""
    node = next(n for n in plan.nodes if n.name == pod.node)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": nsutil.netns_path(pod.netns),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                    f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id}",
    }
    if st.cni == "ptp":
        index = plan.nodes.index(node) + 1
        config = {
            "cniVersion": "1.0.0", "name": "lab-ptp", "type": "ptp", "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": PTP_SUBNET.format(i=index)}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": os.path.join(st.dir, node.name, "host-local")},
        }
        plugin = os.path.join(REF_CNI_DIR, "ptp")
        env["CNI_PATH"] = REF_CNI_DIR
    else:
        if not st.bin_dir or not os.path.exists(os.path.join(st.bin_dir, "tortie")):
            raise NotFound("the tortie CNI plugin is not installed in this lab "
                           "(tortie.cni.install was missing at `up`)")
        config = {
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
            "agentSocket": agent_socket,
            "args": {"cni": {"labels": pod.labels, **({"ports": pod.ports} if pod.ports else {})}},
        }
        if pod.pool and plan.ip_family == "ipv4":
            config["ipam"] = {"type": "tortie-ipam", "ipv4_pools": [pod.pool]}
        elif plan.ip_family != "ipv4":
            config["ipam"] = family.ipam_config(plan.ip_family, pool_versions)
        plugin = os.path.join(st.bin_dir, "tortie")
        env["CNI_PATH"] = f"{st.bin_dir}:{REF_CNI_DIR}"
    r = nsutil.run(["ip", "netns", "exec", node.netns, plugin], check=False,
                   input=json.dumps(config), env=env, timeout=60)
    out = r.stdout.strip()
    try:
        result = json.loads(out) if out else {}
    except ValueError:
        result = {"msg": out}
    if r.returncode != 0:
        msg = result.get("msg") or r.stderr.strip() or out
        raise DataplaneError(f"CNI {command} {pod.ref} on {node.name} failed "
                             f"(exit {r.returncode}, code {result.get('code')}): {msg} {result.get('details', '')}")
    return result
