"""The announce policy of one VIP: announced, de-preferred or withdrawn, and with which route.

Pure: no I/O, no clock (``now`` is an input), no asyncio. ``node.reconcile.decide_vip`` calls
``decide_announce`` with the VIP's policy, its pool's counts, the node's state and the VIP's
previous decision (which carries its hysteresis verdict and its dampening history), and gets a
new decision that carries them on.

Why these rules (issue 14): every node sees the same pool and runs the same code, so whatever
this function does, the whole fleet does at the same moment. Withdrawing is therefore reserved
for a pool that really cannot serve; everything softer is a de-preferred route (worse MED,
longer AS path), which routers avoid while any node is healthy and still use when every node is
degraded alike.

- **hysteresis**: a healthy pool turns unhealthy below ``min_healthy`` serving backends and
  healthy again only at ``min_healthy_to_announce`` (>=), so a pool wobbling around one count
  does not flap the route. A node without history starts from ``min_healthy``.
- **fallback pool**: while the primary pool is unhealthy and a fallback backend serves, the
  fallback pool gets the table (and the route is de-preferred: nodes whose primary pool is
  healthy should get the traffic).
- **on_unhealthy**: ``withdraw`` (the default, today's behaviour) or ``deprefer``. Either way a
  VIP with no serving backend at all is withdrawn: a route to an empty table is a blackhole.
- **dampening**: ``threshold`` losses of the healthy verdict within ``window`` seconds hold the
  VIP down for a hold-down that doubles on every repeat up to ``hold_down_max``, and is forgiven
  after ``hold_down_max`` quiet seconds. Held down means *de-preferred, never withdrawn* while
  something serves: dampening acts on the same inputs on every node, so a hold that withdrew
  would withdraw the VIP everywhere, long after the pool settled. Backends held DOWN by their
  health check's own flap dampening count the same way: a pool below its threshold only because
  of them is de-preferred, not withdrawn.
- **node state**: a failed forwarder self-test, the warm-up and an operator drain withdraw (they
  are about this node only, not the pool); the disable file caps every VIP at its configured
  action (``deprefer`` or ``withdraw``).
- **rate limits** are not here: the BGP reconciler delays announcements only, never withdrawals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from node.config import AnnouncePolicy

State = Literal["announced", "depreferred", "withdrawn"]
STATES: tuple[State, ...] = ("announced", "depreferred", "withdrawn")
# Short, bounded reason codes (metric labels); the reason text says the rest.
REASONS = ("healthy", "below_min_healthy", "no_backend", "fallback", "dampened", "backends_dampened",
           "disabled", "drained", "forwarder", "warmup")


@dataclass(frozen=True)
class DampingParams:
    hold_down: float = 5.0
    hold_down_max: float = 120.0
    threshold: int = 3
    window: float = 60.0


@dataclass(frozen=True)
class Damping:
    """A VIP's dampening history: a value carried from one decision to the next."""

    losses: tuple[float, ...] = ()  # times the healthy verdict was lost, within the window
    held_until: float = -math.inf
    hold_len: float = 0.0  # the next hold-down's length; 0: the initial one
    last_flap: float = -math.inf


@dataclass(frozen=True)
class PoolCounts:
    primary: int  # serving backends of the primary pool (healthy and active)
    fallback: int = 0  # serving backends of the fallback pool
    held: int = 0  # primary backends DOWN only because their check's flap dampening holds them


@dataclass(frozen=True)
class NodeState:
    forwarder_ok: bool = True
    forwarder_reason: str = ""
    warmup_over: bool = True
    drained: bool = False
    disabled: Literal["deprefer", "withdraw"] | None = None  # the disable file's action
    disable_path: str = ""


@dataclass(frozen=True)
class RouteAttributes:
    med: int | None = None
    communities: tuple[str, ...] = ()
    prepend: int = 0  # extra copies of the node's ASN in the AS path


@dataclass(frozen=True)
class AnnounceDecision:
    state: State
    reason: str
    code: str  # one of REASONS
    pool_ok: bool | None  # the primary pool's verdict after hysteresis (None: no verdict yet)
    use_fallback: bool = False
    attributes: RouteAttributes | None = None  # None when withdrawn
    damping: Damping = field(default_factory=Damping)
    wakeup: float | None = None  # when this decision changes without new input (a hold ends)

    @property
    def announce(self) -> bool:
        return self.state != "withdrawn"


def pool_verdict(policy: AnnouncePolicy, serving: int, previous_ok: bool | None) -> bool:
    """Hysteresis: a healthy pool stays healthy down to min_healthy; an unhealthy one needs
    min_healthy_to_announce to be healthy again."""
    need = policy.healthy_again if previous_ok is False else policy.min_healthy
    return serving >= need


def record_loss(d: Damping, now: float, p: DampingParams) -> Damping:
    """The healthy verdict was lost at ``now``: remember it, and start a hold-down when it is
    the threshold-th loss within the window."""
    if p.hold_down <= 0:
        return d
    hold_len = d.hold_len or p.hold_down
    if now - max(d.last_flap, d.held_until) > p.hold_down_max:
        hold_len = p.hold_down  # quiet long after the last hold-down: forgive
    losses = tuple(t for t in d.losses if t >= now - p.window) + (now,)
    if len(losses) < p.threshold:
        return Damping(losses, d.held_until, hold_len, now)
    return Damping((), now + hold_len, min(hold_len * 2, max(p.hold_down_max, p.hold_down)), now)


def route_attributes(policy: AnnouncePolicy, state: State) -> RouteAttributes | None:
    if state == "withdrawn":
        return None
    if state == "announced":
        return RouteAttributes(policy.med, tuple(policy.communities), 0)
    return RouteAttributes(policy.deprefer_med, tuple(policy.communities) + tuple(policy.deprefer.communities),
                           policy.deprefer.prepend)


def decide_announce(policy: AnnouncePolicy, pool: PoolCounts, node: NodeState,
                    previous: AnnounceDecision | None, now: float,
                    damping: DampingParams = DampingParams(), fault: str | None = None) -> AnnounceDecision:
    """``fault``: this VIP's forwarder self-test failed twice on this node (the reason)."""
    prev_ok = previous.pool_ok if previous is not None else None
    history = previous.damping if previous is not None else Damping()
    if not node.warmup_over:  # counts are "health unknown": no verdict, no history
        return AnnounceDecision("withdrawn", "warming up: waiting for every backend's first health verdict",
                                "warmup", prev_ok, damping=history)
    ok = pool_verdict(policy, pool.primary, prev_ok)
    if prev_ok and not ok:
        history = record_loss(history, now, damping)
    held = now < history.held_until
    use_fallback = not ok and pool.fallback > 0
    state, reason, code = _pool_state(policy, pool, ok, held, history, now, damping)
    state, reason, code = _node_cap(node, state, reason, code)
    if fault is not None and node.forwarder_ok:
        state, reason, code = "withdrawn", f"forwarder self-test of this VIP failed: {fault}", "forwarder"
    return AnnounceDecision(state, reason, code, ok, use_fallback, route_attributes(policy, state),
                            history, history.held_until if held else None)


def _pool_state(policy: AnnouncePolicy, pool: PoolCounts, ok: bool, held: bool, history: Damping,
                now: float, p: DampingParams) -> tuple[State, str, str]:
    need = policy.min_healthy if ok else policy.healthy_again
    counts = f"{pool.primary} serving backend(s)"
    if ok:
        if held:
            return "depreferred", f"{counts} (min_healthy {need}), {_hold(history, now, p)}", "dampened"
        return "announced", f"{counts} (min_healthy {need})", "healthy"
    below = f"{counts}, fewer than {'min_healthy' if need == policy.min_healthy else 'min_healthy_to_announce'} {need}"
    if pool.fallback > 0:
        return "depreferred", f"{below}; serving from the fallback pool ({pool.fallback} backend(s))", "fallback"
    if pool.primary == 0:
        return "withdrawn", f"{below}; nothing serves, so withdrawn whatever on_unhealthy says", "no_backend"
    if held:
        return "depreferred", f"{below}, {_hold(history, now, p)}", "dampened"
    if pool.primary + pool.held >= need:
        return ("depreferred", f"{below} only because {pool.held} backend(s) are held down by their health "
                "check's flap dampening: de-preferred, not withdrawn", "backends_dampened")
    if policy.on_unhealthy == "deprefer":
        return "depreferred", f"{below} (on_unhealthy: deprefer)", "below_min_healthy"
    return "withdrawn", below, "below_min_healthy"


def _hold(history: Damping, now: float, p: DampingParams) -> str:
    return (f"held down by dampening ({p.threshold} losses of the healthy verdict within {p.window:g} s), "
            f"{history.held_until - now:.1f} s left: de-preferred, not withdrawn")


def _node_cap(node: NodeState, state: State, reason: str, code: str) -> tuple[State, str, str]:
    """This node's own state caps what the pool allows."""
    if not node.forwarder_ok:
        return "withdrawn", f"forwarder unhealthy: {node.forwarder_reason or 'self-test failed'}", "forwarder"
    if node.drained:
        return "withdrawn", "node drained by operator", "drained"
    if node.disabled is not None and state != "withdrawn":
        where = node.disable_path or "the disable file"
        if node.disabled == "withdraw":
            return "withdrawn", f"node disabled by {where} (action: withdraw)", "disabled"
        if state == "announced":
            return "depreferred", f"node disabled by {where} (action: deprefer); pool: {reason}", "disabled"
    return state, reason, code

