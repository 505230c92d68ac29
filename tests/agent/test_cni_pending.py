"""The CNI server's record of what a DEL could not finish in etcd: it survives a restart
of the agent and is finished, endpoint first, only while the datastore answers."""

from __future__ import annotations

import asyncio
import contextlib

from tortie.agent.cni_pending import Cleanup, PendingCleanups
from tortie.errors import DatastoreUnavailable


def test_survives_restart_and_finishes_when_etcd_answers(tmp_path):
    path = str(tmp_path / "cni-pending.json")
    up = {"now": False}
    finished: list[str] = []

    @contextlib.asynccontextmanager
    async def lock(_cid):
        yield

    async def main() -> None:
        first = PendingCleanups(path, None, lock, lambda: up["now"])
        first.add(Cleanup("k8s-pod-network.c1", "c1", "eth0", "web", "ns1"))
        first.add(Cleanup("k8s-pod-network.c2", "c2", "eth0", wep=False))

        # the agent restarts: a new record reads the file
        async def finish(item: Cleanup) -> None:
            if item.container_id == "c2" and "c2 refused" not in finished:
                finished.append("c2 refused")
                raise DatastoreUnavailable("etcd unreachable")
            finished.append(item.container_id)
            again.done(item.handle)

        again = PendingCleanups(path, finish, lock, lambda: up["now"])
        assert len(again) == 2 and again.get("k8s-pod-network.c1").pod_name == "web"
        task = asyncio.create_task(again.run())
        again.kick()
        await asyncio.sleep(0.05)
        assert finished == []  # etcd still away: nothing tried
        up["now"] = True
        again.kick()
        for _ in range(100):
            if not again:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        assert finished[0] == "c1" and finished[-1] == "c2" and not again
        assert len(PendingCleanups(path, None, lock, lambda: True)) == 0

    asyncio.run(main())
