"""When each target is probed: one heap and one timer for every target, not a task per target.

A sleeping task per target costs a future, a timer handle and a task step per probe; at 10,000
probes a second that churn alone is a large share of a core. Here time is cut in slots of
SLOT_GRAIN seconds: a job sits in the list of the slot its next probe falls in, a heap orders the
slot numbers, and one timer wakes at the earliest slot and starts its probes through
``Prober.start``, which for tcp and http costs no task at all. A probe starts at most SLOT_GRAIN
late, and a busy second starts probes in batches. (Slot numbers are plain ints, which the garbage
collector does not track: a heap of (time, job) tuples, one per probe living an interval each,
was promoted to the oldest generation by the thousand a second and made full collections
frequent.) A job is not due again until its probe has its verdict, so a slow probe
(bounded by its timeout, which is below the interval) only ever delays its own target; slots
missed while the process was stalled are skipped, not burst, and a target keeps its phase.

The timer wakes on ticks, not on every slot: when few probes are due (a node with a hundred
backends every 2 s), a wake-up per probe costs more than the probe (the event loop's iteration,
an epoll_wait, caches gone cold on a shared VM: ~0.4 ms of CPU a probe measured, against ~0.05
ms at 10,000 a second). The tick is sized so a wake-up starts about TICK_PROBES probes, never
longer than MAX_TICK nor a 20th of the shortest interval, never shorter than a slot: at 10,000
probes a second it is the slot; at 55 a second, 50 ms. A probe then starts at most one tick
late; its slot, so its interval and phase, do not move.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Any, Callable

from healthcheck.probes import Prober
from healthcheck.types import ProbeResult, Target

log = logging.getLogger("maglev.health")

SLOT_GRAIN = 0.002  # seconds; how late a probe may start so that due probes start together
BATCH = 256  # probes started per timer callback at most; the loop reads replies in between
TICK_PROBES = 16  # probes a wake-up should start on average, when the rate allows
MAX_TICK = 0.05  # seconds; the most a probe waits for its tick

# (owner, scheduled loop time, actual start loop time, result)
OnResult = Callable[[Any, float, float, ProbeResult], None]


class Job:
    """One target's place in the schedule; ``cancel()`` takes it out for good."""

    __slots__ = ("target", "owner", "interval", "next_at", "in_flight", "active", "schedule",
                 "started")

    def __init__(self, target: Target, owner: Any, first_at: float, schedule: "Schedule") -> None:
        self.target, self.owner, self.schedule = target, owner, schedule
        self.interval: float = target.check.interval
        self.next_at = first_at
        self.in_flight: Any = None  # the probe's handle while one runs
        self.started = 0.0  # loop time its probe in flight started (its slot is next_at)
        self.active = True

    def __call__(self, result: ProbeResult) -> None:
        """The verdict of its probe in flight. The job itself is the callback handed to the
        prober: a closure per probe (a function, its cells and their tuple) was most of the
        objects a probe made for the cyclic collector (about 15x more young passes, and full
        passes of 100-300 ms every few seconds at 10,000 probes a second, measured)."""
        self.schedule._finished(self, result)

    def cancel(self) -> None:
        if self.active:
            self.schedule._forget(self)
        self.active = False
        if self.in_flight is not None:
            self.in_flight.cancel()  # an exec probe's task kills and reaps its process group
            self.in_flight = None


class Schedule:
    """Runs every job's probes at ``first_at + k * interval`` and reports each verdict."""

    def __init__(self, prober: Prober, on_result: OnResult) -> None:
        self._prober = prober
        self._on_result = on_result
        self._loop = asyncio.get_running_loop()
        self._slots: dict[int, list[Job]] = {}  # slot number -> jobs due in it, in push order
        self._heap: list[int] = []  # the slot numbers in self._slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[Any]] = set()  # probes that run as tasks (exec, udp...)
        self._closed = False
        self._firing = False  # inside _fire, which arms the timer once at its end
        self._intervals: dict[float, int] = {}  # interval -> active jobs with it (sizes the tick)
        self.tick = SLOT_GRAIN

    def add(self, target: Target, owner: Any, first_at: float) -> Job:
        job = Job(target, owner, first_at, self)
        self._intervals[job.interval] = self._intervals.get(job.interval, 0) + 1
        self._size_tick()
        self._push(job)
        return job

    def _forget(self, job: Job) -> None:
        left = self._intervals.get(job.interval, 0) - 1
        if left > 0:
            self._intervals[job.interval] = left
        else:
            self._intervals.pop(job.interval, None)
        self._size_tick()

    def _size_tick(self) -> None:
        """TICK_PROBES probes' worth of time at the jobs' rate, bounded (see the module doc)."""
        if not self._intervals:
            self.tick = SLOT_GRAIN
            return
        rate = sum(n / interval for interval, n in self._intervals.items())
        tick = min(TICK_PROBES / rate, MAX_TICK, min(self._intervals) / 20)
        # A whole number of slots, so a tick never ends inside a slot it should have started.
        self.tick = max(1, math.floor(tick / SLOT_GRAIN)) * SLOT_GRAIN

    def _wake_for(self, slot: int) -> float:
        """The first tick at or after the slot's time."""
        tick = self.tick
        return math.ceil(slot * SLOT_GRAIN / tick - 1e-9) * tick

    async def close(self) -> None:
        """Stop: no probe starts or reports again; running task probes are cancelled and awaited
        (exec children are killed and reaped)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for jobs in self._slots.values():
            for job in jobs:
                job.cancel()
        self._slots.clear()
        self._heap.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ the timer

    def _push(self, job: Job) -> None:
        slot = math.ceil(job.next_at / SLOT_GRAIN)
        jobs = self._slots.get(slot)
        if jobs is None:
            self._slots[slot] = [job]
            heapq.heappush(self._heap, slot)
            if not self._firing:
                wake = self._wake_for(slot)
                if wake < self._timer_at:
                    self._arm(wake)
        else:
            jobs.append(job)

    def _arm(self, at: float) -> None:
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._firing = True
        try:
            self._start_due()
            # Verdicts already in (a nearby backend answers within the connect) are handled now
            # rather than in a wake-up of their own; the jobs they reschedule land in the heap.
            self._prober.settle()
        finally:  # whatever happened above, the schedule goes on
            self._firing = False
            heap, loop = self._heap, self._loop
            if self._timer is None and heap:
                self._arm(max(self._wake_for(heap[0]), loop.time() + SLOT_GRAIN / 2))

    def _start_due(self) -> None:
        """Start the probes of every slot that has come, BATCH at most (then arm for at once)."""
        heap, loop = self._heap, self._loop
        # The timer may run a hair before its slot's time (the loop's clock resolution, float
        # rounding of slot * SLOT_GRAIN): a thousandth of a slot of slack keeps it from missing.
        now_slot = math.floor(loop.time() / SLOT_GRAIN + 1e-3)
        budget = BATCH
        while heap and heap[0] <= now_slot:
            slot = heapq.heappop(heap)
            jobs = self._slots.pop(slot)
            for i, job in enumerate(jobs):
                if budget == 0:
                    # Behind schedule (a stall): start the rest after the loop has read the
                    # replies waiting for it, or a burst of starts would leave every verdict
                    # unread past its deadline and the next round later still.
                    self._slots[slot] = jobs[i:]
                    heapq.heappush(heap, slot)
                    self._arm(loop.time())
                    return
                if job.active:
                    self._launch(job)
                    budget -= 1

    def _launch(self, job: Job) -> None:
        job.started = self._loop.time()
        try:
            job.in_flight = handle = self._prober.start(job.target, job)
        except Exception:  # noqa: BLE001 - a bug in one probe must not stop every schedule
            log.exception("health: could not start a probe of %s", job.target.describe())
            self._reschedule(job)
            return
        if isinstance(handle, asyncio.Task):
            self._tasks.add(handle)
            handle.add_done_callback(self._tasks.discard)

    def _finished(self, job: Job, result: ProbeResult) -> None:
        """A verdict: a job has one probe in flight at most, and its slot (next_at) moves on
        only here, so next_at and started are still those of this probe."""
        job.in_flight = None
        if not job.active or self._closed:
            return  # removed while the probe was in flight: its verdict is meaningless
        try:
            self._on_result(job.owner, job.next_at, job.started, result)
        except Exception:  # noqa: BLE001 - the schedule of this and every other target goes on
            log.exception("health: handling the verdict on %s failed", job.target.describe())
        self._reschedule(job)

    def _reschedule(self, job: Job) -> None:
        job.next_at += job.interval
        now = self._loop.time()
        if job.next_at < now:
            # The loop stalled past a whole slot: skip the missed slots rather than bursting,
            # and keep the target's phase so the spread holds.
            job.next_at += math.ceil((now - job.next_at) / job.interval) * job.interval
        self._push(job)
