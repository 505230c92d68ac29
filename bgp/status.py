"""Peer status: what `tortiectl node status` shows, and why a down peer is down.

The speaker publishes a list of PeerStatus; the agent stores `json.dumps(status_json())`
(a `document()`) in etcd at `<prefix>` + `datastore.keys.bgp_status_key(node)`; the CLI reads it back with
`parse()` and prints `table()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

# BGP NOTIFICATION (code, subcode) -> what a person wants to read (RFC 4271, 4486)
_NOTIFICATIONS = {
    (1, 0): "message header error",
    (2, 0): "OPEN message error",
    (2, 2): "bad peer AS",
    (2, 3): "bad BGP identifier",
    (2, 6): "unacceptable hold time",
    (2, 7): "unsupported capability",
    (3, 0): "UPDATE message error",
    (4, 0): "hold timer expired",
    (5, 0): "finite state machine error",
    (6, 0): "cease",
    (6, 2): "administrative shutdown",
    (6, 3): "peer de-configured",
    (6, 4): "administrative reset",
    (6, 5): "connection rejected",
    (6, 6): "other configuration change",
    (6, 7): "connection collision resolution",
    (6, 10): "BFD down",  # RFC 9384
}


def notification_text(code: int, subcode: int) -> str:
    text = _NOTIFICATIONS.get((code, subcode)) or _NOTIFICATIONS.get((code, 0)) or "notification"
    return f"{text} ({code}/{subcode})"


@dataclass(frozen=True)
class PeerStatus:
    peer: str  # address
    kind: str  # mesh | global | node | reflector | rr-client
    state: str  # idle | connect | established | down
    since: float  # epoch seconds of the last state change
    prefixes_received: int = 0
    prefixes_sent: int = 0
    last_error: str = ""
    name: str = ""  # the node or BGPPeer behind it
    port: int = 179
    passive: bool = False
    stale: bool = False  # its routes are kept over a graceful restart
    prefixes_filtered: int = 0  # received, and refused by the import filter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerStatus:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def document(node: str, peers: Iterable[PeerStatus], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status document an agent publishes (JSON-ready)."""
    doc = {"node": node, "updated": time.time(), "peers": [p.to_dict() for p in peers]}
    doc.update(extra or {})
    return doc


def to_json(node: str, peers: Iterable[PeerStatus], extra: Mapping[str, Any] | None = None) -> str:
    return json.dumps(document(node, peers, extra), sort_keys=True)


def parse(text: str | bytes) -> tuple[dict[str, Any], list[PeerStatus]]:
    doc = json.loads(text)
    return doc, [PeerStatus.from_dict(p) for p in doc.get("peers", ())]


def _ago(since: float, now: float) -> str:
    secs = max(0, int(now - since))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def table(peers: Iterable[PeerStatus], now: float | None = None) -> str:
    """Aligned text, one row per peer; the reason column is empty for a healthy peer."""
    now = time.time() if now is None else now
    rows = [("PEER", "TYPE", "STATE", "SINCE", "RECEIVED", "FILTERED", "SENT", "INFO")]
    for p in peers:
        address = p.peer if p.port == 179 else f"{p.peer}:{p.port}"
        info = p.last_error if p.state != "established" else ("stale routes kept" if p.stale else "")
        rows.append((address, p.kind, p.state, _ago(p.since, now), str(p.prefixes_received),
                     str(p.prefixes_filtered), str(p.prefixes_sent), info))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)).rstrip() + ("  " + r[-1] if r[-1] else "")
        for r in rows)
