"""The IPAMConfig `default` as IPAM uses it: read into a `Config` (an invalid one is
ignored, with a warning), and the document `IPAM.configure` writes (one CAS write). No I/O."""

from __future__ import annotations

import json

from tortie.datastore import resources as res
from tortie.datastore.etcd import KV
from tortie.datastore.ipam_blocks import Config
from tortie.datastore.store import decode
from tortie.errors import TortieError
from tortie.log import get_logger

log = get_logger("ipam")


def read_config(cfg_kv: KV | None) -> Config:
    """The allocation settings of the stored IPAMConfig (the defaults without one)."""
    config = Config()
    if cfg_kv is not None:
        try:
            view = res.IPAMConfig.from_resource(decode(cfg_kv.value, cfg_kv.mod_revision))
            config = Config(view.strict_affinity, view.max_blocks_per_host, view.auto_allocate_blocks)
        except (TortieError, ValueError, KeyError, TypeError) as exc:
            log.warning("invalid IPAMConfig ignored", error=str(exc))
    return config


def changed_config(cur: KV | None, strict_affinity: bool | None, max_blocks_per_host: int | None) -> bytes:
    """The IPAMConfig `default` (created if missing) with the settings given changed, validated."""
    doc = json.loads(cur.value) if cur else {
        "apiVersion": res.API_VERSION, "kind": "IPAMConfig", "metadata": {"name": "default"},
        "spec": {}}
    spec = doc.setdefault("spec", {})
    if strict_affinity is not None:
        spec["strictAffinity"] = bool(strict_affinity)
    if max_blocks_per_host is not None:
        spec["maxBlocksPerHost"] = max_blocks_per_host
    res.validate(decode(json.dumps(doc).encode(), 0))
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
