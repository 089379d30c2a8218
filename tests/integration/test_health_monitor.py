"""HealthMonitor against real loopback servers: schedule, spread, de-duplication, runtime
updates, dampening, streams and clean stops. Intervals are tens of milliseconds so the whole file
runs in a few seconds."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from healthcheck import HealthMonitor, ProbeResult, State, Target, Transition
from healthcheck.monitor import first_offset
from node.config import HealthCheck

pytestmark = pytest.mark.integration
_checks = TypeAdapter(HealthCheck)


def target(backend_port: int | None, address: str = "127.0.0.1", **check: Any) -> Target:
    data = {"type": "tcp", "interval": 0.05, "timeout": 0.04, **check}
    return Target(ipaddress.ip_address(address), backend_port, _checks.validate_python(data))


class Listener:
    """A TCP port that can be opened and closed: open means connects succeed (the kernel
    completes the handshake from the backlog), closed means connection refused."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.sock: socket.socket | None = None

    def open(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(512)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class CountingServer:
    """Counts TCP connections, so tests see what actually reached the backend."""

    def __init__(self) -> None:
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.probes: list[tuple[Target, float, float, ProbeResult]] = []

    def transition(self, t: Transition) -> None:
        self.transitions.append(t)

    def probe(self, target: Target, scheduled: float, started: float, result: ProbeResult) -> None:
        self.probes.append((target, scheduled, started, result))

    def monitor(self) -> HealthMonitor:
        return HealthMonitor(self.transition, on_probe=self.probe)

    def probes_of(self, t: Target) -> list[ProbeResult]:
        return [p[3] for p in self.probes if p[0] == t]


async def wait_for(cond, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


async def test_rise_and_fall_counts_are_exact(listener: Listener):
    listener.open()
    rec = Recorder()
    mon = rec.monitor()
    t = target(listener.port, rise=3, fall=2)
    mon.update([t])
    await mon.start()
    try:
        await wait_for(lambda: len(rec.transitions) == 1)
        up = rec.transitions[0]
        assert (up.old, up.new) == (State.UNKNOWN, State.UP)
        # The UP came with the third probe, and every one of the three succeeded.
        assert len(rec.probes_of(t)) == 3 and [r.ok for r in up.results] == [True] * 3
        listener.close()
        n_before = len(rec.probes_of(t))
        await wait_for(lambda: len(rec.transitions) == 2)
        down = rec.transitions[1]
        assert (down.old, down.new) == (State.UP, State.DOWN)
        failures = [r for r in rec.probes_of(t)[n_before:]]
        assert [r.ok for r in failures] == [False, False]
        assert down.reason == "2 consecutive failures, last: connection refused"
        status = mon.snapshot()[t]
        assert status.state is State.DOWN and status.transitions == 2
        assert status.last is not None and status.last.reason == "connection refused"
    finally:
        await mon.stop()


async def test_first_probes_are_spread_over_the_interval():
    rec = Recorder()
    mon = rec.monitor()
    # 40 targets on ports nobody listens on (refused quickly): only the schedule matters.
    targets = [target(20000 + i, interval=0.2, timeout=0.1) for i in range(40)]
    mon.update(targets)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await mon.start()
    try:
        await wait_for(lambda: len({p[0] for p in rec.probes}) == 40)
    finally:
        await mon.stop()
    # The planned times, not the start times: where each probe is due is the schedule's
    # decision and does not depend on how busy the machine is (a slow probe delaying nobody
    # else is the next test's subject).
    first: dict[Target, float] = {}
    for t, scheduled, _, _ in rec.probes:
        first.setdefault(t, scheduled)
    offsets = sorted(s - began for s in first.values())
    assert offsets[-1] - offsets[0] > 0.1, "first probes bunched together"
    # Four 50 ms slices of the interval each get some of the targets: no burst.
    slices = [sum(1 for o in offsets if i * 0.05 <= o < (i + 1) * 0.05) for i in range(4)]
    assert all(s >= 3 for s in slices), slices
    # And each is due where its hash says (to the schedule's 2 ms slot).
    for t, scheduled in first.items():
        assert scheduled - began == pytest.approx(first_offset(t), abs=0.01)


async def test_a_slow_probe_does_not_delay_the_others(tmp_path: Path, listener: Listener):
    listener.open()
    rec = Recorder()
    mon = rec.monitor()
    slow = target(80, type="exec", command=["sleep", "5"], interval=2.0, timeout=1.0)
    fast = target(listener.port, interval=0.03, timeout=0.02)
    mon.update([slow, fast])
    await mon.start()
    try:
        await wait_for(lambda: rec.probes_of(slow), timeout=5.0)
    finally:
        await mon.stop()
    # Probes are recorded as they finish: the fast target's probes that started after the slow
    # probe and finished before it ran while it was hanging (an order, not a timing: on a
    # loaded machine fewer fit in the second, but a blocking monitor would fit none).
    done_at = next(i for i, p in enumerate(rec.probes) if p[0] == slow)
    slow_started = rec.probes[done_at][2]
    during = [p for p in rec.probes[:done_at] if p[0] == fast and p[2] > slow_started]
    assert len(during) >= 3, f"only {len(during)} fast probe(s) ran while the slow one hung"
    assert all(r.ok for _, _, _, r in during), [r.reason for *_, r in during if not r.ok]
    assert all(r.reason == "timeout after 1 s" for r in rec.probes_of(slow)), rec.probes_of(slow)


async def test_identical_checks_are_probed_once():
    server = CountingServer()
    port = await server.start()
    rec = Recorder()
    mon = rec.monitor()
    # Two VIPs share a backend and its check; two more VIPs (ports 9999 and 80) check the same
    # backend on a port set in the check, which overrides theirs.
    a = target(port, interval=0.1, timeout=0.05)
    b = target(port, interval=0.1, timeout=0.05)
    c = target(9999, interval=0.1, timeout=0.05, port=port)
    d = target(80, interval=0.1, timeout=0.05, port=port)
    mon.update([a, b, c])
    mon.update([a, b, c, d])  # repeated updates do not duplicate either
    assert len(mon.snapshot()) == 2 and a in mon.snapshot() and d in mon.snapshot()
    await mon.start()
    try:
        await wait_for(lambda: all(len(rec.probes_of(t)) >= 5 for t in (a, d)), timeout=10.0)
    finally:
        await mon.stop()
    try:
        # The kernel completes a connect before the server's accept handler counts it.
        await wait_for(lambda: server.connections >= len(rec.probes), timeout=5.0)
    finally:
        await server.stop()
    # Two distinct targets ({a, b} and {c, d}: their check JSON differs), each probed on one
    # schedule: the planned times of its probes are an interval apart or more (a slot missed
    # under load is skipped), never two probes of one check in an interval. Planned times,
    # not measured ones: this holds however loaded the machine is.
    assert {p[0] for p in rec.probes} == {a, d}
    for t in (a, d):
        planned = sorted(p[1] for p in rec.probes if p[0] == t)
        gaps = [later - earlier for earlier, later in zip(planned, planned[1:])]
        assert all(g >= 0.1 - 1e-6 for g in gaps), (t.describe(), gaps)
    # Every reported probe is one connection; at most one more per check was in flight when the
    # monitor stopped (a job is not due again before its verdict).
    assert len(rec.probes) <= server.connections <= len(rec.probes) + 2, (len(rec.probes), server.connections)


async def test_update_keeps_unchanged_state_and_never_probes_removed_targets(listener: Listener):
    listener.open()
    removed_server = CountingServer()
    removed_port = await removed_server.start()
    rec = Recorder()
    mon = rec.monitor()
    keep = target(listener.port, rise=1)
    drop = target(removed_port, rise=1)
    mon.update([keep, drop])
    await mon.start()
    try:
        await wait_for(lambda: all(s.state is State.UP for s in mon.snapshot().values()))
        before = mon.snapshot()[keep]
        added = target(listener.port, rise=2, interval=0.06)  # a changed check is a new target
        mon.update([keep, added])
        snap = mon.snapshot()
        assert set(snap) == {keep, added}
        assert snap[keep].state is State.UP and snap[keep].since == before.since
        assert snap[keep].transitions == before.transitions
        assert snap[added].state is State.UNKNOWN
        # Wait on the new target's verdict (two probes), not a fixed time: a probe of the
        # removed one in flight at the update may still land meanwhile; none may start after.
        await wait_for(lambda: mon.snapshot()[added].state is State.UP, timeout=5.0)
        seen, probes_seen = removed_server.connections, len(rec.probes)
        await wait_for(lambda: len([p for p in rec.probes[probes_seen:] if p[0] == keep]) >= 3, timeout=5.0)
        assert removed_server.connections == seen, "a removed backend was probed again"
        assert not [p for p in rec.probes[probes_seen:] if p[0] == drop]
        assert [t.new for t in rec.transitions if t.target == keep] == [State.UP]
    finally:
        await mon.stop()
        await removed_server.stop()


async def test_flapping_backend_is_held_down(listener: Listener):
    rec = Recorder()
    mon = rec.monitor()
    t = target(listener.port, rise=1, fall=1, interval=0.02, timeout=0.015,
               flap_threshold=3, flap_window=10, hold_down=0.4, hold_down_max=1)
    listener.open()
    mon.update([t])
    await mon.start()
    try:
        # Flip the backend every 60 ms until the monitor holds it down.
        for _ in range(30):
            await asyncio.sleep(0.06)
            listener.close() if listener.sock else listener.open()
            if any(x.dampened for x in rec.transitions):
                break
        held = [x for x in rec.transitions if x.dampened]
        assert len(held) == 1 and held[0].new is State.DOWN
        assert "flapping" in held[0].reason and "held DOWN for 0.4 s" in held[0].reason
        held_at = held[0].results[-1].at
        listener.open()  # healthy from now on, but held
        await asyncio.sleep(0.25)
        assert mon.snapshot()[t].state is State.DOWN
        assert mon.snapshot()[t].held_until == pytest.approx(held_at + 0.4)
        await wait_for(lambda: mon.snapshot()[t].state is State.UP, timeout=1.0)
        up = rec.transitions[-1]
        assert up.new is State.UP and "hold-down ended" in up.reason
        assert up.results[-1].at >= held_at + 0.4
    finally:
        await mon.stop()


async def test_event_stream_sees_every_transition(listener: Listener):
    listener.open()
    rec = Recorder()
    mon = rec.monitor()
    stream = mon.events()
    mon.update([target(listener.port, rise=1, fall=1)])
    await mon.start()
    got = []

    async def consume() -> None:
        async for ev in stream:
            got.append(ev)

    consumer = asyncio.create_task(consume())
    await wait_for(lambda: len(rec.transitions) == 1)
    listener.close()
    await wait_for(lambda: len(rec.transitions) == 2)
    await mon.stop()
    await asyncio.wait_for(consumer, 1)  # the stream ends when the monitor stops
    assert got == rec.transitions


async def test_stop_kills_and_reaps_running_exec_probes(tmp_path: Path):
    pidfile = tmp_path / "pid"
    mon = HealthMonitor()
    mon.update([target(80, type="exec", command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
                       interval=1, timeout=0.9)])
    await mon.start()
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "", timeout=2)
    pid = int(pidfile.read_text())
    await mon.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # not running, and not a zombie either


async def test_a_failing_callback_does_not_stop_probing(listener: Listener):
    listener.open()
    calls = []

    def bad(t: Transition) -> None:
        calls.append(t)
        raise RuntimeError("controller bug")

    mon = HealthMonitor(bad)
    t = target(listener.port, rise=1, fall=1)
    mon.update([t])
    await mon.start()
    try:
        await wait_for(lambda: len(calls) == 1)
        listener.close()
        await wait_for(lambda: len(calls) == 2)
    finally:
        await mon.stop()


async def test_a_changed_check_takes_over_the_verdict_then_decides_by_its_own_probes(listener: Listener):
    listener.open()
    rec = Recorder()
    mon = rec.monitor()
    old = target(listener.port, rise=1)
    static = target(listener.port, address="127.0.0.2", rise=1)
    mon.update([old])
    await mon.start()
    try:
        await wait_for(lambda: mon.snapshot()[old].state is State.UP)
        new = target(listener.port, rise=3, fall=2, interval=0.06)  # an edited check
        mon.update([new, static], {new: old, static: State.UP})
        snap = mon.snapshot()
        assert set(snap) == {new, static}
        assert snap[new].state is State.UP and snap[static].state is State.UP
        await wait_for(lambda: len(rec.probes_of(new)) >= 4)
        assert [t for t in rec.transitions if t.target == new] == []  # confirmed, not re-learnt
        listener.close()
        await wait_for(lambda: mon.snapshot()[new].state is State.DOWN)
        (down,) = [t for t in rec.transitions if t.target == new]
        assert down.old is State.UP and down.reason.startswith("2 consecutive failures")
    finally:
        await mon.stop()
