"""The lean tcp/http path (healthcheck.lean) against real loopback servers that answer with exact
bytes: the framings a backend may use, broken replies, timeouts, a late read of an answer that
came in time, many probes at once, and the one-timer schedule that drives them."""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
import threading
import time
from typing import Any

import pytest
from pydantic import TypeAdapter

from healthcheck import HealthMonitor, Prober, Target, probe
from node.config import HealthCheck

pytestmark = pytest.mark.integration
_checks = TypeAdapter(HealthCheck)


def target(port: int, address: str = "127.0.0.1", **check: Any) -> Target:
    return Target(ipaddress.ip_address(address), port, _checks.validate_python({"type": "http", **check}))


class Canned:
    """Answers every connection with ``reply`` (a list of byte strings sent with pauses between
    them), after reading the request head; records the requests. ``close`` ends the reply with
    a FIN, else the connection stays open until the client goes."""

    def __init__(self, reply: list[bytes], close: bool = True, pause: float = 0.01) -> None:
        self.reply, self.close, self.pause = reply, close, pause
        self.requests: list[bytes] = []

    async def __aenter__(self) -> "Canned":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            for i, part in enumerate(self.reply):
                if i:
                    await asyncio.sleep(self.pause)
                writer.write(part)
                await writer.drain()
            if not self.close:
                await reader.read()  # until the prober resets
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


OK_HEAD = b"HTTP/1.1 200 OK\r\n"


async def test_request_names_method_path_host_and_closes():
    async with Canned([OK_HEAD + b"Content-Length: 0\r\n\r\n"]) as srv:
        r = await probe(target(srv.port, method="HEAD", path="/a b?x=1"))
        assert r.ok and r.reason == "HTTP 200"
    head = srv.requests[0].decode()
    assert head.startswith("HEAD /a%20b?x=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{srv.port}\r\n" in head and "\r\nConnection: close\r\n" in head


@pytest.mark.parametrize(
    "reply",
    [
        [OK_HEAD + b"Content-Length: 11\r\n\r\nhello", b" world"],  # body in two segments
        [OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"6\r\n world\r\n0\r\n\r\n"],
        [OK_HEAD + b"\r\nhello", b" world"],  # no length: the body ends with the connection
        [b"HTTP/1.1 100 Continue\r\n\r\n", OK_HEAD + b"Content-Length: 11\r\n\r\nhello world"],
    ],
    ids=["content-length", "chunked", "until-close", "100-continue"],
)
async def test_body_match_in_every_framing(reply: list[bytes]):
    async with Canned(reply) as srv:
        r = await probe(target(srv.port, body="hello world"))
        assert r.ok and r.reason == "HTTP 200, body matched", r.reason
        r = await probe(target(srv.port, body_regex=r"^hello\s+world$"))
        assert r.ok, r.reason
        r = await probe(target(srv.port, body="goodbye"))
        assert not r.ok and r.reason == "body did not match"


async def test_only_body_limit_bytes_are_searched():
    from healthcheck.probes import BODY_LIMIT

    body = b"x" * BODY_LIMIT + b"needle"
    reply = [OK_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body]
    async with Canned(reply, close=False) as srv:
        r = await probe(target(srv.port, body="needle", timeout=2, interval=3))
        assert not r.ok and r.reason == "body did not match"  # and no wait for the rest


async def test_status_is_judged_without_waiting_for_the_body():
    """A status outside expect_status fails at once even if the body never ends."""
    async with Canned([b"HTTP/1.1 503 Busy\r\nContent-Length: 999\r\n\r\n"], close=False) as srv:
        r = await probe(target(srv.port, body="anything", timeout=2, interval=3))
        assert not r.ok and r.reason == "HTTP 503"  # not "timeout after 2 s"


@pytest.mark.parametrize(
    "reply, reason",
    [
        ([], "server closed the connection without a response"),
        ([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"], "bad HTTP response: invalid status line b'SSH-2.0-OpenSSH_9.2'"),
        ([OK_HEAD + b"Content-Le"], "bad HTTP response: closed inside the headers"),
        ([OK_HEAD + b"Content-Length: 10\r\n\r\nshort"], "bad HTTP response: closed before the end of the body"),
        ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"], "bad HTTP response: invalid chunk size b'zz'"),
        ([OK_HEAD + b"X: " + b"y" * 70000], "bad HTTP response: headers longer than 65536 bytes"),
    ],
    ids=["empty", "not-http", "cut-headers", "cut-body", "bad-chunk", "endless-headers"],
)
async def test_broken_replies_are_named(reply: list[bytes], reason: str):
    async with Canned(reply) as srv:
        r = await probe(target(srv.port, body="x"))
        assert not r.ok and r.reason == reason


async def test_a_backend_that_accepts_but_never_answers_times_out():
    async with Canned([], close=False) as srv:
        r = await probe(target(srv.port, timeout=0.2, interval=1))
        assert not r.ok and not r.inconclusive and r.reason == "timeout after 0.2 s"


async def test_an_answer_read_late_but_received_in_time_stands():
    """The backend answers at once, but the loop is held up just past the 0.3 s deadline (less
    than the stall grace): the kernel's receive time shows the answer came in time, so the
    backend is not failed for the checker's lateness."""
    async with Canned([OK_HEAD + b"Content-Length: 2\r\n\r\nok"]) as srv:
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, time.sleep, 0.32)  # past the deadline by ~0.04 s (grace 0.1 s)
        r = await probe(target(srv.port, timeout=0.3, interval=1))
        assert r.ok and r.reason == "HTTP 200", r.reason


async def test_a_backend_answering_after_the_deadline_is_a_timeout():
    """Data that truly arrives after the deadline is no answer, even when the loop reads it late
    for reasons of its own. The backend runs in a thread, so it answers while the loop is held."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def backend() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            time.sleep(0.32)  # past the 0.3 s deadline
            try:
                conn.sendall(OK_HEAD + b"Content-Length: 0\r\n\r\n")
                conn.recv(4096)
            except ConnectionResetError:
                pass  # the prober resets when it gives up

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()
    try:
        loop = asyncio.get_running_loop()
        loop.call_later(0.29, time.sleep, 0.06)  # the loop wakes at ~0.35 s and finds the reply
        r = await probe(target(listener.getsockname()[1], timeout=0.3, interval=1))
        assert not r.ok and r.reason.startswith("timeout after 0.3 s"), r.reason
    finally:
        thread.join(2)
        listener.close()


async def test_unroutable_and_unusable_addresses_are_reported():
    r = await probe(Target(ipaddress.ip_address("::1"), 1, _checks.validate_python({"type": "tcp"})))
    assert not r.ok and r.reason == "connection refused"
    r = await probe(Target(ipaddress.ip_address("127.0.0.1"), None, _checks.validate_python({"type": "tcp"})))
    assert not r.ok and r.reason.startswith("no port to probe")


async def test_a_cancelled_probe_releases_its_socket():
    async with Canned([], close=False) as srv:
        async with Prober() as prober:
            task = asyncio.ensure_future(prober.probe(target(srv.port, timeout=2, interval=3)))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert prober._lean is not None and not prober._lean._by_fd


async def test_many_probes_at_once_each_open_their_own_connection():
    """400 http probes in flight together through one Prober: every one is a new connection with
    its own request and verdict."""
    async with Canned([OK_HEAD + b"Content-Length: 2\r\n\r\nok"]) as srv:
        async with Prober() as prober:
            results = await asyncio.gather(*(prober.probe(target(srv.port, body="ok")) for _ in range(400)))
    assert all(r.ok for r in results), {r.reason for r in results if not r.ok}
    assert len(srv.requests) == 400


async def test_monitor_probes_tcp_http_and_exec_side_by_side_on_schedule(tmp_path):
    """The one-timer schedule runs lean (tcp, http) and task (exec) probes each at its own
    interval; removing a target stops its probes at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = listener.getsockname()[1]
    seen: dict[str, int] = {}
    failures: list[str] = []

    def on_probe(t: Target, scheduled: float, started: float, result: Any) -> None:
        if not result.ok:
            failures.append(f"{t.describe()}: {result.reason}")
        seen[t.check.type] = seen.get(t.check.type, 0) + 1

    try:
        async with Canned([OK_HEAD + b"Content-Length: 0\r\n\r\n"]) as srv:
            fast = dict(interval=0.05, timeout=0.04)
            tcp = Target(ipaddress.ip_address("127.0.0.1"), port, _checks.validate_python({"type": "tcp", **fast}))
            http = target(srv.port, **fast)
            exe = Target(ipaddress.ip_address("127.0.0.1"), 1,
                         _checks.validate_python({"type": "exec", "command": ["true"], "interval": 0.2, "timeout": 0.15}))
            mon = HealthMonitor(on_probe=on_probe)
            mon.update([tcp, http, exe])
            await mon.start()
            await asyncio.sleep(0.6)
            mon.update([tcp])
            counts = dict(seen)
            await asyncio.sleep(0.3)
            await mon.stop()
    finally:
        listener.close()
    assert not failures
    assert counts["tcp"] >= 6 and counts["http"] >= 6 and counts["exec"] >= 1
    assert seen["http"] == counts["http"] and seen["exec"] == counts["exec"]  # removed: no more
    assert seen["tcp"] > counts["tcp"]


def _listening_targets(n: int, check: dict) -> tuple[list[socket.socket], list[Target]]:
    """n listening sockets on loopback (connects complete from the backlog; nobody needs to
    accept) and a target of ``check`` on each; the caller closes the sockets."""
    listeners = []
    for _ in range(n):
        listeners.append(socket.socket())
        listeners[-1].bind(("127.0.0.1", 0))
        listeners[-1].listen(64)
    spec = _checks.validate_python(check)
    local = ipaddress.ip_address("127.0.0.1")
    return listeners, [Target(local, s.getsockname()[1], spec) for s in listeners]


async def test_after_a_stall_every_due_probe_starts_in_batches_and_none_is_lost(monkeypatch):
    """A stall makes every target due at once; the schedule starts them BATCH at a time (reading
    replies in between) and loses none: each target is probed after the stall, none fails."""
    from healthcheck import schedule

    monkeypatch.setattr(schedule, "BATCH", 16)
    listeners, targets = _listening_targets(100, {"type": "tcp", "interval": 0.2, "timeout": 0.1})
    started: dict[Target, list[float]] = {t: [] for t in targets}
    failures: list[str] = []

    def on_probe(t: Target, scheduled: float, start: float, result: Any) -> None:
        started[t].append(start)
        if not result.ok and not result.inconclusive:
            failures.append(f"{t.describe()}: {result.reason}")

    loop = asyncio.get_running_loop()
    mon = HealthMonitor(on_probe=on_probe)
    mon.update(targets)
    try:
        await mon.start()
        await asyncio.sleep(0.3)
        time.sleep(0.4)  # every target falls due while the loop is held
        after = loop.time()
        await asyncio.sleep(0.3)
    finally:
        await mon.stop()
        for s in listeners:
            s.close()
    assert not failures
    assert all(any(s >= after for s in starts) for starts in started.values())


async def test_a_raising_verdict_callback_costs_no_other_probe_its_verdict(caplog):
    """Verdicts of one readiness batch are delivered one by one: if one callback raises, the
    others still arrive. (The replies were read already: a verdict dropped here would only come
    back as a false timeout.)"""
    got: list[Any] = []

    def broken(result: Any) -> None:
        raise RuntimeError("callback bug")

    async with Canned([OK_HEAD + b"Content-Length: 2\r\n\r\nok"], close=False) as srv:
        t = target(srv.port, timeout=0.5, interval=1)
        async with Prober() as prober:
            for i in range(20):
                prober.start(t, broken if i % 2 else got.append)
            await asyncio.sleep(0.8)  # past the timeout: every verdict is in by now
    assert len(got) == 10 and all(r.ok for r in got), [r.reason for r in got]
    assert "a probe's verdict callback failed" in caplog.text


async def test_settle_judges_answers_already_in_without_an_event_loop_wakeup():
    """Prober.settle (what the schedule calls after a batch of starts) hands over the verdicts
    whose answer is already in, in the caller's own callback: the event loop never runs between
    start and verdict. Each probe is still its own new connection (accepted one by one), and
    ``start`` itself never calls back (the handle is returned first)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    tcp = Target(ipaddress.ip_address("127.0.0.1"), listener.getsockname()[1],
                 _checks.validate_python({"type": "tcp", "interval": 2, "timeout": 1}))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    refused = Target(ipaddress.ip_address("127.0.0.1"), closed.getsockname()[1], tcp.check)
    try:
        async with Prober() as prober:
            for want, t in ((True, tcp), (False, refused), (True, tcp)):
                got: list[Any] = []
                prober.start(t, got.append)
                assert got == []
                lean = prober._lean
                assert lean is not None
                # Block (outside the loop) until the kernel has the answer, then settle.
                ready, _, _ = select.select([lean._epoll.fileno()], [], [], 5)
                assert ready
                prober.settle()
                assert [r.ok for r in got] == [want], [r.reason for r in got]
                assert not lean._by_fd  # the socket is closed and forgotten
            listener.setblocking(False)
            accepted = 0
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted += 1
            assert accepted == 2
            prober.settle()  # nothing in flight: a no-op
    finally:
        listener.close()
        closed.close()


async def test_a_low_rate_schedule_starts_several_probes_per_wakeup_and_keeps_every_slot(monkeypatch):
    """Few probes due (40 targets every second): the schedule wakes on ticks that each start
    several probes, not once per probe; no probe starts before its slot, and each target's
    slots stay exactly one interval apart (the tick delays starts, never the schedule)."""
    listeners, targets = _listening_targets(40, {"type": "tcp", "interval": 1, "timeout": 0.5})
    from healthcheck.schedule import Schedule

    wakeups = []
    fire = Schedule._fire
    monkeypatch.setattr(Schedule, "_fire", lambda self: (wakeups.append(len(seen)), fire(self)))
    seen: list[tuple[Target, float, float, Any]] = []
    mon = HealthMonitor(on_probe=lambda t, scheduled, start, r: seen.append((t, scheduled, start, r)))
    mon.update(targets)
    try:
        await mon.start()
        while len({t for t, *_ in seen}) < 40 or len(seen) < 80:
            await asyncio.sleep(0.1)
    finally:
        await mon.stop()
        for s in listeners:
            s.close()
    assert all(r.ok for *_, r in seen), {r.reason for *_, r in seen if not r.ok}
    assert all(start >= scheduled for _, scheduled, start, _ in seen)
    first_round = [w for w in wakeups if w < 40]  # the wake-ups until 40 probes were done
    assert len(first_round) <= 25, f"{len(first_round)} wake-ups for 40 probes"
    by_target: dict[Target, list[float]] = {}
    for t, scheduled, _, _ in seen:
        by_target.setdefault(t, []).append(scheduled)
    gaps = [b - a for slots in by_target.values() for a, b in zip(slots, slots[1:])]
    assert gaps and all(g == pytest.approx(1.0, abs=1e-9) for g in gaps)
