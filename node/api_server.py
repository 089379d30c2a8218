"""The API's listening socket, guarded so API load can never starve the node.

Every socket the node needs (health probes, self-tests, the BGP speaker's pipes) comes out of
the same per-process file-handle limit as the API's connections. Left alone, 1000 idle local
connections (no token needed to open one) used every handle: probes failed, every backend went
DOWN and the node withdrew its VIPs. So:

- at start the soft RLIMIT_NOFILE is raised to the hard limit, and a limit too small to run a
  node is a clear start error;
- the API holds at most ``api_connection_cap(limit)`` connections (a fraction of the limit, so
  the rest stays reserved for the node's own sockets): at the cap it stops accepting, and new
  connections wait in the kernel's listen queue, which costs the process no handle at all
  (answering them 503 would not: under a flood, each accepted-then-refused socket is a handle);
- a connection must deliver a complete request head within HEADER_TIMEOUT and may then idle
  at most IDLE_TIMEOUT between requests (slowloris); a request body must arrive within
  BODY_TIMEOUT (api.py's guard middleware) and is at most MAX_BODY bytes.

The node runs its own accept loop (loop.sock_accept, then connect_accepted_socket) so that it can
stop accepting at the cap, and wraps aiohttp's protocol factory rather than patching it: each
accepted connection gets a small protocol that counts it, arms its deadline and passes every
byte on. The accept loop cannot die: an accept error (EMFILE...) is counted, logged at most every
ACCEPT_ERROR_LOG_EVERY seconds, and retried after a pause.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

HEADER_TIMEOUT = 5.0  # seconds from accept (or from the last response) to a complete request head
IDLE_TIMEOUT = 15.0  # seconds a keep-alive connection may wait for its next request
BODY_TIMEOUT = 10.0  # seconds to receive a request body
MAX_BODY = 1024 * 1024  # bytes; a VIP object with the forwarder's 8191 backends is ~400 KB
API_MAX_CONNECTIONS = 256
API_SHARE_OF_FILES = 8  # the API may use at most 1/8 of the file-handle limit
MIN_FILE_HANDLES = 512  # below this a node with a few VIPs and checks cannot run reliably
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF = 0.5  # seconds to wait after a failed accept (out of handles: let probes have them)
ACCEPT_ERROR_LOG_EVERY = 30.0


class FileLimitError(Exception):
    pass


def reserve_file_handles(minimum: int = MIN_FILE_HANDLES) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it; refuse to start below
    ``minimum`` with a message that says how to fix it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit; the check below decides whether it is enough
    if soft < minimum:
        raise FileLimitError(
            f"the open-file limit (RLIMIT_NOFILE) is {soft} (hard {hard}); a node needs at least "
            f"{minimum} for health probes, self-tests, BGP and the API: raise it (ulimit -n, "
            "LimitNOFILE= in the systemd unit, or --ulimit nofile= for a container)"
        )
    return soft


def api_connection_cap(file_limit: int) -> int:
    return max(8, min(API_MAX_CONNECTIONS, file_limit // API_SHARE_OF_FILES))


@dataclass
class GuardStats:
    open: int = 0
    at_limit: int = 0  # times the accept loop paused at the cap
    timed_out: int = 0  # closed for a slow or missing request head, or idling too long
    accept_errors: int = 0


class ConnectionGuard:
    """Protocol factory for loop.create_server around aiohttp's web.Server."""

    def __init__(self, max_connections: int, header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.server: web.Server | None = None  # set once the runner is set up
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.stats = GuardStats()
        self._by_transport: dict[Any, _Guarded] = {}
        self._slot_freed = asyncio.Event()

    def __call__(self) -> asyncio.Protocol:
        assert self.server is not None
        return _Guarded(self, self.server())

    async def wait_for_slot(self) -> None:
        if self.stats.open >= self.max_connections:
            self.stats.at_limit += 1
        while self.stats.open >= self.max_connections:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    # The guard middleware (api.py) tells which connection is busy with a request: no deadline
    # while a handler runs, the idle deadline once it is done.
    def request_started(self, transport: Any) -> None:
        conn = self._by_transport.get(transport)
        if conn is not None:
            conn.disarm()

    def request_done(self, transport: Any) -> None:
        conn = self._by_transport.get(transport)
        if conn is not None:
            conn.arm(self.idle_timeout)


class _Guarded(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: Any = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.guard.stats.open += 1
        self.guard._by_transport[transport] = self
        self.arm(self.guard.header_timeout)
        self.inner.connection_made(transport)

    def arm(self, seconds: float) -> None:
        self.disarm()
        self.deadline = asyncio.get_running_loop().call_later(seconds, self._expire)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.stats.timed_out += 1
            self.transport.abort()  # frees the handle now; there is nothing worth flushing

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.guard._by_transport.pop(self.transport, None) is not None:
            self.guard.stats.open -= 1
            self.guard._slot_freed.set()
        self.inner.connection_lost(exc)


GUARD = web.AppKey("connection_guard", ConnectionGuard)


@dataclass
class ApiServer:
    runner: web.AppRunner
    sock: socket.socket
    guard: ConnectionGuard
    on_error: Callable[[str], None] | None = None
    task: asyncio.Task | None = None
    _last_error_log: float = field(default=-ACCEPT_ERROR_LOG_EVERY)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.guard.wait_for_slot()
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except Exception as exc:  # EMFILE, ENFILE, ECONNABORTED...: never end the loop
                self._accept_failed(exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                await loop.connect_accepted_socket(self.guard, conn)
            except Exception as exc:
                conn.close()
                self._accept_failed(exc)

    def _accept_failed(self, exc: Exception) -> None:
        self.guard.stats.accept_errors += 1
        now = time.monotonic()
        if self.on_error and now - self._last_error_log >= ACCEPT_ERROR_LOG_EVERY:
            self._last_error_log = now
            self.on_error(f"API accept failed ({getattr(exc, 'strerror', None) or exc!r}); retrying every {ACCEPT_BACKOFF:g} s "
                          f"({self.guard.stats.accept_errors} failures so far)")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()
        await self.runner.cleanup()


async def start_api(app: web.Application, host: str, port: int, max_connections: int,
                    header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                    on_error: Callable[[str], None] | None = None) -> ApiServer:
    """Serve ``app`` on host:port behind a ConnectionGuard."""
    # No handler_cancellation: a client hanging up must not cut a PUT between write and reload.
    guard = ConnectionGuard(max_connections, header_timeout, idle_timeout)
    app[GUARD] = guard  # before setup: the app is frozen after it
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout, shutdown_timeout=1.0)
    await runner.setup()
    guard.server = runner.server
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    server = ApiServer(runner, sock, guard, on_error)
    server.task = asyncio.create_task(server.accept_loop(), name="api-accept")
    return server
