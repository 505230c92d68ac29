"""The nftables adapter: whole tables written as one atomic `nft -f` transaction, read
back as text, and a netlink subscription that says when anyone changed the ruleset.

tortie owns whole tables (never chains in someone else's table), so "desired" is the
table's full text and a change is `delete table` + `add table` in one transaction: the
kernel swaps it atomically and no packet sees a half-written ruleset.
"""

from __future__ import annotations

import socket
import subprocess

from tortie.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFT = "nft"


def run_nft(script: str, netns: str | None = None) -> str:
    cmd = [NFT, "-f", "-"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataplaneError(f"nft rejected the ruleset: {proc.stderr.strip()}")
    return proc.stdout


def list_table(family: str, name: str, netns: str | None = None) -> str | None:
    """The table as nft prints it, or None when it does not exist."""
    cmd = [NFT, "list", "table", family, name]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def replace_table_script(family: str, name: str, body: str) -> str:
    """One transaction: make sure the table exists, drop it, write it anew."""
    return f"table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{body}}}\n"


def delete_table_script(family: str, name: str) -> str:
    return f"table {family} {name}\ndelete table {family} {name}\n"


def open_monitor_socket() -> socket.socket:
    """A non-blocking netlink socket that receives every nftables ruleset change in this netns.

    The messages themselves are not parsed: any change is a reason to compare our tables
    with what we wrote, which is cheap and catches every kind of edit.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
    sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
    return sock
