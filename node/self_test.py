"""The forwarder self-test as the controller runs it: one at a time, over what changed plus a
rotating sample, and a failure acted on only when a fresh run confirms it.

A single glitch is seen by every node at once (same kernel, same program, same moment in a
rollout); acting on it would withdraw the fleet's VIPs together, so it is counted and
reported instead. A confirmed failure is acted on at its own scope: a VIP whose packet does
not come out as the model says is withdrawn alone (its table or entries are wrong on this
node); only a failure of the forwarder as a whole (not open, program replaced, maps
unreadable) withdraws every VIP.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from node.programming import SelfTestSample

# The periodic rounds test a rotating slice of the VIPs (besides those just programmed and
# those failing), sized so every VIP is tested at least once per CYCLE seconds: a round costs
# about what its VIPs cost (measured at 100 VIPs of 100 backends: 32 of them every 5 s, ~0.5 ms
# of CPU each, were 0.3-0.4 % of a core, an eighth of the idle node), and testing each VIP every
# 16 s bought nothing an operator asked for. A slice is at least
# SAMPLE_MIN and at most SAMPLE VIPs; past SAMPLE x CYCLE / self_test_interval VIPs (384 at the
# defaults) the cycle grows instead: VIPs / SAMPLE rounds.
CYCLE = 60.0
SAMPLE = 32
SAMPLE_MIN = 4


def sample_size(vips: int, interval: float) -> int:
    """VIPs per periodic round for ``vips`` VIPs tested every ``interval`` seconds."""
    return max(SAMPLE_MIN, min(SAMPLE, math.ceil(vips * interval / CYCLE)))


@dataclass
class SelfTest:
    """The last run: ``ok`` is the forwarder as a whole; ``faults`` the VIPs withdrawn alone."""

    ok: bool
    reason: str
    at: float
    faults: dict[str, str] = field(default_factory=dict)


@dataclass
class _Run:
    ok: bool  # the forwarder as a whole
    reason: str
    failed: dict[str, str]  # VIP -> reason, checks that failed
    passed: set[str]  # VIPs whose check passed


def _read(result: Any) -> _Run:
    """A forwarder's SelfTestResult as a _Run. A failure without per-VIP checks (or flagged
    node_wide) is the forwarder's as a whole."""
    checks = getattr(result, "checks", ()) or ()
    failed = {c.vip: str(c.reason) for c in checks if not c.ok}
    passed = {c.vip for c in checks if c.ok}
    # Some VIPs failing, and nothing wrong with the forwarder as a whole: those VIPs' fault.
    whole_ok = bool(result.ok) or (bool(failed) and not getattr(result, "node_wide", False))
    return _Run(whole_ok, str(result.reason), failed, passed)


class SelfTester:
    def __init__(self, forwarder: Any, metrics: Any, events: Any,
                 on_change: Callable[[set[str] | None], None],
                 interval: Callable[[], float] = lambda: 5.0) -> None:
        self.forwarder = forwarder
        self.metrics = metrics
        self.events = events
        # A verdict flipped: the controller decides again (these VIPs; None: every VIP).
        self.on_change = on_change
        self.last = SelfTest(False, "not run yet", 0.0)
        self.sample = SelfTestSample(SAMPLE)
        self.interval = interval  # seconds between periodic rounds (forwarder.self_test_interval)
        self._lock = asyncio.Lock()  # the periodic and the post-sync self-test

    @property
    def faults(self) -> dict[str, str]:
        """VIP -> why its confirmed self-test failed; withdrawn until a check of it passes."""
        return self.last.faults

    async def run(self, all_vips: list[str], changed: list[str] | None = None, sample: bool = True) -> SelfTest:
        """With ``changed`` (names just programmed): those, plus (with ``sample``) the next slice
        of a rotation over ``all_vips``, plus the VIPs failing now (so they come back as soon as
        they pass), so the cost does not grow with the VIP count and every VIP is still checked
        within CYCLE seconds (longer past 384 VIPs, see sample_size). None: every VIP."""
        if changed is None:
            vips = None
        else:
            self.sample.size = sample_size(len(all_vips), self.interval())
            picked = self.sample.next(all_vips, changed) if sample else sorted(changed)
            vips = sorted(set(picked) | (self.faults.keys() & set(all_vips)))
        async with self._lock:
            run = await self._once(vips)
            if not run.ok or run.failed:
                first = run
                run = await self._once(vips)
                glitched = (not first.ok and run.ok) or (first.failed.keys() - run.failed.keys())
                if glitched:
                    self.metrics.self_test_glitches += 1
                    self.events.emit(
                        "forwarder_self_test_glitch",
                        f"forwarder self-test failed once ({first.reason}) and passed on a fresh run; not acted on",
                        level="warning",
                    )
                # Only what failed twice in a row counts.
                run.failed = {v: r for v, r in run.failed.items() if v in first.failed}
            return self._record(run, set(all_vips))

    async def _once(self, vips: list[str] | None) -> _Run:
        try:
            result = await asyncio.to_thread(self._call, vips)
        except Exception as exc:
            return _Run(False, f"self-test raised {exc!r}", {}, set())
        return _read(result)

    def _call(self, vips: list[str] | None) -> Any:
        return self.forwarder.self_test() if vips is None else self.forwarder.self_test(vips)

    def _record(self, run: _Run, configured: set[str]) -> SelfTest:
        previous = self.last
        faults = {v: r for v, r in previous.faults.items() if v in configured and v not in run.passed}
        faults.update(run.failed)
        reason = run.reason if not run.ok else (
            f"{len(faults)} VIP(s) failing their check: " + "; ".join(f"{v}: {r}" for v, r in sorted(faults.items()))
            if faults else run.reason)
        self.last = SelfTest(run.ok, reason, time.time(), faults)
        self.metrics.self_tests[run.ok and not run.failed] = self.metrics.self_tests.get(run.ok and not run.failed, 0) + 1
        if run.ok != previous.ok or previous.at == 0.0:
            self.events.emit(
                "forwarder_self_test_" + ("passed" if run.ok else "failed"),
                f"forwarder self-test {'passed' if run.ok else 'failed'}: {run.reason}",
                level="info" if run.ok else "error",
            )
            self.on_change(None)
        flipped = faults.keys() ^ previous.faults.keys()
        for vip in sorted(faults.keys() - previous.faults.keys()):
            self.events.emit("vip_self_test_failed",
                             f"VIP {vip}: forwarder self-test failed twice ({faults[vip]}); "
                             "this VIP is withdrawn on this node until its check passes", level="error", vip=vip)
        for vip in sorted(previous.faults.keys() - faults.keys()):
            if vip in configured:
                self.events.emit("vip_self_test_passed", f"VIP {vip}: forwarder self-test passes again", vip=vip)
        if flipped:
            self.on_change(flipped)
        return self.last
