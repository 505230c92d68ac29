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
