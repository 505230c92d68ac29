"""SysctlManager against a directory laid out like /proc/sys (the kernel's own files are
written by the egress e2e test, in a lab node's namespace)."""

from __future__ import annotations

import pytest

from tortie.errors import DataplaneError
from tortie.routing.messages import SysctlUpdate
from tortie.routing.sysctl_mgr import SysctlManager

ECMP = frozenset({("net/ipv4/fib_multipath_use_neigh", "1"), ("net/ipv4/fib_multipath_hash_policy", "1")})


@pytest.fixture
def root(tmp_path):
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    for name in ("fib_multipath_use_neigh", "fib_multipath_hash_policy"):
        (tmp_path / "net" / "ipv4" / name).write_text("0\n")
    return tmp_path


def value(root, path: str) -> str:
    return (root / path).read_text().strip()


def test_writes_what_differs_repairs_on_resync_and_leaves_what_nobody_wants(root):
    m = SysctlManager(str(root) + "/")
    assert not m.dirty  # nothing wanted: nothing to do
    m.on_update(SysctlUpdate("egress", ECMP))
    assert m.dirty
    m.apply()
    assert value(root, "net/ipv4/fib_multipath_use_neigh") == "1" and not m.dirty
    (root / "net/ipv4/fib_multipath_hash_policy").write_text("0\n")  # changed by hand
    m.resync()
    m.apply()
    assert value(root, "net/ipv4/fib_multipath_hash_policy") == "1"
    m.on_update(SysctlUpdate("egress", frozenset()))
    m.apply()
    assert not m.dirty and value(root, "net/ipv4/fib_multipath_use_neigh") == "1"  # left as it is


def test_a_setting_the_kernel_lacks_is_a_clear_failure(root):
    m = SysctlManager(str(root) + "/")
    m.on_update(SysctlUpdate("egress", frozenset({("net/ipv4/no_such_setting", "1")})))
    with pytest.raises(DataplaneError, match="cannot read net/ipv4/no_such_setting"):
        m.apply()
