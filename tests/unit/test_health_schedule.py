"""How long the schedule's ticks are (healthcheck.schedule): sized from the probe rate of the
jobs it holds, so a node with few probes due wakes once for several, and a busy checker is as
punctual as its slots."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import TypeAdapter

from healthcheck import Target
from healthcheck.schedule import MAX_TICK, SLOT_GRAIN, Schedule
from node.config import HealthCheck

_checks = TypeAdapter(HealthCheck)


class NoProber:
    def start(self, target, done):  # never reached: no test lets a slot come
        raise AssertionError("probe started")

    def settle(self) -> None:
        pass


def targets(n: int, interval: float) -> list[Target]:
    check = _checks.validate_python({"type": "tcp", "interval": interval, "timeout": interval / 2})
    return [Target(ipaddress.ip_address(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"), 80, check)
            for i in range(n)]


@pytest.mark.parametrize("n, interval, tick", [
    (110, 2.0, MAX_TICK),  # 55 probes a second: the longest tick
    (10_000, 1.0, SLOT_GRAIN),  # 10,000 a second: every slot
    (1000, 1.0, 0.016),  # 16 probes' worth
    (1, 0.1, 0.004),  # a 20th of the shortest interval, in whole slots (5 ms -> 4)
])
async def test_the_tick_follows_the_rate_and_is_bounded(n, interval, tick):
    sched = Schedule(NoProber(), lambda *a: None)
    for t in targets(n, interval):
        sched.add(t, None, first_at=1e9)
    assert sched.tick == pytest.approx(tick)
    await sched.close()


async def test_the_tick_shrinks_back_when_jobs_go_and_a_faster_check_comes():
    sched = Schedule(NoProber(), lambda *a: None)
    slow = [sched.add(t, None, first_at=1e9) for t in targets(110, 2.0)]
    assert sched.tick == pytest.approx(MAX_TICK)
    fast = sched.add(targets(1, 0.05)[0], None, first_at=1e9)
    assert sched.tick == pytest.approx(SLOT_GRAIN)  # 0.05 s / 20, at least a slot
    fast.cancel()
    fast.cancel()  # twice: counted once
    assert sched.tick == pytest.approx(MAX_TICK)
    for job in slow:
        job.cancel()
    assert sched.tick == SLOT_GRAIN
    await sched.close()
