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
_pton, _ntop = socket.inet_pton, socket.inet_ntop
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


@dataclass(frozen=True, slots=True, init=False)
class Route:
    """One kernel route (validated and normalized by its constructor). Its key is (family, table, dst): one route per destination per table;
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
    # (family, table, dst), made once by the constructor: every dict of routes is keyed by
    # it (desired by class, desired, actual), so it is read 5-10 times per route and a
    # no-op resync of the dump's cached Routes allocates nothing per route.
    key: tuple[int, int, str] = field(init=False, repr=False, compare=False)

    def __init__(self, dst: str, table: int = MAIN_TABLE, type: str = "unicast",
                 dev: str | None = None, gateways: tuple[str, ...] = (),
                 scope: str | None = None, onlink: bool = False, src: str | None = None,
                 metric: int | None = None) -> None:
        # Runs for every route of a 50k set: cheap checks first, no ipaddress, and each slot
        # set once through its descriptor (the dataclass __init__ went through the frozen
        # __setattr__ nine times, then __post_init__ set four slots again: 3.1 -> 1.5 us).
        addr, _, plen = dst.partition("/")
        if ":" in addr:
            fam = AF_INET6
            dst = normalize_cidr(dst)
        elif plen == "32" or not plen:  # a host route, the commonest of all: no masking
            fam = AF_INET
            try:
                text = _ntop(AF_INET, _pton(AF_INET, addr))
            except (OSError, ValueError) as exc:
                raise ValidationError(f"not a CIDR: {dst!r}", field="dst") from exc
            if text != addr or not plen:
                dst = f"{text}/32"
        else:
            fam = AF_INET
            dst = normalize_cidr(dst)
        if type != "unicast" and type != "blackhole":
            raise ValidationError(f"route type must be one of {ROUTE_TYPES}", field="type")
        if table != MAIN_TABLE and (not 0 < table < 2**32 or table in (253, 255)):
            raise ValidationError(f"table {table} is not usable", field="table")
        gws = gateways
        if gws:
            gws = tuple(sorted({normalize_ip(g, fam) for g in gateways}))
            if len(gws) != len(gateways):
                raise ValidationError("duplicate gateway", field="gateways")
        elif gws.__class__ is not tuple:
            gws = ()
        if type == "blackhole":
            if gws or dev:
                raise ValidationError("a blackhole route has no device or gateway", field="type")
        elif not gws and not dev:
            raise ValidationError("a unicast route needs a device or a gateway", field="dev")
        if fam == AF_INET6:
            scope = "universe"  # IPv6 has no route scopes; the kernel reports universe
        elif scope is None:
            scope = "link" if dev and not gws and type == "unicast" else "universe"
        elif scope not in SCOPES:
            raise ValidationError(f"scope must be one of {SCOPES}", field="scope")
        if src:
            src = normalize_ip(src, fam)
        if metric is None:  # the kernel's default: 1024 for IPv6, 0 for IPv4
            metric = 1024 if fam == AF_INET6 else 0
        (s_dst, s_table, s_type, s_dev, s_gws, s_scope, s_onlink, s_src, s_metric,
         s_key) = _ROUTE_SETTERS
        s_key(self, (fam, table, dst))
        s_dst(self, dst)
        s_table(self, table)
        s_type(self, type)
        s_dev(self, dev)
        s_gws(self, gws)
        s_scope(self, scope)
        s_onlink(self, onlink)
        s_src(self, src)
        s_metric(self, metric)

    @property
    def family(self) -> int:
        return AF_INET6 if ":" in self.dst else AF_INET

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
    "dst", "table", "type", "dev", "gateways", "scope", "onlink", "src", "metric", "key")}
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
    skipping the constructor's checks and the frozen __setattr__ (slot setters directly): a
    50k-route dump must parse in well under half a second."""
    r = _new(Route)
    _s[9](r, (AF_INET6 if ":" in dst else AF_INET, table, dst))
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
    the constructor's validation, several times cheaper: a 10,000-route burst must keep pace with
    ExaBGP. Equal (==, hash) to ``Route(dst=dst, gateways=gateways)`` for such input.
    """
    if len(gateways) > 1:
        gateways = tuple(sorted(gateways))
    r = _new(Route)
    _s[9](r, (AF_INET6 if ":" in dst else AF_INET, MAIN_TABLE, dst))
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


RULE_ACTIONS = ("lookup", "unreachable")


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy-routing rule: ``from src to dst lookup table`` at ``priority``, or with
    ``action`` "unreachable": ``from src to dst unreachable`` (the packet is refused with
    ICMP unreachable; ``table`` is then the main table, unused).

    ``family`` is derived from src/dst; a rule with neither must name it.
    """

    priority: int
    src: str | None = None
    dst: str | None = None
    table: int = MAIN_TABLE
    family: int | None = None
    action: str = "lookup"

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
        if self.action not in RULE_ACTIONS:
            raise ValidationError(f"bad rule action {self.action!r}", field="action")
        if self.action != "lookup" and self.table != MAIN_TABLE:
            raise ValidationError("only a lookup rule names a table", field="table")
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
        if self.action != "lookup":
            return " ".join([*parts, self.action])
        return " ".join([*parts, "lookup", str(self.table)])
