"""The node's decision function: inputs -> desired state. Pure: no I/O, no clock, no asyncio.

The controller gathers inputs (config, backend health, forwarder self-test, operator actions,
warm-up) and calls ``decide()``; it then applies only what differs from what it applied last
time. Keeping the decision pure makes every rule here testable in isolation, and makes "why is
this VIP withdrawn?" answerable from one place: each VIP carries the reason.

Rules (issue 6):
- A backend serves (gets table entries) when its admin state is active and its health is UP.
- A draining backend that is healthy keeps its existing flows (forwarder state "drain") but gets
  no table entries; disabled or unhealthy backends get neither ("down").
- A VIP is announced only when the forwarder's self-test passes, warm-up is over, the node is not
  drained, and at least ``announce.min_healthy`` backends serve.
- During warm-up nothing is programmed for a VIP, so a restarted controller never replaces a good
  table in the kernel with one built from "health unknown".
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Literal, Mapping

from node.config import Backend, VipConfig
from node.maglev import MaglevTable, build_table


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


AdminState = Literal["active", "drain", "disabled"]
DataState = Literal["active", "drain", "down"]


@dataclass(frozen=True)
class Inputs:
    vips: Mapping[str, VipConfig]
    # Health per (vip name, backend key); missing means UNKNOWN. A VIP without a health check
    # has its backends reported UP by the controller (static pools).
    health: Mapping[tuple[str, str], Health]
    # Operator overrides of a backend's admin state, per (vip name, backend key).
    overrides: Mapping[tuple[str, str], AdminState] = field(default_factory=dict)
    forwarder_ok: bool = True
    forwarder_reason: str = ""
    warmup_over: bool = True
    node_drained: bool = False


@dataclass(frozen=True)
class BackendDecision:
    key: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    weight: float
    admin: AdminState
    health: Health
    data_state: DataState
    serving: bool


@dataclass(frozen=True)
class VipDecision:
    vip: VipConfig
    backends: tuple[BackendDecision, ...]
    table: MaglevTable | None  # None: leave the forwarder's current table alone (warm-up)
    announce: bool
    reason: str

    @property
    def serving(self) -> list[str]:
        return [b.key for b in self.backends if b.serving]


@dataclass(frozen=True)
class Desired:
    vips: dict[str, VipDecision]

    @property
    def announced(self) -> list[str]:
        return sorted(n for n, d in self.vips.items() if d.announce)


def admin_state(vip: VipConfig, backend: Backend, overrides: Mapping[tuple[str, str], AdminState]) -> AdminState:
    return overrides.get((vip.name, backend.key), backend.state)


def data_state(admin: AdminState, health: Health) -> DataState:
    if health is not Health.UP or admin == "disabled":
        return "down"
    return "active" if admin == "active" else "drain"


class TableCache:
    """Memoises tables by their inputs: a 65537-entry build is cheap, but a reload or a health
    flap elsewhere must not rebuild (and re-digest) every VIP's table."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, tuple[tuple[str, float], ...]], MaglevTable] = {}
        self.builds = 0
        self.build_seconds = 0.0  # total time spent building, for the metrics
        self.last_build_seconds = 0.0

    def get(self, weights: Mapping[str, float], size: int) -> MaglevTable:
        key = (size, tuple(sorted(weights.items())))
        table = self._cache.get(key)
        if table is None:
            started = time.perf_counter()
            table = build_table(weights, size)
            self.last_build_seconds = time.perf_counter() - started
            self.build_seconds += self.last_build_seconds
            self.builds += 1
            self._cache[key] = table
        return table

    def retain(self, keep: list[MaglevTable]) -> None:
        ids = {id(t) for t in keep}
        self._cache = {k: t for k, t in self._cache.items() if id(t) in ids}


def decide_vip(vip: VipConfig, inputs: Inputs, tables: TableCache) -> VipDecision:
    backends = []
    for b in vip.backends:
        admin = admin_state(vip, b, inputs.overrides)
        health = inputs.health.get((vip.name, b.key), Health.UNKNOWN)
        state = data_state(admin, health)
        backends.append(
            BackendDecision(b.key, b.address, b.weight, admin, health, state, state == "active")
        )
    weights = {b.key: b.weight for b in backends if b.serving}
    table = tables.get(weights, vip.table_size) if inputs.warmup_over else None
    announce, reason = _announce(vip, len(weights), inputs)
    return VipDecision(vip, tuple(backends), table, announce, reason)


def _announce(vip: VipConfig, serving: int, inputs: Inputs) -> tuple[bool, str]:
    if not inputs.forwarder_ok:
        return False, f"forwarder unhealthy: {inputs.forwarder_reason or 'self-test failed'}"
    if not inputs.warmup_over:
        return False, "warming up: waiting for every backend's first health verdict"
    if inputs.node_drained:
        return False, "node drained by operator"
    need = vip.announce.min_healthy
    if serving < need:
        return False, f"{serving} serving backend(s), fewer than min_healthy {need}"
    return True, f"{serving} serving backend(s) (min_healthy {need})"


def decide(inputs: Inputs, tables: TableCache | None = None) -> Desired:
    tables = tables or TableCache()
    decisions = {name: decide_vip(vip, inputs, tables) for name, vip in sorted(inputs.vips.items())}
    tables.retain([d.table for d in decisions.values() if d.table is not None])
    return Desired(decisions)
