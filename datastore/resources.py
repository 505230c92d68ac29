"""Resources: the kinds, their validation and the typed views, in one import.

The code that acts on resources imports this module (`from tortie.datastore import
resources as res`; `res.IPPool`, `res.validate`, `res.kind_for`, ...). It is split by concern:

- `datastore.fields`: the validation mini-language (`Fields`, `parse_cidr`, ...);
- `datastore.kinds`: the kinds and their schemas, `validate()`, `kind_for()`;
- `datastore.views`: the typed views (`IPPool`, `Node`, `BGPPeer`, ..., `NetworkPolicy`
  with Kubernetes' matching rules) and `effective_bgp_config`;
- `datastore.store`: `ResourceStore`, which keeps them in etcd (compare-and-swap writes);
- `datastore.keys`: where each one lives (`resources/<kind>/[<namespace>/]<name>`).
"""

from __future__ import annotations

from tortie.datastore.calico_views import VIEWS as _CALICO_VIEWS
from tortie.datastore.calico_views import (
    CalicoNetworkPolicy,
    CalicoRule,
    GlobalNetworkPolicy,
    HostEndpoint,
    Tier,
)
from tortie.datastore.kinds import (
    API_VERSION,
    KINDS,
    Kind,
    key_for,
    kind_for,
    kind_of,
    parse_key,
    split_peer_ip,
    validate,
)
from tortie.datastore.views import (
    DEFAULT_AS,
    VIEWS,
    BGPConfiguration,
    BGPPeer,
    Egress,
    EndpointPort,
    FrozenLabels,
    IPAMConfig,
    IPPool,
    Namespace,
    NetworkPolicy,
    Node,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    PoolBGP,
    View,
    WorkloadEndpoint,
    effective_bgp_config,
)
from tortie.datastore.views_service import Endpoint, EndpointSlice, Service, ServicePort, SlicePort

VIEWS = {**VIEWS, **_CALICO_VIEWS}

__all__ = [
    "API_VERSION", "DEFAULT_AS", "KINDS", "VIEWS", "BGPConfiguration", "BGPPeer", "CalicoNetworkPolicy", "CalicoRule",
    "Egress", "Endpoint", "EndpointPort", "EndpointSlice", "FrozenLabels", "GlobalNetworkPolicy", "HostEndpoint",
    "IPAMConfig", "IPPool", "Kind", "Namespace", "NetworkPolicy", "Node", "PolicyPeer", "PolicyPort", "PolicyRule",
    "PoolBGP", "Service", "ServicePort", "SlicePort", "Tier", "View", "WorkloadEndpoint",
    "effective_bgp_config", "key_for", "kind_for", "kind_of", "parse_key", "split_peer_ip", "validate",
]
