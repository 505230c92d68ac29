"""The status documents agents publish (`status/bgp/<node>`), as `tortiectl` reads them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from tortie.datastore import keys


def live(client, prefix: str, stale_after: float) -> Iterator[tuple[str, dict]]:
    """(node, document) of every node whose agent published within `stale_after` seconds."""
    kvs, _ = client.get_prefix(prefix + keys.BGP_STATUS)
    now = time.time()
    for kv in kvs:
        node = keys.parse_bgp_status(kv.key[len(prefix):])
        try:
            doc = json.loads(kv.value)
        except ValueError:
            continue
        if node and not (doc.get("updated") is not None and now - doc["updated"] > stale_after):
            yield node, doc
