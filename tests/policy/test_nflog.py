"""The NFLOG reader behind `action: Log`: nftables' `log group` in a test namespace, real
packets, one record each with the rule's prefix."""

import subprocess
import sys
import time

from tortie.lab.nsutil import in_netns
from tortie.policy.filter_mgr import _verdict
from tortie.policy.nflog import GROUP, NflogReader

SEND = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(b"x", ("127.0.0.1", 9))
s.sendto(b"x", ("127.0.0.1", 10))
"""


def test_one_record_per_packet_with_the_rules_prefix(netns):
    ns = netns.new("nflog")
    rule = _verdict("Log", "unused", "x/NetworkPolicy:audit in 2")
    assert f"group {GROUP}" in rule
    script = ("add table inet t\n"
              "add chain inet t o { type filter hook output priority 0; }\n"
              f"add rule inet t o udp dport 9 {rule}\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)
    with in_netns(ns):
        reader = NflogReader()
    try:
        netns.run(ns, sys.executable, "-c", SEND)
        records = []
        deadline = time.monotonic() + 2
        while len(records) < 3 and time.monotonic() < deadline:
            records += reader.drain()
            time.sleep(0.05)
        time.sleep(0.2)
        records += reader.drain()
        assert len(records) == 3, records  # port 10 is not logged
        assert {r.prefix for r in records} == {"x/NetworkPolicy:audit in 2:"}
        assert {(r.src, r.dst, r.protocol) for r in records} == {("127.0.0.1", "127.0.0.1", "udp")}
    finally:
        reader.close()
