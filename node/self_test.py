"""The forwarder self-test as the controller runs it: one at a time, over what changed plus a
rotating sample, and a failure acted on only when a fresh run confirms it.

A single glitch is seen by every node at once (same kernel, same program, same moment in a
rollout); acting on it would withdraw the fleet's VIPs together, so it is counted and
reported instead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from node.programming import SelfTestSample

SAMPLE = 32  # VIPs per periodic self-test round, besides those just programmed


@dataclass
class SelfTest:
    ok: bool
    reason: str
    at: float


class SelfTester:
    def __init__(self, forwarder: Any, metrics: Any, events: Any, on_change: Callable[[], None]) -> None:
        self.forwarder = forwarder
        self.metrics = metrics
        self.events = events
        self.on_change = on_change  # a verdict flipped: the controller decides again
        self.last = SelfTest(False, "not run yet", 0.0)
        self.sample = SelfTestSample(SAMPLE)
        self._lock = asyncio.Lock()  # the periodic and the post-sync self-test

    async def run(self, all_vips: list[str], changed: list[str] | None = None, sample: bool = True) -> SelfTest:
        """With ``changed`` (names just programmed): those, plus (with ``sample``) the next slice
        of a rotation over ``all_vips``, so the cost does not grow with the VIP count and every
        VIP is still checked every few rounds. None: every VIP."""
        if changed is None:
            vips = None
        else:
            vips = self.sample.next(all_vips, changed) if sample else sorted(changed)
        async with self._lock:
            ok, reason = await self._once(vips)
            if not ok:
                first = reason
                ok, reason = await self._once(vips)
                if ok:
                    self.metrics.self_test_glitches += 1
                    self.events.emit(
                        "forwarder_self_test_glitch",
                        f"forwarder self-test failed once ({first}) and passed on a fresh run; not acted on",
                        level="warning",
                    )
            return self._record(ok, reason)

    async def _once(self, vips: list[str] | None) -> tuple[bool, str]:
        try:
            result = await asyncio.to_thread(self._call, vips)
            return bool(result.ok), str(result.reason)
        except Exception as exc:
            return False, f"self-test raised {exc!r}"

    def _call(self, vips: list[str] | None) -> Any:
        return self.forwarder.self_test() if vips is None else self.forwarder.self_test(vips)

    def _record(self, ok: bool, reason: str) -> SelfTest:
        previous = self.last
        self.last = SelfTest(ok, reason, time.time())
        self.metrics.self_tests[ok] = self.metrics.self_tests.get(ok, 0) + 1
        if ok != previous.ok or previous.at == 0.0:
            self.events.emit(
                "forwarder_self_test_" + ("passed" if ok else "failed"),
                f"forwarder self-test {'passed' if ok else 'failed'}: {reason}",
                level="info" if ok else "error",
            )
            self.on_change()
        return self.last
