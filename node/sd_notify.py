"""systemd's notify protocol (sd_notify(3)), enough for Type=notify and WatchdogSec=.

systemd passes a datagram socket in $NOTIFY_SOCKET (a path, or '@name' for the abstract
namespace); a message is newline-separated KEY=VALUE pairs in one datagram. The node sends
READY=1 after its first successful reconcile (so `systemctl start` returns once the node
decides what to announce, and dependent units start after that), WATCHDOG=1 from its event
loop every half watchdog interval while the controller's loops run, and STOPPING=1 when it
begins a graceful stop. A frozen event loop stops the pings: systemd kills the node (SIGABRT,
then SIGKILL) and its children die with it, so the routers drop its routes and BFD sessions.

Without $NOTIFY_SOCKET (not under systemd) every call does nothing. Written here rather than
taken from a package: it is one sendto() and we want no extra dependency for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable, Mapping

log = logging.getLogger("maglev.systemd")


def _address(env: Mapping[str, str]) -> str | bytes | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path if path.startswith("/") else None


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification; True if it was sent. Never raises: losing a notification must
    not take the node down (a missed READY shows as a start timeout, a missed ping as a kill)."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
        return True
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", message.split("\n")[0], exc)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None when there is none (or it
    is meant for another process: $WATCHDOG_PID)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    owner = env.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 1_000_000


async def watchdog(interval: float, alive: Callable[[], bool], env: Mapping[str, str] | None = None) -> None:
    """Ping every interval/2 while alive() holds. When it does not, stop pinging and let
    systemd restart the node: a controller whose loops died must not keep its routes."""
    while True:
        if alive():
            notify("WATCHDOG=1", env)
        else:
            log.error("a controller loop has stopped; no more watchdog pings, systemd will restart the node")
            return
        await asyncio.sleep(interval / 2)
