"""The values the health checker hands to its users: what is probed, what a probe found, and
what changed.

They are plain frozen dataclasses so the controller can keep them in sets and dicts, log them and
compare them without knowing anything about probes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from node.config import HealthCheck

# Ports used when neither the check nor the backend names one; tcp/udp have no sensible default.
DEFAULT_PORTS = {"http": 80, "https": 443, "dns": 53}


@dataclass(frozen=True, eq=False)
class Target:
    """One thing to probe: a backend address, the port the controller knows for it, and the check.

    Equality and hashing use what is actually probed (address, effective port, the check's JSON,
    the VIP of a tunnel check), so the same check of the same backend named by several VIPs
    collapses into one probe. The pydantic model itself is not hashable (it holds lists), hence
    the precomputed key.

    A tunnel check (``check.via == "tunnel"``) names the VIP too: the probe goes to the VIP's
    address (``probe_address``), and the node's tunnel steers it to ``address`` (the backend
    under test) by the socket's mark; ``port`` is then the VIP's port.
    """

    address: IPv4Address | IPv6Address
    port: int | None
    check: HealthCheck
    vip: IPv4Address | IPv6Address | None = None
    _key: tuple[str, int | None, str, str | None] = field(init=False, repr=False)
    # Worked out once: both are read several times per probe, thousands of probes a second.
    tunnel: bool = field(init=False, repr=False)  # a via: tunnel check
    _hash: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tunnel = getattr(self.check, "via", "direct") == "tunnel"
        object.__setattr__(self, "tunnel", tunnel)
        if tunnel and self.vip is None:
            raise ValueError("a tunnel check's Target needs the VIP address it probes")
        key = (str(self.address), self.probe_port, self.check.model_dump_json(),
               str(self.vip) if tunnel else None)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    @property
    def probe_address(self) -> IPv4Address | IPv6Address:
        """Where the probe connects: the VIP through the tunnel, else the backend itself."""
        return self.vip if self.tunnel and self.vip is not None else self.address

    @property
    def probe_port(self) -> int | None:
        """check.port overrides the controller's port; some types have a well-known default."""
        if self.check.port is not None:
            return self.check.port
        if self.port is not None:
            return self.port
        return DEFAULT_PORTS.get(self.check.type)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def describe(self) -> str:
        """'10.1.0.11:80 (http /healthz)': what logs and events name."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        where = f"{host}:{self.probe_port}" if self.probe_port else host
        detail = self.check.type
        if self.check.type in ("http", "https"):
            detail += f" {self.check.path}"
        elif self.check.type == "dns":
            detail += f" {self.check.query_type} {self.check.query_name}"
        elif self.check.type == "exec":
            detail += f" {self.check.command[0]}"
        if self.tunnel:
            vip = f"[{self.vip}]" if self.vip.version == 6 else str(self.vip)
            return f"{host} via tunnel to {vip}:{self.probe_port} ({detail})"
        return f"{where} ({detail})"


class State(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str  # short and human: "HTTP 503", "connection refused", "timeout after 1.0 s"
    latency: float  # seconds from the start of the probe to its verdict
    at: float  # clock time of the verdict (the monitor's clock; time.monotonic by default)
    # True when the probe timed out only because this process was stalled past the deadline:
    # no evidence either way, so the state machine does not count it.
    inconclusive: bool = False


@dataclass(frozen=True)
class Transition:
    """A change of a target's state. ``old == new == DOWN`` never happens: a hold-down is
    announced on the DOWN transition that starts it (``dampened=True``), and the UP after it says
    so in its reason."""

    target: Target
    old: State
    new: State
    reason: str
    results: tuple[ProbeResult, ...]
    dampened: bool


@dataclass
class TargetStatus:
    state: State
    since: float
    last: ProbeResult | None
    transitions: int
    held_until: float | None
