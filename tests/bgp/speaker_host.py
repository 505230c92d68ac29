"""A BGPSpeaker in a process of its own, driven by JSON lines on stdin (a test program).

ExaBGP must live in the node's network namespace, so the BGP tests run
`ip netns exec NS python tests/bgp/speaker_host.py` and talk to it (`bgphelpers.SpeakerProc`):

    stdin  {"op": "start", "node_name": ..., "router_id": ..., ...}   (BGPSpeaker kwargs)
           {"op": "peers", "peers": [{Peer fields}, ...]}             set_peers + apply
           {"op": "exports", "prefixes": [...], "communities": [...],
            "policies": [{ExportPolicy fields}, ...]}                 set_exports + apply
           {"op": "import_pools", "cidrs": [...]}                      set_import_pools
           {"op": "egress_imports", "imports": {peer: [prefixes]}}     set_egress_imports
           {"op": "status"} | {"op": "stop"}
    stdout {"event": "ready"} | {"event": "routes", "routes": {prefix: [next hops]}, "t": ...}
           {"event": "status", "peers": [...], ...} | {"event": "ok", "op": ...}
           {"event": "egress", "view": {peer: {prefix: next hop}}, "t": ...}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tortie.bgp.messages import ExportPolicy
from tortie.bgp.peers import Peer
from tortie.bgp.speaker import BGPSpeaker


def _emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    speaker: BGPSpeaker | None = None
    _emit({"event": "ready"})
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "start":
            speaker = BGPSpeaker(on_routes=lambda r: _emit(
                {"event": "routes", "t": time.time(), "routes": {p: list(n) for p, n in r.items()}}), **cmd)
            speaker.on_egress_routes = lambda v: _emit({"event": "egress", "t": time.time(), "view": v})
            await speaker.start()
        elif op == "peers":
            assert speaker
            speaker.set_peers(Peer(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
                              for p in cmd["peers"])
            await speaker.apply()
        elif op == "import_pools":
            assert speaker
            speaker.set_import_pools(cmd["cidrs"])
        elif op == "egress_imports":
            assert speaker
            speaker.set_egress_imports(cmd["imports"])
        elif op == "exports":
            assert speaker
            policies = [ExportPolicy(cidr=p["cidr"], peers=None if p.get("peers") is None else frozenset(p["peers"]),
                                     communities=tuple(p.get("communities", ())), prepend=p.get("prepend", 0))
                        for p in cmd.get("policies", ())]
            speaker.set_exports(cmd["prefixes"], cmd.get("communities", ()), policies)
            await speaker.apply()
        elif op == "status":
            assert speaker
            doc = speaker.status_json()
            doc.update(event="status", synced=speaker.synced, rib_ready=speaker.rib_ready)
            _emit(doc)
            continue
        elif op == "stop":
            if speaker:
                await speaker.stop()
            _emit({"event": "ok", "op": op})
            return 0
        _emit({"event": "ok", "op": op, "t": time.time()})
    if speaker:
        await speaker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
