"""What the CNI server asks Kubernetes about a pod: its IP pools and its named ports.

`tortie.io/ipv4pools` / `tortie.io/ipv6pools`: a JSON list of pool names or CIDRs, on
the pod, else on its namespace (each family looked up on its own). The ports are the
pod's named container ports (`kube.mirror.pod_ports`), for its WorkloadEndpoint. The CNI
server calls `pod_details` when the agent has a Kubernetes API; it is synchronous and
makes at most two GETs. `core_api_from_env()` gives it the API client the agent's
environment names.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from tortie.errors import DatastoreUnavailable, NotFound, ValidationError
from tortie.kube.mirror import pod_ports

IPV4_POOLS = "tortie.io/ipv4pools"
IPV6_POOLS = "tortie.io/ipv6pools"
_FAMILIES = ((IPV4_POOLS, 4), (IPV6_POOLS, 6))


def api_client(k8s_api: str | None = None, kubeconfig: str | None = None):
    """A `kubernetes.client.ApiClient`: a plain URL (tests, the lab), else a kubeconfig,
    else the in-cluster service account. ValidationError when none of them is there."""
    from kubernetes import client, config

    if k8s_api:
        return client.ApiClient(client.Configuration(host=k8s_api.rstrip("/")))
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    conf = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=conf)
    except config.ConfigException as exc:
        raise ValidationError(f"no Kubernetes API: set TORTIE_K8S_API or KUBECONFIG, or run in a pod ({exc})",
                              field="TORTIE_K8S_API") from None
    return client.ApiClient(conf)


def core_api_from_env(env: Mapping[str, str] | None = None):
    """A CoreV1Api from TORTIE_K8S_API, KUBECONFIG or the in-cluster environment, or None
    when the process has no Kubernetes API configured (the agent then ignores pod pools)."""
    from kubernetes import client

    env = os.environ if env is None else env
    if not (env.get("TORTIE_K8S_API") or env.get("KUBECONFIG") or env.get("KUBERNETES_SERVICE_HOST")):
        return None
    return client.CoreV1Api(api_client(env.get("TORTIE_K8S_API"), env.get("KUBECONFIG")))


class PodDetails(NamedTuple):
    v4_pools: list[str]  # empty: no preference
    v6_pools: list[str]
    ports: list[dict]  # the named container ports, as WorkloadEndpoint spec.ports items


def pod_pools(namespace: str, name: str, api: Any,
              pools: Iterable[Any] | None = None) -> tuple[list[str], list[str]]:
    """(IPv4 pools, IPv6 pools) the pod asks for (see pod_details)."""
    details = pod_details(namespace, name, api, pools)
    return details.v4_pools, details.v6_pools


def pod_details(namespace: str, name: str, api: Any, pools: Iterable[Any] | None = None) -> PodDetails:
    """The pools the pod asks for and its named ports, from one read of the pod (and one
    of its namespace when an annotation is not on the pod).

    `api` is a `kubernetes.client.CoreV1Api`. Entries are returned as written, CIDRs in
    canonical form; with `pools` (IPPool views, or anything with `.name` and `.cidr`),
    a CIDR entry is resolved to the name of the pool with that CIDR. Errors: NotFound
    (no such pod), ValidationError (a malformed annotation; names it), and
    DatastoreUnavailable (the API server cannot be reached: retry later)."""
    pod = _read(lambda: api.read_namespaced_pod(name, namespace), f"pod {namespace}/{name}")
    pod_ann = _annotations(pod)
    ns_ann: Mapping[str, str] | None = None
    by_cidr = {str(ipaddress.ip_network(p.cidr)): p.name for p in pools} if pools is not None else None
    out: list[list[str]] = []
    for key, version in _FAMILIES:
        text = pod_ann.get(key)
        if text is None:
            if ns_ann is None:
                ns_ann = _annotations(_read(lambda: api.read_namespace(namespace), f"namespace {namespace}"))
            text = ns_ann.get(key)
        out.append(parse_pools(text, key, version, by_cidr))
    return PodDetails(out[0], out[1], pod_ports(api.api_client.sanitize_for_serialization(pod)))


def parse_pools(text: str | None, key: str, version: int,
                by_cidr: Mapping[str, str] | None = None) -> list[str]:
    """The entries of one annotation's JSON list (see pod_pools)."""
    if text is None or not text.strip():
        return []
    try:
        items = json.loads(text)
    except ValueError:
        raise ValidationError(f"{text!r} is not a JSON list", field=key) from None
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ValidationError("must be a JSON list of pool names or CIDRs", field=key)
    out = []
    for item in items:
        if "/" not in item:
            out.append(item)
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValidationError(f"{item!r} is neither a pool name nor a CIDR", field=key) from None
        if net.version != version:
            raise ValidationError(f"{item} is not an IPv{version} CIDR", field=key)
        if by_cidr is None:
            out.append(str(net))
        elif str(net) in by_cidr:
            out.append(by_cidr[str(net)])
        else:
            raise ValidationError(f"no IPPool has CIDR {net}", field=key)
    return out


def _read(read, what: str) -> Any:
    # Imported late: only an agent configured with a Kubernetes API needs them.
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            raise NotFound(f"{what} not found in Kubernetes") from None
        raise DatastoreUnavailable(f"kubernetes API: reading {what}: {exc.status} {exc.reason}") from exc
    except (OSError, HTTPError) as exc:
        raise DatastoreUnavailable(f"kubernetes API unreachable reading {what}: {exc}") from exc


def _annotations(obj: Any) -> Mapping[str, str]:
    return (obj.metadata.annotations if obj.metadata else None) or {}


__all__ = ["IPV4_POOLS", "IPV6_POOLS", "PodDetails", "api_client", "core_api_from_env", "parse_pools",
           "pod_details", "pod_pools"]
