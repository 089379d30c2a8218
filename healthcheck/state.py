"""The per-target state machine: rise/fall counting and flap dampening.

It is pure (no I/O, no clock of its own: time comes from each result's ``at``), so its tests can
drive it with a fake clock and exact sequences of results.

Rules:
- UNKNOWN -> UP after ``rise`` consecutive successes; UNKNOWN -> DOWN after ``fall`` failures.
- UP -> DOWN after ``fall`` consecutive failures; DOWN -> UP after ``rise`` successes.
- Inconclusive results (the checker itself was stalled) are shown as the last result but
  neither extend nor break a run, up to ``fall`` of them in a row: a checker that is starved
  for longer than that can no longer vouch for the backend, so further ones count as failures
  (a dead backend must not stay UP because the node is overloaded).
- Taking over: when a reload changes a backend's check (any field: interval, path, rise...),
  the new check's machine starts from the old one's verdict and flap history rather than from
  UNKNOWN, and only its own rise/fall runs confirm or overturn it: a routine edit must not take
  a healthy backend out of its tables, nor make a held-down one look fresh.
- Flap dampening: UP<->DOWN transitions are remembered for ``flap_window`` seconds. A DOWN that
  makes them more than ``flap_threshold`` starts a hold-down: the target stays DOWN until the hold
  ends, whatever the probes say, and only then may ``rise`` successes bring it UP. Each hold that
  starts within ``flap_window`` of the previous one's end lasts twice as long (up to
  ``hold_down_max``); a quiet window resets it. Going DOWN is never delayed: that is the safe
  direction for a load balancer.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from healthcheck.types import ProbeResult, State, Target, Transition, TargetStatus


def _fields(r: ProbeResult) -> tuple[Any, ...]:
    return (r.ok, r.reason, r.latency, r.at, r.inconclusive)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g} s"


class StateMachine:
    """Consumes probe results for one target; returns a Transition when its state changes."""

    def __init__(self, target: Target, now: float) -> None:
        check: Any = target.check
        self.target = target
        self.rise: int = check.rise
        self.fall: int = check.fall
        self.flap_threshold: int = check.flap_threshold
        self.flap_window: float = check.flap_window
        self.hold_down: float = check.hold_down
        self.hold_down_max: float = max(check.hold_down_max, check.hold_down)
        self.state = State.UNKNOWN
        self.since = now
        # Results are kept as plain tuples of their fields, which the cyclic collector stops
        # tracking: a ProbeResult kept for an interval by every target (10,000 a second) was
        # promoted to the collector's oldest generation by the thousand and made its full
        # passes (100-200 ms each, measured) frequent. ``last`` gives the ProbeResult back.
        self._last: tuple[Any, ...] | None = None
        self.transitions = 0
        self.held_until: float | None = None
        self._ok_run = 0
        self._fail_run = 0
        self._stalled_run = 0
        self._recent: deque[tuple[Any, ...]] = deque(maxlen=max(self.rise, self.fall))
        self._flaps: deque[float] = deque()
        self._next_hold = self.hold_down
        self._last_hold_end: float | None = None

    @classmethod
    def taking_over(cls, target: Target, now: float, old: "StateMachine | State") -> "StateMachine":
        """A machine for ``target`` that starts where ``old`` (a machine, or only a verdict, for
        a backend that had no check) left off; runs of results start again at zero."""
        machine = cls(target, now)
        if isinstance(old, State):
            machine.state = old
            return machine
        machine.state = old.state
        machine.since = old.since
        machine.last = old.last
        machine.transitions = old.transitions
        machine.held_until = old.held_until
        machine._flaps = deque(old._flaps)
        machine._next_hold = old._next_hold
        machine._last_hold_end = old._last_hold_end
        return machine

    @property
    def last(self) -> ProbeResult | None:
        return None if self._last is None else ProbeResult(*self._last)

    @last.setter
    def last(self, result: ProbeResult | None) -> None:
        self._last = None if result is None else _fields(result)

    def status(self) -> TargetStatus:
        return TargetStatus(self.state, self.since, self.last, self.transitions, self.held_until)

    def record(self, result: ProbeResult) -> Transition | None:
        now = result.at
        self._last = fields = _fields(result)
        if result.inconclusive:
            self._stalled_run += 1
            if self._stalled_run <= self.fall:
                return None  # a short stall of the checker says nothing about the backend
        else:
            self._stalled_run = 0
        self._recent.append(fields)
        if result.ok:
            self._ok_run += 1
            self._fail_run = 0
        else:
            self._fail_run += 1
            self._ok_run = 0
        if self.state is not State.UP and self._ok_run >= self.rise:
            return self._to_up(now)
        if self.state is not State.DOWN and self._fail_run >= self.fall:
            return self._to_down(now, result)
        return None

    def _to_up(self, now: float) -> Transition | None:
        reason = f"{self._ok_run} consecutive successes"
        if self.held_until is not None:
            if now < self.held_until:
                return None  # flapping: held DOWN; the DOWN event already said until when
            reason += f"; flap hold-down ended after {_fmt_s(self.held_until - self.since)}"
            self.held_until = None
        if self.state is State.DOWN:
            self._flaps.append(now)
        return self._change(State.UP, now, reason, dampened=False)

    def _to_down(self, now: float, last: ProbeResult) -> Transition:
        reason = f"{self._fail_run} consecutive failures, last: {last.reason}"
        dampened = False
        if self.state is State.UP:
            self._flaps.append(now)
            self._forget_old_flaps(now)
            if len(self._flaps) > self.flap_threshold:
                hold = self._start_hold(now)
                dampened = True
                reason += (
                    f"; flapping ({len(self._flaps)} transitions within "
                    f"{_fmt_s(self.flap_window)}): held DOWN for {_fmt_s(hold)}"
                )
        return self._change(State.DOWN, now, reason, dampened)

    def _forget_old_flaps(self, now: float) -> None:
        while self._flaps and self._flaps[0] < now - self.flap_window:
            self._flaps.popleft()

    def _start_hold(self, now: float) -> float:
        quiet = self._last_hold_end is None or now - self._last_hold_end > self.flap_window
        hold = self.hold_down if quiet else self._next_hold
        self._next_hold = min(hold * 2, self.hold_down_max)
        self.held_until = now + hold
        self._last_hold_end = self.held_until
        return hold

    def _change(self, new: State, now: float, reason: str, dampened: bool) -> Transition:
        old = self.state
        self.state = new
        self.since = now
        self.transitions += 1
        recent = tuple(ProbeResult(*r) for r in self._recent)
        return Transition(self.target, old, new, reason, recent, dampened)
