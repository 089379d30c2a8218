"""The node's decision function: inputs -> desired state. Pure: no I/O, no clock, no asyncio.

The controller gathers inputs (config, backend health, forwarder self-test, operator actions,
warm-up) and calls ``decide()``; it then applies only what differs from what it applied last
time. Keeping the decision pure makes every rule here testable in isolation, and makes "why is
this VIP withdrawn?" answerable from one place: each VIP carries the reason.

Rules (issue 6):
- A backend serves (gets table entries) when its admin state is active and its health is UP.
- A draining backend that is healthy keeps its existing flows (forwarder state "drain") but gets
  no table entries; disabled or unhealthy backends get neither ("down").
- Whether a VIP is announced, de-preferred or withdrawn, and with which route attributes, is
  the announce policy's (node.announce_policy, issue 14): hysteresis, the fallback pool,
  dampening, the disable file. Its previous decision (hysteresis verdict, dampening history)
  comes from ``previous``.
- The fallback pool's backends serve only while the policy says so; a healthy backend of the
  pool not in use is "drain" (its existing flows finish, it gets no new ones).
- During warm-up nothing is programmed for a VIP, so a restarted controller never replaces a good
  table in the kernel with one built from "health unknown".
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Mapping

from node.announce_policy import AnnounceDecision, DampingParams, NodeState, PoolCounts, decide_announce
from node.config import Backend, VipConfig
from node.maglev import MaglevTable, StopGapTable, build_table


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
    # VIPs whose forwarder self-test failed twice on this node (the forwarder itself is fine):
    # withdrawn alone, with the reason.
    vip_faults: Mapping[str, str] = field(default_factory=dict)
    warmup_over: bool = True
    node_drained: bool = False
    # The disable file's action while it exists (None: absent), and its path for the reason.
    node_disabled: Literal["deprefer", "withdraw"] | None = None
    disable_path: str = ""
    # (vip, backend key) -> until when its check's flap dampening holds it DOWN (clock time).
    held: Mapping[tuple[str, str], float] = field(default_factory=dict)
    now: float = 0.0  # the controller's clock, for dampening; the decision reads no clock itself
    damping: DampingParams = field(default_factory=DampingParams)

    @functools.cached_property  # once per decide, not once per VIP
    def node_state(self) -> NodeState:
        return NodeState(self.forwarder_ok, self.forwarder_reason, self.warmup_over, self.node_drained,
                         self.node_disabled, self.disable_path)


@dataclass(frozen=True)
class BackendDecision:
    key: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    weight: float
    admin: AdminState
    health: Health
    data_state: DataState
    serving: bool
    fallback: bool = False  # a backend of the fallback pool


@dataclass(frozen=True)
class VipDecision:
    vip: VipConfig
    backends: tuple[BackendDecision, ...]
    table: MaglevTable | None  # None: leave the forwarder's current table alone (warm-up)
    policy: AnnounceDecision

    @property
    def announce(self) -> bool:
        return self.policy.announce

    @property
    def state(self) -> str:
        return self.policy.state

    @property
    def reason(self) -> str:
        return self.policy.reason

    @property
    def serving(self) -> list[str]:
        return [b.key for b in self.backends if b.serving]


@dataclass(frozen=True)
class Desired:
    vips: dict[str, VipDecision]

    @property
    def announced(self) -> list[str]:
        return sorted(n for n, d in self.vips.items() if d.announce)

    def wakeups(self) -> dict[str, float]:
        """VIP -> when its decision changes with no new input (a hold-down ends)."""
        return {n: d.policy.wakeup for n, d in self.vips.items() if d.policy.wakeup is not None}


def admin_state(vip: VipConfig, backend: Backend, overrides: Mapping[tuple[str, str], AdminState]) -> AdminState:
    return overrides.get((vip.name, backend.key), backend.state)


def data_state(admin: AdminState, health: Health) -> DataState:
    if health is not Health.UP or admin == "disabled":
        return "down"
    return "active" if admin == "active" else "drain"


TableKey = tuple[int, tuple[tuple[str, float], ...]]


class TableCache:
    """Memoises tables by their inputs: a 65537-entry build is cheap, but a reload or a health
    flap elsewhere must not rebuild (and re-digest) every VIP's table.

    With ``defer`` set (the controller), a VIP whose pool only lost backends gets a stop-gap
    (maglev.StopGapTable: its last table, the lost backends' entries handed to the next entry
    that remains) and the exact table is listed in ``pending`` for the caller to build off the
    event loop (``build`` + ``add``). A backend shared by a thousand VIPs going down is then a
    thousand cheap rewrites, not a thousand builds, before it stops getting new flows."""

    def __init__(self, defer: bool = False) -> None:
        self._cache: dict[TableKey, MaglevTable] = {}
        self.defer = defer
        self.pending: dict[TableKey, tuple[dict[str, float], int]] = {}
        self._last: dict[str, tuple[TableKey, MaglevTable]] = {}  # vip -> what it got last
        self._building: set[TableKey] = set()
        self.builds = 0
        self.build_seconds = 0.0  # total time spent building, for the metrics
        self.last_build_seconds = 0.0

    def get(self, weights: Mapping[str, float], size: int, vip: str | None = None) -> MaglevTable:
        key = (size, tuple(sorted(weights.items())))
        table = self._cache.get(key)
        if table is None and self.defer and vip is not None:
            table = self._stop_gap(vip, key)
            if table is not None and key not in self._building:
                self.pending[key] = (dict(weights), size)
        if table is None:
            table = self._build(weights, size)
            self._cache[key] = table
        if vip is not None:
            self._last[vip] = (key, table)
        return table

    def _stop_gap(self, vip: str, key: TableKey) -> MaglevTable | None:
        last = self._last.get(vip)
        if last is None or last[0][0] != key[0] or not key[1]:
            return None
        if last[0] == key:  # the exact table is still being built
            return last[1] if isinstance(last[1], StopGapTable) else None
        before, now = set(last[0][1]), set(key[1])
        if not now < before:  # only a pool that lost backends (same weights otherwise)
            return None
        return StopGapTable.of(last[1], {k for k, _ in before - now})

    def _build(self, weights: Mapping[str, float], size: int) -> MaglevTable:
        started = time.perf_counter()
        table = build_table(weights, size)
        table.digest()  # computed here, off the event loop, not where the controller first asks
        self.last_build_seconds = time.perf_counter() - started
        self.build_seconds += self.last_build_seconds
        self.builds += 1
        return table

    def take_pending(self) -> list[tuple[TableKey, dict[str, float], int]]:
        out = [(k, w, n) for k, (w, n) in self.pending.items() if k not in self._cache]
        self.pending.clear()
        self._building.update(k for k, _, _ in out)
        return out

    def build(self, todo: list[tuple[TableKey, dict[str, float], int]]) -> list[tuple[TableKey, MaglevTable]]:
        """Build tables (safe in a worker thread: touches no shared state but the counters)."""
        return [(k, self._build(w, n)) for k, w, n in todo]

    def add(self, built: list[tuple[TableKey, MaglevTable]]) -> None:
        self._cache.update(built)
        self._building.difference_update(k for k, _ in built)

    def abandon(self, todo: list[tuple[TableKey, dict[str, float], int]]) -> None:
        """A background build failed: forget it, so the next decide builds or retries it."""
        self._building.difference_update(k for k, _, _ in todo)

    def retain(self, keep: list[MaglevTable], vips: set[str] | None = None) -> None:
        ids = {id(t) for t in keep}
        self._cache = {k: t for k, t in self._cache.items() if id(t) in ids}
        if vips is not None:
            self._last = {v: x for v, x in self._last.items() if v in vips}


def decide_vip(vip: VipConfig, inputs: Inputs, tables: TableCache,
               previous: VipDecision | None = None) -> VipDecision:
    """``previous``: this VIP's last decision. From the same config object, a backend whose
    admin state and health are unchanged keeps its decision object (a backend shared by every
    VIP going down re-decides one backend per VIP, not all of them); from any config with the
    same announce policy, the policy's history (hysteresis, dampening) carries on."""
    old = previous.backends if previous is not None and previous.vip is vip else ()
    n_primary = len(vip.backends)
    backends, serving = _backends(vip, vip.backends, inputs, False, old[:n_primary])
    fallback_serving = 0
    if vip.fallback_backends:
        more, fallback_serving = _backends(vip, vip.fallback_backends, inputs, True, old[n_primary:])
        backends += more
    primary, fallback = backends[:n_primary], backends[n_primary:]
    held = [t for t in (inputs.held.get((vip.name, b.key), -math.inf) for b in primary if b.health is Health.DOWN)
            if t > inputs.now] if inputs.held else []
    counts = PoolCounts(serving, fallback_serving, len(held))
    # Same policy config (identity first: a pydantic comparison per VIP would cost a full decide
    # at fleet scale): carry its history on; a changed policy starts afresh.
    same = previous is not None and (previous.vip is vip or previous.vip.announce == vip.announce)
    before = previous.policy if same else None
    policy = decide_announce(vip.announce, counts, inputs.node_state, before, inputs.now, inputs.damping,
                             inputs.vip_faults.get(vip.name) if inputs.vip_faults else None)
    if held and policy.code == "backends_dampened":  # decide again when the first hold ends
        policy = dataclasses.replace(policy, wakeup=min(held + [policy.wakeup or math.inf]))
    # The pool not in use serves nothing; its healthy backends keep their existing flows.
    idle = primary if policy.use_fallback else fallback
    if idle and any(b.serving for b in idle):
        backends = [dataclasses.replace(b, serving=False, data_state="drain") if b.serving and b.fallback
                    is not policy.use_fallback else b for b in backends]
    weights = {b.key: b.weight for b in backends if b.serving}
    table = tables.get(weights, vip.table_size, vip.name) if inputs.warmup_over else None
    return VipDecision(vip, tuple(backends), table, policy)


def _backends(vip: VipConfig, pool: list[Backend], inputs: Inputs, fallback: bool,
              old: tuple[BackendDecision, ...]) -> tuple[list[BackendDecision], int]:
    """The pool's backend decisions and how many of them serve (``old``: the same pool's last
    decisions, reused when unchanged; an idle pool's "drain" copy is not, its state differs)."""
    out = []
    serving = 0
    for i, b in enumerate(pool):
        admin = admin_state(vip, b, inputs.overrides)
        health = inputs.health.get((vip.name, b.key), Health.UNKNOWN)
        state = data_state(admin, health)
        serving += state == "active"
        if old and old[i].admin == admin and old[i].health is health and old[i].data_state == state:
            out.append(old[i])
            continue
        out.append(BackendDecision(b.key, b.address, b.weight, admin, health, state, state == "active", fallback))
    return out, serving


def decide(inputs: Inputs, tables: TableCache | None = None, previous: Desired | None = None,
           only: set[str] | None = None) -> Desired:
    """The desired state for ``inputs``. With ``previous`` and ``only``: only the VIPs named in
    ``only`` are decided again, the others keep their previous decision; the caller vouches
    that nothing else about them changed (their config object, health, overrides, and the
    node-wide inputs), so a reconcile costs what changed, not the number of VIPs."""
    tables = tables or TableCache()
    before = previous.vips if previous is not None else {}
    decisions = {}
    for name, vip in sorted(inputs.vips.items()):
        old = before.get(name) if only is not None and name not in only else None
        decisions[name] = (old if old is not None and old.vip is vip
                           else decide_vip(vip, inputs, tables, before.get(name)))
    if only is None or only:  # nothing decided again: nothing to forget either
        tables.retain([d.table for d in decisions.values() if d.table is not None], set(decisions))
    return Desired(decisions)
