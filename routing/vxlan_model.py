"""The VXLAN overlay's values: what the calculation (agent.calc_vxlan) sends and the VXLAN
manager (routing.vxlan_mgr) applies. Frozen, so a whole plan compares by value."""

from __future__ import annotations

from dataclasses import dataclass

VXLAN_CLASS = "vxlan"  # the route class of the routes through the overlay
DEVICE = {4: "vxlan.tortie", 6: "vxlan-v6.tortie"}  # Calico: vxlan.calico, vxlan-v6.calico
PORT = 4789  # IANA's VXLAN port
# Outer IP header + UDP 8 + VXLAN 8 + inner Ethernet 14.
OVERHEAD = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}
MODES = ("Never", "Always", "CrossSubnet")


@dataclass(frozen=True, slots=True)
class Device:
    """One VXLAN device: learning off, no remote (every peer is an FDB entry)."""

    name: str
    family: int
    vni: int
    local: str  # this node's underlay address: the outer source
    mac: str
    mtu: int
    address: str  # the node's tunnel address (on the device, host prefix)
    port: int = PORT


@dataclass(frozen=True, slots=True)
class VTEP:
    node: str
    tunnel: str  # tunnel address
    mac: str
    underlay: str  # the node's address: where its VXLAN packets go


@dataclass(frozen=True, slots=True)
class VxlanUpdate:
    """Everything the VXLAN manager owns, whole: the devices (one per family that uses
    VXLAN; none listed: none wanted) and the remote VTEPs each must reach (FDB and
    neighbour entries)."""

    devices: tuple[Device, ...]
    vteps: tuple[tuple[int, VTEP], ...]  # (family, remote VTEP)
