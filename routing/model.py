"""Values of the routing layer: routes and policy-routing rules, as frozen slotted dataclasses.

tortie marks every route it writes with its own route protocol number, ``TORTIE_PROTO``
(77, shown by iproute2 as ``proto 77``; give it a name with a line ``77 tortie`` in
``/etc/iproute2/rt_protos.d/tortie.conf``). 77 is free in iproute2's reserved list (bird is
12, bgp 186, ...). The managers only ever read, change or delete routes carrying it.

Values are normalized on construction (canonical CIDR, sorted gateways, concrete scope and
metric) so that a desired route compares equal to the same route read back from the kernel.
Per-route memory matters (tens of thousands of routes): slots, strings and small tuples.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from tortie.errors import ValidationError

TORTIE_PROTO = 77

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

MAIN_TABLE = 254
# The kernel's default metric for IPv6 routes that do not name one; IPv4's is 0.
_DEFAULT_METRIC = {AF_INET: 0, AF_INET6: 1024}
_HOST_LEN = {AF_INET: 32, AF_INET6: 128}

ROUTE_TYPES = ("unicast", "blackhole")
SCOPES = ("universe", "link", "host")


def family_of(addr: str) -> int:
    return AF_INET6 if ":" in addr else AF_INET


def normalize_ip(addr: str, family: int | None = None) -> str:
    """The canonical text of one address ("10.0.0.1", "fd00::1")."""
    fam = family or family_of(addr)
    try:
        return socket.inet_ntop(fam, socket.inet_pton(fam, addr))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"not an IP address: {addr!r}", field="address") from exc


def normalize_cidr(cidr: str) -> str:
    """Canonical "addr/len" with host bits cleared; a bare address becomes a host prefix.

    Done with inet_pton rather than ipaddress: it runs for every route of a 50k set.
    """
    addr, _, plen_s = cidr.partition("/")
    fam = family_of(addr)
    try:
        packed = socket.inet_pton(fam, addr)
        plen = int(plen_s) if plen_s else _HOST_LEN[fam]
    except (OSError, ValueError) as exc:
        raise ValidationError(f"not a CIDR: {cidr!r}", field="dst") from exc
    bits = _HOST_LEN[fam]
    if not 0 <= plen <= bits:
        raise ValidationError(f"bad prefix length in {cidr!r}", field="dst")
    if plen < bits:
        n = int.from_bytes(packed, "big") & ~((1 << (bits - plen)) - 1)
        packed = n.to_bytes(bits // 8, "big")
    return f"{socket.inet_ntop(fam, packed)}/{plen}"


@dataclass(frozen=True, slots=True)
class Route:
    """One kernel route. Its key is (family, table, dst): one route per destination per table;
    ECMP lives in ``gateways`` (several = multipath over them, all through ``dev`` if given).

    ``scope`` None means link for an IPv4 device route without gateway, universe otherwise
    (IPv6 routes are always universe: IPv6 has no route scopes).
    ``metric`` None means the kernel's default for the family (0 for IPv4, 1024 for IPv6).
    """

    dst: str
    table: int = MAIN_TABLE
    type: str = "unicast"
    dev: str | None = None
    gateways: tuple[str, ...] = ()
    scope: str | None = None
    onlink: bool = False
    src: str | None = None
    metric: int | None = field(default=None)

    def __post_init__(self) -> None:
        # Runs for every route of a 50k set: cheap checks first, no ipaddress.
        dst = normalize_cidr(self.dst)
        fam = AF_INET6 if ":" in dst else AF_INET
        type_ = self.type
        if type_ != "unicast" and type_ != "blackhole":
            raise ValidationError(f"route type must be one of {ROUTE_TYPES}", field="type")
        if not 0 < self.table < 2**32 or self.table in (253, 255):
            raise ValidationError(f"table {self.table} is not usable", field="table")
        gws = self.gateways
        if gws:
            gws = tuple(sorted({normalize_ip(g, fam) for g in gws}))
            if len(gws) != len(self.gateways):
                raise ValidationError("duplicate gateway", field="gateways")
        elif type(gws) is not tuple:
            gws = ()
        if type_ == "blackhole":
            if gws or self.dev:
                raise ValidationError("a blackhole route has no device or gateway", field="type")
        elif not gws and not self.dev:
            raise ValidationError("a unicast route needs a device or a gateway", field="dev")
        scope = self.scope
        if fam == AF_INET6:
            scope = "universe"  # IPv6 has no route scopes; the kernel reports universe
        elif scope is None:
            scope = "link" if self.dev and not gws and type_ == "unicast" else "universe"
        elif scope not in SCOPES:
            raise ValidationError(f"scope must be one of {SCOPES}", field="scope")
        s = _ROUTE_SET
        s["dst"](self, dst)
        s["gateways"](self, gws)
        s["scope"](self, scope)
        if self.src:
            s["src"](self, normalize_ip(self.src, fam))
        if self.metric is None:
            s["metric"](self, _DEFAULT_METRIC[fam])

    @property
    def family(self) -> int:
        return AF_INET6 if ":" in self.dst else AF_INET

    @property
    def key(self) -> tuple[int, int, str]:
        dst = self.dst
        return (AF_INET6 if ":" in dst else AF_INET, self.table, dst)

    def __str__(self) -> str:
        parts = [self.dst] if self.type == "unicast" else ["blackhole", self.dst]
        if len(self.gateways) == 1:
            parts += ["via", self.gateways[0]]
        if self.dev:
            parts += ["dev", self.dev]
        if len(self.gateways) > 1:
            parts += [f"nexthop via {g}" for g in self.gateways]
        if self.table != MAIN_TABLE:
            parts += ["table", str(self.table)]
        return " ".join(parts)


def route_key(dst: str, table: int = MAIN_TABLE) -> tuple[int, int, str]:
    """The key of the route to ``dst`` in ``table`` (for ``RouteManager.remove_route``)."""
    norm = normalize_cidr(dst)
    return (family_of(norm), table, norm)


_ROUTE_SET = {f: Route.__dict__[f].__set__ for f in (
    "dst", "table", "type", "dev", "gateways", "scope", "onlink", "src", "metric")}
_ROUTE_SETTERS = tuple(_ROUTE_SET.values())


def make_route(
    dst: str,
    table: int,
    type_: str,
    dev: str | None,
    gateways: tuple[str, ...],
    scope: str,
    onlink: bool,
    src: str | None,
    metric: int,
    _new=object.__new__,
    _s=_ROUTE_SETTERS,
) -> Route:
    """Build a Route from values that are already canonical (read from the kernel),
    skipping __post_init__ and the frozen __setattr__ (slot setters directly): a 50k-route
    dump must parse in well under half a second."""
    r = _new(Route)
    _s[0](r, dst)
    _s[1](r, table)
    _s[2](r, type_)
    _s[3](r, dev)
    _s[4](r, gateways)
    _s[5](r, scope)
    _s[6](r, onlink)
    _s[7](r, src)
    _s[8](r, metric)
    return r


def learned_route(dst: str, gateways: tuple[str, ...], _new=object.__new__,
                  _s=_ROUTE_SETTERS) -> Route:
    """A main-table unicast route to ``dst`` via ``gateways``, for routes learned over BGP.

    Trusted: ``dst`` must already be canonical ("addr/len", host bits clear, as inet_ntop
    writes it) and the gateways canonical addresses of dst's family without duplicates,
    which is what ExaBGP's parser hands over (it formats the decoded wire bytes). Skips
    __post_init__'s validation, ~7x cheaper: a 10,000-route burst must keep pace with
    ExaBGP. Equal (==, hash) to ``Route(dst=dst, gateways=gateways)`` for such input.
    """
    if len(gateways) > 1:
        gateways = tuple(sorted(gateways))
    r = _new(Route)
    _s[0](r, dst)
    _s[1](r, MAIN_TABLE)
    _s[2](r, "unicast")
    _s[3](r, None)
    _s[4](r, gateways)
    _s[5](r, "universe")
    _s[6](r, False)
    _s[7](r, None)
    _s[8](r, 1024 if ":" in dst else 0)
    return r


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy-routing rule: ``from src to dst lookup table`` at ``priority``.

    ``family`` is derived from src/dst; a rule with neither must name it.
    """

    priority: int
    src: str | None = None
    dst: str | None = None
    table: int = MAIN_TABLE
    family: int | None = None

    def __post_init__(self) -> None:
        fams = {family_of(x) for x in (self.src, self.dst) if x}
        if len(fams) > 1:
            raise ValidationError("src and dst of a rule differ in family", field="src")
        fam = fams.pop() if fams else self.family
        if fam not in (AF_INET, AF_INET6) or (self.family and self.family != fam):
            raise ValidationError("rule family missing or inconsistent", field="family")
        if not 0 <= self.priority < 2**32:
            raise ValidationError("bad rule priority", field="priority")
        if not 0 < self.table < 2**32:
            raise ValidationError("bad rule table", field="table")
        s = object.__setattr__
        s(self, "family", fam)
        s(self, "src", normalize_cidr(self.src) if self.src else None)
        s(self, "dst", normalize_cidr(self.dst) if self.dst else None)

    def __str__(self) -> str:
        parts = [f"{self.priority}:"]
        if self.src:
            parts += ["from", self.src]
        if self.dst:
            parts += ["to", self.dst]
        return " ".join([*parts, "lookup", str(self.table)])
