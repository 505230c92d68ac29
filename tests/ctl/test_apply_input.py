"""Issue 12, finding 2: hostile input to `tortiectl apply` is one line of error and no
change to the datastore -- not a traceback."""

from __future__ import annotations

import json

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


def _egress_pool(egress: dict) -> str:
    return json.dumps({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "egress-pool"},
                       "spec": {"cidr": "10.78.0.0/16", "egress": {"table": 201, **egress}}})


@pytest.mark.parametrize("egress, field, words", [
    ({"nextHop": "nope"}, "spec.egress.nextHop", "not an IP address"),
    ({"nextHops": []}, "spec.egress.nextHops", "at least one next hop"),
    ({"nextHops": [{"address": "10.99.101.1", "bfd": {"minTx": 5}}]}, "spec.egress.nextHops[0].bfd.minTx",
     "between 10 and 60000"),
    ({"nextHops": [{"address": "10.99.101.1", "bfd": {"minRx": "9ms"}}]}, "spec.egress.nextHops[0].bfd.minRx",
     "between 10 and 60000"),
    ({"fromPeers": "router == "}, "spec.egress.fromPeers", "selector"),
    ({"fromPeers": "has(router", "prefixes": ["0.0.0.0/0"]}, "spec.egress.fromPeers", "selector"),
    ({"fromPeers": "all()", "prefixes": ["default"]}, "spec.egress.prefixes[0]", "not a CIDR"),
    ({"fromPeers": "all()", "prefixes": ["::/0"]}, "spec.egress.prefixes[0]", "not an IPv4 prefix"),
    ({"fromPeers": "all()", "prefixes": "0.0.0.0/0"}, "spec.egress.prefixes", "must be a list"),
    ({"fromPeers": "all()", "nextHop": "10.99.101.1"}, "spec.egress.fromPeers", "not both"),
    ({"prefixes": ["0.0.0.0/0"], "nextHop": "10.99.101.1"}, "spec.egress.prefixes", "needs fromPeers"),
])
def test_bad_egress_is_one_line_naming_the_field(ctl, etcd, tmp_path, egress, field, words):
    """Issue 11's bad-input line: a next hop that is not an address, an empty nextHops list,
    a BFD interval under 10 ms, a fromPeers selector that does not parse, prefixes that are
    not CIDRs or of the other family: one line naming the field, nothing stored."""
    path = tmp_path / "pool.json"
    path.write_text(_egress_pool(egress))
    err = _refused(ctl, etcd, path, words)
    assert f"{field}:" in err, err


def test_bgp_peer_bfd_interval_under_10ms_is_refused(ctl, etcd, tmp_path):
    path = tmp_path / "peer.yaml"
    path.write_text("apiVersion: tortie.io/v1\nkind: BGPPeer\nmetadata:\n  name: tor1\nspec:\n"
                    "  peerIP: 10.99.101.1\n  asNumber: 65000\n  bfd:\n    minRx: 5ms\n")
    _refused(ctl, etcd, path, "spec.bfd.minRx:", "between 10 and 60000")
