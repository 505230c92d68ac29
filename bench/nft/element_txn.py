"""One nftables element transaction: libnftables in-process (what the managers use) vs the
same batch piped to a forked `nft -f -` (what they used before), in a namespace of its own.

Each transaction adds one element to a pod-dispatch verdict map and deletes another (a pod
coming and one going), as the filter manager writes it. Medians and p90 of N runs each,
alternating, so load drift falls on both sides.

Run as root: `python bench/nft/element_txn.py [--runs 200] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid

from tortie.lab import nsutil
from tortie.policy.nftables import Nft

SETUP = """add table inet bench
add chain inet bench pod-a
add map inet bench pods { type ifname : verdict; }
"""


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ns = f"bench-nft-{uuid.uuid4().hex[:6]}"
    nsutil.netns_add(ns)
    try:
        nft = Nft(ns)
        nft.run(SETUP)
        inproc: list[float] = []
        forked: list[float] = []
        for i in range(args.runs):
            txn = (f'add element inet bench pods {{ "veth{i}" : jump pod-a }}\n'
                   f'delete element inet bench pods {{ "veth{i - 1}" }}\n' if i else
                   f'add element inet bench pods {{ "veth{i}" : jump pod-a }}\n')
            if i % 2 == 0:
                t0 = time.perf_counter()
                nft.run(txn)
                inproc.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=txn, text=True,
                                   capture_output=True)
                forked.append(time.perf_counter() - t0)
                if r.returncode:
                    print(r.stderr, file=sys.stderr)
                    return 1
        # The fork without `ip netns exec` in front (an agent inside its namespace forks nft alone).
        bare: list[float] = []
        with nsutil.in_netns(ns):
            for i in range(args.runs // 2):
                txn = f'add element inet bench pods {{ "b{i}" : jump pod-a }}\n'
                t0 = time.perf_counter()
                subprocess.run(["nft", "-f", "-"], input=txn, text=True, capture_output=True, check=True)
                bare.append(time.perf_counter() - t0)
    finally:
        nsutil.netns_del(ns)
    result = {"in_process": summary(inproc), "fork_ip_netns_exec_nft": summary(forked),
              "fork_nft": summary(bare)}
    result["speedup_p50"] = round(result["fork_nft"]["p50_ms"] / result["in_process"]["p50_ms"], 1)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:26} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
