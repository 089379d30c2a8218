"""Routes a node announces and the ExaBGP API commands that carry them.

A command line reaches ExaBGP's parser verbatim, so it is built here and only here, from
``ipaddress`` objects and ints that were validated when the ``Route`` was made; nothing from a
config file or an API request is pasted in as text.

Command syntax accepted by ExaBGP 5.0.15 (one line each, answered by ``done`` or ``error``)::

    announce route 10.77.100.1/32 next-hop self
    announce route fd77:100::1/128 next-hop self med 100 community [65000:100 65535:0]
    announce route 10.77.100.1/32 next-hop self med 1000 as-path [65101 65101 65101 65101]
    withdraw route 10.77.100.1/32

ExaBGP sends an ``as-path`` as given (it adds the local ASN only when there is none), so a
de-preferred route's path is the node's ASN 1 + ``prepend`` times: an eBGP router checks that
the path starts with its peer's ASN.

Without a ``neighbor X`` selector a route goes to every session of its address family.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

GRACEFUL_SHUTDOWN = "65535:0"  # RFC 8326 well-known community
MAX_MED = 2**32 - 1
MAX_PREPEND = 16
MAX_ASN = 2**32 - 1
_COMMUNITY_RE = re.compile(r"(\d{1,5}):(\d{1,5})")


class RouteError(ValueError):
    pass


def parse_community(text: str) -> tuple[int, int]:
    """'ASN:VALUE' with both parts 0-65535 -> (asn, value)."""
    m = _COMMUNITY_RE.fullmatch(text)
    if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
        raise RouteError(f"community {text!r} must be ASN:VALUE with both parts 0-65535")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Route:
    """One VIP announcement: a host prefix (/32 or /128) with optional MED, communities and
    AS-path prepends (a de-preferred VIP)."""

    prefix: IPNetwork
    med: int | None = None
    communities: tuple[str, ...] = ()
    prepend: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise RouteError(f"route prefix {self.prefix!r} must be an ipaddress network object")
        if self.prefix.prefixlen != self.prefix.max_prefixlen:
            raise RouteError(f"route prefix {self.prefix} must be a single address (/32 or /128): a VIP")
        if self.med is not None and (isinstance(self.med, bool) or not isinstance(self.med, int)
                                     or not 0 <= self.med <= MAX_MED):
            raise RouteError(f"route {self.prefix}: med {self.med!r} must be an int 0-{MAX_MED}")
        if isinstance(self.prepend, bool) or not isinstance(self.prepend, int) or not 0 <= self.prepend <= MAX_PREPEND:
            raise RouteError(f"route {self.prefix}: prepend {self.prepend!r} must be an int 0-{MAX_PREPEND}")
        # Canonical form (sorted, no duplicates) so equal intent compares equal.
        canon = tuple(f"{a}:{v}" for a, v in sorted({parse_community(c) for c in self.communities}))
        object.__setattr__(self, "communities", canon)

    @classmethod
    def for_address(cls, address: IPAddress | str, med: int | None = None,
                    communities: tuple[str, ...] | list[str] = (), prepend: int = 0) -> "Route":
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        return cls(ipaddress.ip_network(addr), med, tuple(communities), prepend)

    @property
    def key(self) -> str:
        return self.prefix.with_prefixlen

    def with_communities(self, extra: tuple[str, ...]) -> "Route":
        if not extra:
            return self
        return Route(self.prefix, self.med, self.communities + tuple(extra), self.prepend)


NextHop = Union[Literal["self"], IPAddress]


def next_hop_for(route: Route, configured: NextHop) -> str:
    """The configured next hop when it matches the route's family, else ``self``."""
    if configured == "self" or not isinstance(configured, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return "self"
    if configured.version != route.prefix.version:
        return "self"
    return str(configured)


def announce_command(route: Route, next_hop: NextHop = "self", local_as: int | None = None) -> str:
    """``local_as`` None: prepends are left out (a node with an iBGP peer, which would drop a
    path holding its own ASN)."""
    parts = ["announce", "route", route.prefix.with_prefixlen, "next-hop", next_hop_for(route, next_hop)]
    if route.med is not None:
        parts += ["med", str(int(route.med))]
    if route.prepend and local_as is not None:
        if isinstance(local_as, bool) or not isinstance(local_as, int) or not 1 <= local_as <= MAX_ASN:
            raise RouteError(f"local_as {local_as!r} must be an ASN 1-{MAX_ASN}")
        parts += ["as-path", "[" + " ".join([str(local_as)] * (1 + int(route.prepend))) + "]"]
    if route.communities:
        comms = " ".join(f"{a}:{v}" for a, v in (parse_community(c) for c in route.communities))
        parts += ["community", f"[{comms}]"]
    return " ".join(parts)


def withdraw_command(prefix: IPNetwork) -> str:
    if not isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        raise RouteError(f"withdraw prefix {prefix!r} must be an ipaddress network object")
    return f"withdraw route {prefix.with_prefixlen}"
