"""bench/policy: 250 local endpoints x 100 policies into nftables, from cold and one change at
a time, next to the floor (`nft -f` of the same final ruleset from a file) and kube-router's
way (`ipset restore` + `iptables-restore` of an equivalent ruleset), in the same run.

The agent's policy path, in this process: a real etcd (loopback), the datastore `Syncer`
(snapshot, then watch), the `Calculation`, the `FilterManager` writing the `inet
tortie-filter` table through libnftables into a network namespace of its own. The
endpoints need no interfaces (the table dispatches by interface name), so 250 of them cost
no CNI work; the driver's other managers (routes, NAT, BGP) are not in the timing.

Data: 5 namespaces (labelled), 250 endpoints of one node over them (10 apps, a named
port `http`), 100 policies: 60 Kubernetes NetworkPolicies (pod selectors, namespace
selectors, ipBlocks with except, numeric and named ports), 20 tortie.io/v1
NetworkPolicies and 20 GlobalNetworkPolicies in two tiers (Allow, Deny, Pass, ports,
notNets).

    cold    from the first read of etcd (snapshot) to the whole ruleset in place
    policy  one policy's ports changed: from the etcd write to its chain in place
    label   one pod's app label changed: from the etcd write to every set and chain in place
    floor   `nft -f FILE` of the final table, in a fresh namespace (a forked nft, as an
            operator would load it)
    iptables `ipset restore` + `iptables-restore` of the same policies as ipsets and chains
            (kube-router's model: a chain per policy and per pod, sets of peers), fresh namespace

Targets (issue 10): cold at most 0.5 s and at most 2x the floor; one change at most 50 ms.
A MISS exits 1 and stays reported as a miss.

    python bench/policy/run.py [--changes 10] [--json]

Run as root. The namespaces and etcd are always removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tortie import log
from tortie.agent.calc import Calculation
from tortie.datastore import keys
from tortie.datastore import resources as res
from tortie.datastore.etcd import EtcdClient, EtcdConfig
from tortie.datastore.watch import Snapshot, Syncer
from tortie.lab import nsutil
from tortie.lab.etcd_server import EtcdServer
from tortie.policy import netpol
from tortie.policy.filter_mgr import FilterManager, render
from tortie.policy.messages import EndpointFilterUpdate, PolicyUpdate

NODE = "bench"
PODS, NSS, APPS = 250, 5, 10
COLD_S, COLD_X, CHANGE_S = 0.5, 2.0, 0.05


def _put(client: EtcdClient, prefix: str, kind_key: str, doc: dict) -> None:
    doc = res.validate(doc)
    meta = doc["metadata"]
    client.put(prefix + keys.resource_key(kind_key, meta["name"], meta.get("namespace")), json.dumps(doc))


def wep(i: int, app: int) -> tuple[str, dict]:
    ns = f"ns{i % NSS}"
    return "workloadendpoint", {
        "apiVersion": "tortie.io/v1", "kind": "WorkloadEndpoint",
        "metadata": {"name": f"pod{i}", "namespace": ns, "labels": {"app": f"a{app}", "tier": f"t{i % 3}"}},
        "spec": {"node": NODE, "interfaceName": f"torb{i:04d}", "ipNetworks": [f"10.65.{i // 200}.{i % 200 + 2}/32"],
                 "ports": [{"name": "http", "port": 8000 + i % 3}]}}


def k8s_policy(i: int) -> tuple[str, dict]:
    peers = [{"podSelector": {"matchLabels": {"app": f"a{(i + 1) % APPS}"}}},
             {"namespaceSelector": {"matchLabels": {"team": f"t{i % 2}"}}, "podSelector": {"matchLabels": {"tier": "t1"}}},
             {"ipBlock": {"cidr": f"192.168.{i}.0/24", "except": [f"192.168.{i}.128/25"]}}][: 1 + i % 3]
    ports = [{"port": 80 + i % 5}, {"port": "http"}][: 1 + i % 2]
    return "networkpolicy", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"k{i}", "namespace": f"ns{i % NSS}"},
        "spec": {"podSelector": {"matchLabels": {"app": f"a{i % APPS}"}}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": peers, "ports": ports}],
                 "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}}


def calico_policy(i: int) -> tuple[str, dict]:
    glob = i % 2 == 1
    spec = {"tier": "default" if i % 4 < 2 else "security", "order": i,
            "selector": f"app == 'a{i % APPS}' || tier == 't{i % 3}'",
            "ingress": [{"action": "Deny", "source": {"nets": [f"172.16.{i}.0/24"]}},
                        {"action": "Pass", "source": {"selector": f"app == 'a{(i + 3) % APPS}'"}},
                        {"action": "Allow", "protocol": "TCP", "source": {"selector": "all()", "notNets": ["10.65.1.0/24"]},
                         "destination": {"ports": [443, "8000:8100"]}}]}
    meta = {"name": f"c{i}"} if glob else {"name": f"c{i}", "namespace": f"ns{i % NSS}"}
    return ("globalnetworkpolicy" if glob else "networkpolicy.tortie.io"), {
        "apiVersion": "tortie.io/v1", "kind": "GlobalNetworkPolicy" if glob else "NetworkPolicy", "metadata": meta,
        "spec": spec}


def fill(client: EtcdClient, prefix: str) -> None:
    for n in range(NSS):
        _put(client, prefix, "namespace", {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": f"ns{n}", "labels": {"team": f"t{n % 2}"}}})
    _put(client, prefix, "tier", {"apiVersion": "tortie.io/v1", "kind": "Tier", "metadata": {"name": "security"},
                                  "spec": {"order": 100}})
    for i in range(PODS):
        _put(client, prefix, *wep(i, i % APPS))
    for i in range(60):
        _put(client, prefix, *k8s_policy(i))
    for i in range(40):
        _put(client, prefix, *calico_policy(i))


class PolicyPath:
    """Syncer -> Calculation -> FilterManager, as the agent chains them (one thread here)."""

    def __init__(self, client: EtcdClient, prefix: str, netns: str) -> None:
        self.calc = Calculation(NODE, prefix=prefix)
        self.mgr = FilterManager(netns=netns)
        self.mgr.nft.list_table("inet", "none")  # the libnftables context opened before any timing
        self.syncer = Syncer(client, prefix)
        self.events = self.syncer.iter_events()

    def step(self) -> None:
        """The next datastore event, through to the ruleset (`phases`: seconds in each part)."""
        t0 = time.perf_counter()
        ev = next(self.events)
        t1 = time.perf_counter()
        if isinstance(ev, Snapshot):
            self.calc.on_snapshot(ev.items)
        else:
            self.calc.on_update(ev.key, ev.value)
        for m in self.calc.take_messages():
            if isinstance(m, (PolicyUpdate, EndpointFilterUpdate)):
                self.mgr.on_update(m)
        t2 = time.perf_counter()
        self.mgr.apply()
        self.phases = {"etcd": t1 - t0, "calc": t2 - t1, "nft": time.perf_counter() - t2}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def iptables_files(f: netpol.Filter) -> tuple[str, str]:
    """The same policies in kube-router's shape: an ipset per rule's peers (and named ports),
    a chain per policy (ACCEPT/DROP/RETURN per rule), a chain per pod, FORWARD dispatch."""
    sets, rules = [], ["*filter", ":FORWARD ACCEPT [0:0]"]
    chains = {}
    verdict = {"Allow": "ACCEPT", "Deny": "DROP", "Pass": "RETURN", "Log": "NFLOG"}
    for pi, pol in enumerate(f.policies):
        for direction, allows in (("I", pol.ingress), ("E", pol.egress)):
            chain = f"KR-{direction}{pi}"
            chains[(pol.key, direction)] = chain
            rules.append(f":{chain} - [0:0]")
            for ai, a in enumerate(allows):
                match = ""
                if a.peers is not None:
                    name = f"kr{direction}{pi}r{ai}"
                    sets.append(f"create {name} hash:net family inet")
                    sets += [f"add {name} {n}" for n in (*a.peers, *a.hosts) if ":" not in n]
                    match = f"-m set --match-set {name} {'src' if direction == 'I' else 'dst'} "
                for r in a.ports or [None]:
                    port = "" if r is None else f"-p {r.protocol.lower()} " + (
                        "" if r.low is None else f"--dport {r.low}:{r.high or r.low} ")
                    rules.append(f"-A {chain} {match}{port}-j {verdict[a.action]}")
                if a.named:
                    name = f"kr{direction}{pi}n{ai}"
                    sets.append(f"create {name} hash:ip,port family inet")
                    sets += [f"add {name} {ip},{proto.lower()}:{port}" for ip, proto, port in a.named if ":" not in ip]
                    rules.append(f"-A {chain} {match}-m set --match-set {name} dst,dst -j {verdict[a.action]}")
    for pod in f.pods:
        for direction, keys_, flag in (("I", pod.ingress, "-o"), ("E", pod.egress, "-i")):
            if keys_ is None:
                continue
            chain = f"KP-{direction}-{pod.interface}"
            rules.append(f":{chain} - [0:0]")
            rules += [f"-A {chain} -j {chains[(k, direction)]}" for k in keys_]
            rules += [f"-A {chain} -j DROP", f"-A FORWARD {flag} {pod.interface} -j {chain}"]
    rules.append("COMMIT")
    return "\n".join(sets) + "\n", "\n".join(rules) + "\n"


def load_time(argv_files: list[tuple[list[str], str]]) -> float:
    """Seconds to run the loaders (each fed its file) one after the other in a fresh namespace."""
    ns = f"bench-pol-{uuid.uuid4().hex[:6]}"
    nsutil.netns_add(ns)
    try:
        t0 = time.perf_counter()
        for argv, path in argv_files:
            with open(path) as f:
                r = subprocess.run(["ip", "netns", "exec", ns, *argv], stdin=f, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"bench/policy: {' '.join(argv)} refused the reference ruleset: {r.stderr.strip()}")
        return time.perf_counter() - t0
    finally:
        nsutil.netns_del(ns)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log.configure(level="warning")
    ns = f"bench-pol-{uuid.uuid4().hex[:6]}"
    prefix = f"/bench-{uuid.uuid4().hex[:6]}/"
    out: dict = {}
    with EtcdServer() as etcd, tempfile.TemporaryDirectory() as tmp:
        client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix))
        nsutil.netns_add(ns)
        path = None
        try:
            fill(client, prefix)
            path = PolicyPath(client, prefix, ns)
            out["cold_s"] = timed(path.step)
            out["cold_phases_s"] = path.phases
            final = netpol.compute(NODE, path.calc.state.weps.values(),
                                   [*path.calc.state.policies.values(), *path.calc.state.calico_policies.values(),
                                    *path.calc.state.global_policies.values()],
                                   path.calc.state.namespaces, path.calc.state.tiers)
            out["isolated_pods"], out["policies_used"] = len(final.pods), len(final.policies)
            changes: dict[str, list[float]] = {"policy": [], "label": []}
            for n in range(args.changes):
                kind, doc = k8s_policy(7)
                doc["spec"]["ingress"][0]["ports"] = [{"port": 80 + (n % 7)}, {"port": "http"}]
                t0 = time.perf_counter()
                _put(client, prefix, kind, doc)
                path.step()
                changes["policy"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                _put(client, prefix, *wep(11, (n + 2) % APPS))
                path.step()
                changes["label"].append(time.perf_counter() - t0)
            for name, samples in changes.items():
                out[f"{name}_p50_s"] = statistics.median(samples)
                out[f"{name}_max_s"] = max(samples)
            script = render(netpol.compute(NODE, path.calc.state.weps.values(),
                                           [*path.calc.state.policies.values(),
                                            *path.calc.state.calico_policies.values(),
                                            *path.calc.state.global_policies.values()],
                                           path.calc.state.namespaces, path.calc.state.tiers)) or ""
            nft_file = os.path.join(tmp, "ruleset.nft")
            with open(nft_file, "w") as f:
                f.write(script)
            out["ruleset_lines"] = script.count("\n")
            out["floor_nft_f_s"] = min(load_time([(["nft", "-f", "-"], nft_file)]) for _ in range(3))
            ipsets, iptables = iptables_files(final)
            ipset_file, ipt_file = os.path.join(tmp, "ipset"), os.path.join(tmp, "iptables")
            with open(ipset_file, "w") as f:
                f.write(ipsets)
            with open(ipt_file, "w") as f:
                f.write(iptables)
            out["iptables_rules"] = iptables.count("\n-A ")
            out["iptables_restore_s"] = min(load_time([(["ipset", "restore", "-exist"], ipset_file),
                                                       (["iptables-restore"], ipt_file)]) for _ in range(3))
        finally:
            if path is not None:
                path.syncer.stop()
            nsutil.netns_del(ns)
            client.close()
    misses = []
    if out["cold_s"] > COLD_S:
        misses.append(f"cold {out['cold_s']:.3f} s > {COLD_S} s")
    if out["cold_s"] > COLD_X * out["floor_nft_f_s"]:
        misses.append(f"cold {out['cold_s'] / out['floor_nft_f_s']:.1f}x the nft -f floor > {COLD_X}x")
    for name in ("policy", "label"):
        if out[f"{name}_p50_s"] > CHANGE_S:
            misses.append(f"one {name} change p50 {out[name + '_p50_s'] * 1000:.1f} ms > {CHANGE_S * 1000:.0f} ms")
    out["misses"] = misses
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"bench/policy: {PODS} local endpoints x 100 policies ({out['isolated_pods']} isolated, "
              f"{out['policies_used']} policies in use, {out['ruleset_lines']} lines of nft)")
        print(f"  cold (etcd snapshot to ruleset)  {out['cold_s'] * 1000:8.1f} ms   target <= {COLD_S * 1000:.0f} ms"
              f" and <= {COLD_X:g}x floor")
        print("    of which " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in out["cold_phases_s"].items()))
        print(f"  floor: nft -f of the same table  {out['floor_nft_f_s'] * 1000:8.1f} ms   "
              f"(cold is {out['cold_s'] / out['floor_nft_f_s']:.2f}x)")
        print(f"  iptables-restore + ipset restore {out['iptables_restore_s'] * 1000:8.1f} ms   "
              f"({out['iptables_rules']} rules; kube-router's way, iptables-nft here)")
        for name in ("policy", "label"):
            print(f"  one {name} change (etcd write to ruleset) p50 {out[name + '_p50_s'] * 1000:6.1f} ms, "
                  f"max {out[name + '_max_s'] * 1000:6.1f} ms   target <= {CHANGE_S * 1000:.0f} ms")
        print("  " + ("MISS: " + "; ".join(misses) if misses else "all targets met"))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
