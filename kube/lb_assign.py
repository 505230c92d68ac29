"""tortie-controller's load-balancer address assignment (Calico's LoadBalancer IPAM).

A Service of type LoadBalancer that is tortie's (`kube.lb_ipam.ours`) and has no address
gets one from the IPPools with `allowedUses: [LoadBalancer]`, written to Kubernetes as
`status.loadBalancer.ingress` (PUT of the status subresource, guarded by the
resourceVersion read: a 409 is retried on the next pass). The mirror then brings it into
the datastore like any other change, and the nodes serve and announce it. Only the leader
calls `assign`. A Service that asks for what cannot be given (`spec.loadBalancerIP` in no
such pool, every pool full) is logged once per resourceVersion and left without address.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

from tortie.errors import ValidationError
from tortie.kube import lb_ipam
from tortie.log import get_logger

log = get_logger("controller")

Key = tuple[str | None, str]


class LoadBalancerAssigner:
    def __init__(self, core_api: Any) -> None:
        self.core = core_api
        self._refused: dict[Key, str] = {}  # Service -> the resourceVersion we could not serve
        self._retry_at = 0.0  # after a failed write, not before (the API may be away)
        self.assigned = 0

    def assign(self, services: Mapping[Key, dict], pools: Callable[[], list[dict]]) -> bool:
        """Give every waiting Service an address; False if one must be retried."""
        waiting = [(k, s) for k, s in sorted(services.items(), key=lambda kv: str(kv[0]))
                   if lb_ipam.ours(s) and not lb_ipam.assigned(s)
                   and self._refused.get(k) != s["metadata"].get("resourceVersion")]
        if not waiting or time.monotonic() < self._retry_at:
            return True
        have = pools()
        taken = {a for s in services.values() for a in (*lb_ipam.assigned(s), *(s.get("spec") or {}).get("externalIPs", ()))}
        ok = True
        for key, svc in waiting:
            try:
                ip = lb_ipam.choose(svc, have, taken)
            except ValidationError as exc:
                log.warning("no load-balancer address", service=f"{key[0]}/{key[1]}", error=str(exc))
                self._refused[key] = svc["metadata"].get("resourceVersion")
                continue
            if ip is None:
                continue  # no LoadBalancer pool: another load balancer's business
            body = copy.deepcopy(svc)
            body["status"] = {**(body.get("status") or {}), "loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}
            try:
                self.core.replace_namespaced_service_status(key[1], key[0], body, _preload_content=False)
            except Exception as exc:  # 409: changed since read; others: the API is away. Next pass.
                log.info("load-balancer address not written; will retry", service=f"{key[0]}/{key[1]}",
                         error=f"{type(exc).__name__}: {getattr(exc, 'status', '')}")
                ok = False
                self._retry_at = time.monotonic() + 1.0
                continue
            taken.add(ip)
            self.assigned += 1
            log.info("load-balancer address assigned", service=f"{key[0]}/{key[1]}", ip=ip)
        return ok


__all__ = ["LoadBalancerAssigner"]
