"""The BGP export manager: the dataplane driver's owner of what this node announces.

It keeps the desired exports and speaker settings (from `bgp.messages`) on the driver
thread and, on apply, hands a copy to the speaker, which lives on the agent's event loop
(ExaBGP's API stream is asyncio): the push runs there and the driver waits for it. The
driver applies this manager after the routes, so a block is announced only once its
blackhole is in the kernel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tortie.errors import DataplaneError

from .messages import BGPConfigUpdate, ExportDelta


class SpeakerChanged:
    """Sent when the agent (re)starts its speaker: everything is pushed to the new one."""


class BGPExportManager:
    name = "bgp"

    def __init__(self, loop: asyncio.AbstractEventLoop, speaker: Callable[[], Any],
                 timeout: float = 30.0) -> None:
        self._loop = loop
        self._speaker = speaker  # () -> the running BGPSpeaker, or None
        self.timeout = timeout
        self.exports: set[str] = set()
        self.config: BGPConfigUpdate | None = None
        self._dirty = False

    @property
    def dirty(self) -> bool:
        return self._dirty

    def on_update(self, msg: object) -> None:
        if isinstance(msg, ExportDelta):
            self.exports -= msg.removed
            self.exports |= msg.added
            self._dirty = True
        elif isinstance(msg, BGPConfigUpdate):
            self.config = msg
            self._dirty = True
        elif isinstance(msg, SpeakerChanged):
            self._dirty = True

    def resync(self) -> None:
        self._dirty = True  # the speaker diffs against what ExaBGP holds itself

    def apply(self) -> None:
        speaker, config = self._speaker(), self.config
        if speaker is None or config is None:
            self._dirty = False  # nothing to talk to yet; SpeakerChanged brings us back
            return
        exports = frozenset(self.exports)

        async def push() -> None:
            speaker.set_peers(config.peers)
            speaker.set_import_pools(config.import_pools)
            speaker.set_exports(exports, config.communities, config.policies)
            await speaker.apply()

        self._dirty = False
        try:
            asyncio.run_coroutine_threadsafe(push(), self._loop).result(self.timeout)
        except Exception as exc:
            self._dirty = True
            raise DataplaneError(f"BGP speaker did not take the exports: {exc or type(exc).__name__}") from exc
