"""node.sd_notify against a real datagram socket the test listens on, as systemd's would."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from node import sd_notify


@pytest.fixture
def listener(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(5)
    yield s, str(tmp_path / "notify")
    s.close()


def test_notify_sends_one_datagram_per_message(listener):
    sock, path = listener
    assert sd_notify.notify("READY=1\nSTATUS=reconciled", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=reconciled"


def test_abstract_socket_names_start_with_at():
    name = f"maglev-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        assert sd_notify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


def test_without_systemd_nothing_is_sent_and_nothing_fails(tmp_path):
    assert sd_notify.notify("READY=1", {}) is False
    assert sd_notify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    # A socket that went away: a warning, never an exception.
    assert sd_notify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_is_for_this_process_only():
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 10.0
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42"}, pid=42) == 4.0
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42"}, pid=43) is None
    assert sd_notify.watchdog_interval({}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_while_alive_and_stops_when_a_loop_died(listener):
    sock, path = listener
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    alive = [True]
    task = asyncio.create_task(sd_notify.watchdog(0.1, lambda: alive[0], {"NOTIFY_SOCKET": path}))
    pings = [await asyncio.wait_for(loop.sock_recv(sock, 100), 5) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3
    alive[0] = False
    await asyncio.wait_for(task, 5)  # returns: no more pings, so systemd's timer runs out
    assert task.exception() is None


async def test_ready_is_sent_only_after_the_first_successful_reconcile(listener, monkeypatch):
    """`maglev node`'s READY task waits for Controller.reconciled (set by the reconcile loop)."""
    from types import SimpleNamespace

    from node.commands.node import _ready_when_reconciled

    sock, path = listener
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    controller = SimpleNamespace(reconciled=asyncio.Event(), config=SimpleNamespace(node_id="lb-1"), vips={"web": 1})
    task = asyncio.create_task(_ready_when_reconciled(controller))
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(BlockingIOError):
        sock.recv(100)  # nothing yet: not reconciled
    controller.reconciled.set()
    await asyncio.wait_for(task, 5)
    assert sock.recv(4096) == b"READY=1\nSTATUS=node lb-1: reconciled, 1 VIP(s)"


async def test_the_systemd_tasks_are_supervised_and_a_crash_is_restarted(listener, monkeypatch):
    """READY and the watchdog run under the controller's supervisor: a ping task that crashes
    is reported and started again (before, it died silently and systemd restarted a healthy node)."""
    from types import SimpleNamespace

    from node.commands.node import spawn_systemd_tasks
    from node.supervisor import Supervisor

    sock, path = listener
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    emitted = []
    events = SimpleNamespace(emit=lambda kind, msg, **kw: emitted.append((kind, kw.get("task"))))
    supervisor = Supervisor(events, backoff_initial=0.01)
    calls = [0]

    def alive() -> bool:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("status read failed")
        return True

    controller = SimpleNamespace(supervisor=supervisor, alive=alive, reconciled=asyncio.Event(),
                                 config=SimpleNamespace(node_id="lb-1"), vips={})
    spawn_systemd_tasks(controller)
    assert set(supervisor.tasks) == {"systemd-ready", "systemd-watchdog"}
    loop = asyncio.get_running_loop()
    pings = [await asyncio.wait_for(loop.sock_recv(sock, 100), 5) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3  # pinging again after the crash
    assert ("task_restarted", "systemd-watchdog") in emitted
    assert supervisor.tasks["systemd-watchdog"].restarts == 1
    await supervisor.stop()
