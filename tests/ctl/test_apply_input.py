"""Issue 12, finding 2: hostile input to `tortiectl apply` is one line of error and no
change to the datastore -- not a traceback."""

from __future__ import annotations

import pytest

POOL = ("apiVersion: tortie.io/v1\nkind: IPPool\nmetadata:\n  name: café-pool\n"
        "spec:\n  cidr: 10.77.0.0/16\n")


def _snapshot(etcd) -> dict:
    kvs, _ = etcd.get_prefix(etcd.config.prefix)
    return {kv.key: kv.value for kv in kvs}


def _refused(ctl, etcd, path, *words: str) -> str:
    before = _snapshot(etcd)
    rc, out, err = ctl("apply", "-f", str(path))
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("tortiectl: "), err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert _snapshot(etcd) == before
    return err


def test_latin1_file_is_refused_by_name(ctl, etcd, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(POOL.replace("café-pool", "pool-café").encode("latin-1"))
    _refused(ctl, etcd, path, "latin1.yaml", "not UTF-8", "0xe9", "save it as UTF-8")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_file_with_a_byte_order_mark_is_read(ctl, etcd, tmp_path, encoding):
    path = tmp_path / "bom.yaml"
    path.write_bytes(POOL.replace("café-pool", "bom-pool").encode(encoding))
    assert "created" in ctl.ok("apply", "-f", str(path))
    assert ctl.json("get", "ippool", "bom-pool")["spec"]["cidr"] == "10.77.0.0/16"


def test_utf16_with_a_broken_tail_is_refused(ctl, etcd, tmp_path):
    path = tmp_path / "broken16.yaml"
    path.write_bytes(POOL.encode("utf-16") + b"\x00\xd8")  # a lone surrogate
    _refused(ctl, etcd, path, "not UTF-16")


@pytest.mark.parametrize("shape", ["block", "flow"])
def test_document_nested_ten_thousand_deep(ctl, etcd, tmp_path, shape):
    path = tmp_path / "deep.yaml"
    if shape == "flow":
        path.write_text("apiVersion: tortie.io/v1\nkind: IPPool\nmetadata: {name: deep}\nspec: "
                        + "[" * 10_000 + "]" * 10_000 + "\n")
    else:
        path.write_text("".join("  " * i + "a:\n" for i in range(10_000)))
    _refused(ctl, etcd, path, "deep.yaml", "nested too deeply")


def test_two_megabyte_annotation(ctl, etcd, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(POOL.replace("café-pool", "big") .replace(
        "  name: big\n", "  name: big\n  annotations:\n    note: " + "x" * (2 << 20) + "\n"))
    _refused(ctl, etcd, path, "metadata.annotations", "at most 262144")


def test_annotations_over_256_kib_in_all(ctl, etcd, tmp_path):
    notes = "".join(f"    n{i}: {'y' * 60_000}\n" for i in range(5))
    path = tmp_path / "many.yaml"
    path.write_text(POOL.replace("café-pool", "many").replace("  name: many\n",
                                                              "  name: many\n  annotations:\n" + notes))
    _refused(ctl, etcd, path, "metadata.annotations")


def test_resource_over_one_mib(ctl, etcd, tmp_path):
    nets = "".join(f"    - 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/32\n" for i in range(90_000))
    path = tmp_path / "huge.yaml"
    path.write_text("apiVersion: tortie.io/v1\nkind: WorkloadEndpoint\nmetadata:\n  name: huge\n"
                    "spec:\n  node: n1\n  ipNetworks:\n" + nets)
    _refused(ctl, etcd, path, "bytes stored", "at most 1048576")


def _pool_doc(name: str, cidr: str, extra: str = "") -> str:
    return f"apiVersion: tortie.io/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n{extra}"


EGRESS = "  egress:\n    table: 100\n    nextHop: 192.168.5.1\n    address: {}\n"


@pytest.mark.parametrize(("extra", "words"), [
    (EGRESS.format("not-an-ip"), ("spec.egress.address", "is not an IP address")),
    (EGRESS.format("fd00::5"), ("spec.egress.address", "is not an IPv4 address")),
    (EGRESS.format("10.78.3.4"), ("spec.egress.address", "inside the pool's own range")),
    ("  bgp:\n    peers: \"router == \"\n", ("spec.bgp.peers",)),
    ("  bgp:\n    peers: \"has(\"\n", ("spec.bgp.peers",)),
    ("  bgp:\n    communities: [\"65000\"]\n", ("spec.bgp.communities[0]", "is not a community")),
    ("  bgp:\n    communities: [\"65000:70000\"]\n", ("spec.bgp.communities[0]", "0-65535")),
    ("  bgp:\n    communities: [\"1:2:4294967296\"]\n", ("spec.bgp.communities[0]",)),
    ("  bgp:\n    communities: [\"1:2:3:4\"]\n", ("spec.bgp.communities[0]",)),
    ("  bgp:\n    communities: \"65000:1\"\n", ("spec.bgp.communities", "must be a list")),
    ("  bgp:\n    asPathPrepend: 11\n", ("spec.bgp.asPathPrepend", "between 0 and 10")),
    ("  bgp:\n    asPathPrepend: -1\n", ("spec.bgp.asPathPrepend",)),
    ("  bgp:\n    asPathPrepend: \"2\"\n", ("spec.bgp.asPathPrepend", "integer")),
    ("  bgp:\n    prefer: tor1\n", ("spec.bgp.prefer", "unknown field")),
])
def test_bad_egress_address_and_pool_bgp_are_refused_by_field(ctl, etcd, tmp_path, extra, words):
    path = tmp_path / "pool.yaml"
    path.write_text(_pool_doc("p", "10.78.0.0/16", extra))
    _refused(ctl, etcd, path, *words)


def test_egress_address_inside_another_pool_is_refused_both_ways(ctl, etcd, tmp_path):
    ctl.ok("apply", "-f", ctl.file(_pool_doc("other", "10.79.0.0/16", EGRESS.format("192.0.2.7"))))
    path = tmp_path / "pool.yaml"
    path.write_text(_pool_doc("p", "10.78.0.0/16", EGRESS.format("10.79.0.9")))
    _refused(ctl, etcd, path, "spec.egress.address", "inside IPPool 'other'")
    # a new pool may not take in another pool's egress address either
    path.write_text(_pool_doc("q", "192.0.2.0/24"))
    _refused(ctl, etcd, path, "spec.cidr", "egress address of IPPool 'other'")
    # what is valid is stored as given
    ctl.ok("apply", "-f", ctl.file(_pool_doc("p", "10.78.0.0/16", EGRESS.format("192.0.2.8") + (
        "  bgp:\n    peers: router == 'tor1'\n    communities: ['65010:7', '65010:1:2']\n    asPathPrepend: 2\n"))))
    spec = ctl.json("get", "ippool", "p")["spec"]
    assert spec["egress"]["address"] == "192.0.2.8"
    assert spec["bgp"] == {"peers": "router == 'tor1'", "communities": ["65010:7", "65010:1:2"], "asPathPrepend": 2}
