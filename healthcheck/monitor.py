"""HealthMonitor: runs every target's probes on its own schedule and reports state changes.

Probes run from one schedule (healthcheck.schedule: slots and one timer, not a task per target);
a slow probe (bounded by its timeout, which is below the interval) only ever delays its own
target. Each target's first probe lands at a fixed offset inside its
interval derived from a hash of the target, so thousands of backends are spread evenly rather
than probed in one burst, and the spread is the same on every run and every node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import xxhash

from healthcheck.probes import Prober, Tunnel
from healthcheck.schedule import Job, Schedule
from healthcheck.state import StateMachine
from healthcheck.types import ProbeResult, State, Target, TargetStatus, Transition

log = logging.getLogger("maglev.health")

# Called after every probe with (target, scheduled loop time, actual start loop time, result);
# the bench measures lateness with it and tests observe the schedule.
ProbeHook = Callable[[Target, float, float, ProbeResult], None]


def first_offset(target: Target) -> float:
    """Where in [0, interval) the target's probes fall: a stable hash, not a random draw."""
    digest = xxhash.xxh64_intdigest(repr(target._key).encode())
    return (digest / 2**64) * target.check.interval


@dataclass
class _Entry:
    target: Target
    machine: StateMachine
    job: Job | None = None
    active: bool = True


class _EventStream:
    """An async iterator of transitions that is subscribed from the moment it is created, so no
    event falls between ``events()`` and the first ``await``."""

    def __init__(self, monitor: "HealthMonitor") -> None:
        self._monitor = monitor
        self._queue: asyncio.Queue[Transition | None] = asyncio.Queue()
        monitor._streams.append(self._queue)

    def __aiter__(self) -> "_EventStream":
        return self

    async def __anext__(self) -> Transition:
        item = await self._queue.get()
        if item is None:
            self.close()
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        if self._queue in self._monitor._streams:
            self._monitor._streams.remove(self._queue)


class HealthMonitor:
    """Probes a desired set of targets; reports transitions by callback and by ``events()``."""

    def __init__(
        self,
        on_transition: Callable[[Transition], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_probe: ProbeHook | None = None,
        tunnel: Tunnel | None = None,
    ) -> None:
        self._on_transition = on_transition
        self._tunnel = tunnel  # the node's, for via: tunnel checks (healthcheck.probes.Tunnel)
        self._on_probe = on_probe
        self._clock = clock
        self._entries: dict[Target, _Entry] = {}
        self._streams: list[asyncio.Queue[Transition | None]] = []
        self._prober: Prober | None = None
        self._schedule: Schedule | None = None
        self._running = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._running:
            return
        self._prober = Prober(self._clock, self._tunnel)
        self._schedule = Schedule(self._prober, self._record)
        self._running = True
        for entry in self._entries.values():
            self._spawn(entry)

    async def stop(self) -> None:
        """Cancel every probe (exec children are killed and reaped) and end event streams."""
        self._running = False
        for entry in self._entries.values():
            entry.job = None
        if self._schedule is not None:
            await self._schedule.close()
            self._schedule = None
        if self._prober is not None:
            await self._prober.close()
            self._prober = None
        for queue in list(self._streams):
            queue.put_nowait(None)

    # ------------------------------------------------------------------ the desired set

    def update(self, targets: Iterable[Target], inherit: Mapping[Target, Target | State] | None = None) -> None:
        """Make the probed set equal ``targets``: unchanged targets keep their state and schedule,
        removed ones are cancelled at once and never probed again. A new target starts UNKNOWN
        unless ``inherit`` names what it replaces: a target probed until now (its verdict and
        flap history carry over) or a bare verdict (a backend that had no check)."""
        wanted = set(targets)
        inherit = inherit or {}
        machines = {t: e.machine for t, e in self._entries.items()}
        for target in [t for t in self._entries if t not in wanted]:
            entry = self._entries.pop(target)
            entry.active = False
            if entry.job is not None:
                entry.job.cancel()
        for target in wanted:
            if target not in self._entries:
                entry = _Entry(target, self._machine_for(target, inherit.get(target), machines))
                self._entries[target] = entry
                if self._running:
                    self._spawn(entry)

    def _machine_for(self, target: Target, old: Target | State | None,
                     machines: Mapping[Target, StateMachine]) -> StateMachine:
        now = self._clock()
        if isinstance(old, State):
            return StateMachine.taking_over(target, now, old)
        if old is not None and old in machines:
            return StateMachine.taking_over(target, now, machines[old])
        return StateMachine(target, now)

    def snapshot(self) -> dict[Target, TargetStatus]:
        return {t: e.machine.status() for t, e in self._entries.items()}

    def events(self) -> _EventStream:
        """A stream of every transition from now on; it ends when the monitor stops."""
        return _EventStream(self)

    # ------------------------------------------------------------------ probing

    def _spawn(self, entry: _Entry) -> None:
        assert self._schedule is not None
        first_at = asyncio.get_running_loop().time() + first_offset(entry.target)
        entry.job = self._schedule.add(entry.target, entry, first_at)

    def _record(self, entry: _Entry, scheduled: float, started: float, result: ProbeResult) -> None:
        if self._on_probe is not None:
            try:
                self._on_probe(entry.target, scheduled, started, result)
            except Exception:
                log.exception("health: the probe hook failed for %s", entry.target.describe())
        transition = entry.machine.record(result)
        if transition is None:
            return
        self._log(transition)
        if self._on_transition is not None:
            try:
                self._on_transition(transition)
            except Exception:
                log.exception("health: the transition callback failed for %s", entry.target.describe())
        for queue in self._streams:
            queue.put_nowait(transition)

    @staticmethod
    def _log(t: Transition) -> None:
        level = logging.WARNING if t.new is State.DOWN else logging.INFO
        log.log(
            level,
            "health: backend %s %s -> %s: %s",
            t.target.describe(),
            t.old.name,
            t.new.name,
            t.reason,
        )
