"""The speaker's import side: what peers announce, into the RIB, out to the agent.

A part of `BGPSpeaker` kept in its own file (the speaker is one object; this is the half
that faces the routes coming in): UPDATEs and end-of-RIB into `LearnedRoutes`, the
maxPrefixes limit, import filters, route reflection, and handing the table (or its
changes) to the agent once the first one is complete. It reads the speaker's state
(`_peers`, `_state`, `_rib`, `_api`, ...) and is not used on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tortie.bgp import reflection
from tortie.bgp.rib import family_of
from tortie.bgp.updates import import_filter, parse_update
from tortie.errors import DataplaneError
from tortie.log import get_logger

log = get_logger("bgp")

CEASE_MAX_PREFIXES = 1  # Cease, "Maximum Number of Prefixes Reached" (RFC 4486)


class ImportSide:
    # --- the RIB ---------------------------------------------------------------------------

    def _on_update(self, peer: str, message: dict) -> None:
        if "eor" in message:
            family = f"{message['eor'].get('afi')} {message['eor'].get('safi')}"
            st = self._peer_state(peer)
            st.eor.add(family)
            if self._rib.end_of_rib(peer, family):
                self._routes_changed()
            self._maybe_release()
            return
        if peer in self._held:
            return  # what was on its way when we closed the session
        parsed = parse_update(message.get("update") or {}, self.local.router_id, self._cluster_id)
        if parsed is not None and self._rib.update(peer, *parsed):
            self._routes_changed()
        limit = getattr(self._peers.get(peer), "max_prefixes", None)
        if limit and self._rib.count(peer) > limit:
            self._over_limit(peer, limit)

    def _over_limit(self, peer: str, limit: int) -> None:
        """More prefixes than the peer's maxPrefixes (BIRD's `receive limit`, FRR's
        `maximum-prefix`): its routes go at once, the session is closed with Cease 1 and left
        out of ExaBGP's file for `prefix_limit_hold` seconds, then it may come back."""
        received = self._rib.count(peer)
        why = (f"maxPrefixes {limit} exceeded ({received} received): session closed, "
               f"retried after {self.prefix_limit_hold:.0f}s")
        log.warning("bgp peer over its prefix limit", peer=peer, limit=limit, received=received)
        self._held[peer] = why
        st = self._peer_state(peer)
        st.last_error = why
        if self._rib.peer_down(peer, graceful=False):
            self._routes_changed()

        async def shut() -> None:
            with contextlib.suppress(DataplaneError):  # the reload below closes it anyway
                await self._api.send([f"neighbor {peer} teardown {CEASE_MAX_PREFIXES}"])
            await self._apply_quietly()  # its neighbor leaves the file
        self._spawn(shut())
        asyncio.get_running_loop().call_later(self.prefix_limit_hold, self._release_held, peer)

    def _release_held(self, peer: str) -> None:
        if self._held.pop(peer, None) is not None:
            log.info("bgp peer may try again after its prefix limit", peer=peer)
            self._spawn(self._apply_quietly())

    def _accepts(self, peer: str, prefix: str) -> bool:
        return self._peer_filter(peer)(prefix)

    def _peer_filter(self, peer: str) -> Callable[[str], bool]:
        # the peer's filter is compiled once per peer set (set_peers, set_import_pools and
        # set_egress_imports replace these objects, never change them in place); the RIB asks
        # once per update
        made_for = (self._peers, self._import_pools, self._egress_imports)
        if any(a is not b for a, b in zip(self._filters_for, made_for, strict=True)):
            self._filters, self._filters_for = {}, made_for
        f = self._filters.get(peer)
        if f is None:
            f = self._filters[peer] = import_filter(self._peers.get(peer), self._import_pools,
                                                    self._egress_imports.get(peer, frozenset()))
        return f

    # --- route reflection ----------------------------------------------------------------

    @property
    def _cluster_id(self) -> str | None:
        """Set when this node reflects (it has route-reflector clients)."""
        return reflection.cluster_id(self._peers, self.cluster_id, self.local.router_id)

    async def _reconcile_reflection(self) -> None:
        want = reflection.reflection(self._peers, self._state, self._rib, self._cluster_id)
        lines = reflection.reflection_lines(self._reflected, want, self.batch)
        if lines:
            await self._api.send(lines)
            log.info("reflected routes sent", lines=len(lines))

    # --- routes to the agent -----------------------------------------------------------

    def _routes_changed(self) -> None:
        self._status_changed()
        if self._cluster_id is not None and not self._reflect_pending:
            self._reflect_pending = True
            asyncio.get_running_loop().call_soon(self._reflect_soon)
        if self._routes_pending or not (self._routes_released or self._streaming):
            return
        self._routes_pending = True
        asyncio.get_running_loop().call_soon(self._emit_routes)

    def _reflect_soon(self) -> None:
        self._reflect_pending = False
        if self._synced:
            self._spawn(self._apply_quietly())

    def learned_table(self) -> dict[str, tuple[str, ...]]:
        """Every accepted route: prefix -> next hops (ECMP, sorted)."""
        return self._rib.table()

    @property
    def _streaming(self) -> bool:
        return self.on_released is not None and self.on_route_changes is not None

    def _emit_routes(self) -> None:
        self._routes_pending = False
        try:
            if self._streaming:
                changed, removed = self._rib.take_changes()
                if changed or removed:
                    self.on_route_changes(changed, removed)
                return
            if self.on_route_changes is not None and self._full_sent:
                changed, removed = self._rib.take_changes()
                if changed or removed:
                    self.on_route_changes(changed, removed)
                return
            self._rib.take_changes()
            self._full_sent = True
            self.on_routes(self._rib.table())
        except Exception:
            log.exception("on_routes failed")

    def _maybe_release(self) -> None:
        """Release the first table once every established peer sent its end-of-RIB."""
        if self._routes_released:
            return
        for addr in self._peers:
            st = self._state.get(addr)
            if st and st.state == "established" and family_of(addr) not in st.eor:
                return
        if not any(st.state == "established" for st in self._state.values()):
            return  # nothing learned yet: let the settle timer decide
        self._release("end-of-RIB from every established peer")

    def _release(self, why: str) -> None:
        if self._routes_released:
            return
        self._routes_released = True
        log.info("learned routes released to the agent", why=why)
        if self._streaming:
            self._emit_routes()  # what is still queued goes before the release
            try:
                self.on_released()
            except Exception:
                log.exception("on_released failed")
            return
        self._routes_changed()

    async def _settle(self) -> None:
        await asyncio.sleep(self.settle_time)
        self._release(f"settle time {self.settle_time}s")
