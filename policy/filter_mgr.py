"""NetworkPolicy enforcement: the `inet tortie-filter` table, owned whole by tortie.

Desired state is the table text `policy.netpol` renders for this node; `apply()` writes it
in one atomic `nft -f` transaction only when it differs from what we last wrote (or the
kernel drifted), and deletes the table when no local pod is isolated. `check()` compares
`nft list table` with the listing taken right after our write, so a hand edit marks us
dirty and the next apply restores the table. The same shape as `policy.nat_mgr`.
"""

from __future__ import annotations

from tortie.log import get_logger
from tortie.policy import netpol, nftables

log = get_logger("netpol")


class FilterManager:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.body: str | None = None  # the desired table body; None: no table
        self._written: str | None = None  # nft's listing right after our last write
        self._applied_body: str | None = None
        self.dirty = True
        self.pods = 0

    def on_update(self, f: netpol.Filter) -> None:
        body = netpol.render(f)
        self.pods = len(f.pods)
        if body != self.body:
            self.body = body
            self.dirty = True

    def check(self) -> bool:
        """Compare the kernel with what we wrote; mark dirty on a difference."""
        if nftables.list_table(netpol.FAMILY, netpol.TABLE, self.netns) != self._written:
            self.dirty = True
        return self.dirty

    def apply(self) -> bool:
        if not self.dirty:
            return False
        listing = nftables.list_table(netpol.FAMILY, netpol.TABLE, self.netns)
        if self.body is None:
            if listing is not None:
                nftables.run_nft(nftables.delete_table_script(netpol.FAMILY, netpol.TABLE), self.netns)
        elif listing is None or listing != self._written or self.body != self._applied_body:
            nftables.run_nft(nftables.replace_table_script(netpol.FAMILY, netpol.TABLE, self.body), self.netns)
        self._applied_body = self.body
        self._written = nftables.list_table(netpol.FAMILY, netpol.TABLE, self.netns)
        self.dirty = False
        log.info("filter table applied", isolated_pods=self.pods)
        return True
