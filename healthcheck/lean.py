"""TCP and plain-HTTP probes as callbacks on one epoll set: no task, future or coroutine per probe.

Why: at 10,000 TCP or 5,000 HTTP probes a second, the generic path (a task per target, a
coroutine, ``asyncio.timeout``, aiohttp's request machinery) costs 0.2-0.6 ms of CPU per probe,
more than a core. Here a probe is a small object that owns one non-blocking socket registered in
a private ``select.epoll`` whose own fd sits in the event loop as a single reader, so a probe costs
a few system calls (socket, connect, one epoll_ctl, getsockopt, send, recv, close) and no Python
machinery beyond one method call per readiness event. Closing the socket drops it from the epoll
set, so there is no unregister call either.

Semantics are those of the generic path (healthcheck.probes), and the same tests prove them:
every probe opens a new connection (that is the point of a health check) and closes it with RST
(no TIME_WAIT); the whole probe is bounded by the check's timeout; a verdict reached after its
deadline is a timeout, marked inconclusive when this process was stalled (the caller's
``verdict`` decides); HTTP reads the status line and headers, honours Content-Length, chunked
encoding and read-until-close, and searches at most BODY_LIMIT bytes of body.
https stays on the generic path (aiohttp does the TLS and certificate checks).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import logging
import math
import os
import re
import select
import socket
import struct
import time
from typing import Any, Callable
from urllib.parse import quote

from healthcheck.types import ProbeResult, Target

log = logging.getLogger("maglev.health")

LEAN_TYPES = frozenset({"tcp", "http"})
# Timeouts are swept by one timer; it fires at most this often, so a timeout may be reported up to
# this late (well inside the stall grace) while thousands of deadlines cost a few timer callbacks.
TIMER_GRAIN = 0.005
# close() on a socket with SO_LINGER {on, 0 s} sends RST and leaves no TIME_WAIT behind. A
# checker opening 2000 connections a second would otherwise hold ~120k TIME_WAIT sockets, the
# whole of a typical tcp_max_tw_buckets (131072), crowding out real traffic. HAProxy's checks
# close the same way; the backend has already answered, so the reset loses nothing.
LINGER_RST = struct.pack("ii", 1, 0)
_READ_SIZE = 65536
_HEAD_LIMIT = 65536  # bytes of status line and headers; a backend sending more is broken
# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_last_data_recv is the 12th.
_LAST_DATA_RECV = 52
_TCP_INFO_LEN = 56
_JIFFY = 0.004  # the kernel counts those milliseconds in jiffies (HZ >= 250)
PLAN_CACHE_MAX = 200_000  # targets whose address and request are kept ready
_EV_OUT = select.EPOLLOUT
_EV_IN = select.EPOLLIN | select.EPOLLRDHUP
_EV_FAILED = select.EPOLLERR | select.EPOLLHUP
_CONNECTED = (True, "connected")
# The C socket type, born non-blocking: the Python wrapper's __init__ and a setblocking() call
# are a measurable share of a probe.
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_SOL_SOCKET, _SO_ERROR, _SO_LINGER = socket.SOL_SOCKET, socket.SO_ERROR, socket.SO_LINGER
_SO_MARK = socket.SO_MARK
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH_SAFE = "/?&=%:@!$'()*+,;~-._[]"

# (ok, reason, latency, overrun past the deadline) -> the ProbeResult handed to the caller.
Verdict = Callable[[bool, str, float, float], ProbeResult]
Done = Callable[[ProbeResult], None]


class _Probe:
    """One probe in flight: its socket, where it is in the exchange, what ends it."""

    __slots__ = ("engine", "sock", "fd", "done", "deadline", "slot", "started", "timeout",
                 "finished", "request", "buf", "http")

    def cancel(self) -> None:
        """Abandon the probe without a verdict (its target was removed, the checker stops)."""
        if not self.finished:
            self.finished = True
            self.engine._release(self)


class LeanProbes:
    """Runs tcp and http probes for one event loop; ``start`` returns a handle with ``cancel``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, verdict: Verdict,
                 status_ranges: Callable[[list[str]], list[tuple[int, int]]],
                 regex: Callable[[str], re.Pattern[str]], body_limit: int, user_agent: str,
                 reasons: Callable[[OSError], str], stall_grace: float,
                 mark_of: Callable[[Target], int] | None = None) -> None:
        self.loop = loop
        # SO_MARK of a tunnel check's socket (healthcheck.probes.Prober.mark_of): looked up per
        # probe, not planned, since a mark belongs to the node's tunnel, not to the target.
        self._mark_of = mark_of
        self._verdict = verdict
        self._status_ranges = status_ranges
        self._regex = regex
        self._body_limit = body_limit
        self._user_agent = user_agent
        self._os_reason = reasons
        self._stall_grace = stall_grace
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Probe] = {}
        self._plans: dict[Target, tuple[int, tuple[Any, ...], bytes]] = {}
        # Probes in flight by deadline slot (deadline / TIMER_GRAIN, rounded up). A probe leaves
        # its slot the moment it ends, so nothing outlives its probe: objects kept for the
        # timeout's length would be promoted to the garbage collector's oldest generation by the
        # thousand and make its full collections long and frequent (100-250 ms pauses at 10,000
        # probes a second, measured).
        self._slots: dict[int, set[_Probe]] = {}
        self._slot_heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_sweep = 0.0
        loop.add_reader(self._epoll.fileno(), self._on_ready)

    def close(self) -> None:
        """Abandon every probe in flight and leave the event loop."""
        for probe in list(self._by_fd.values()):
            probe.cancel()
        self._slots.clear()
        self._slot_heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    # ------------------------------------------------------------------ starting

    def start(self, target: Target, done: Done) -> _Probe:
        check: Any = target.check
        probe = _Probe()
        probe.engine = self
        probe.done, probe.timeout, probe.finished = done, check.timeout, False
        probe.started = time.perf_counter()
        probe.deadline = self.loop.time() + check.timeout
        probe.buf = b""
        probe.slot = probe.fd = -1
        probe.http = check if check.type == "http" else None  # the check, for http only
        plan = self._plans.get(target)
        try:
            if plan is None:
                plan = self._plan(target)
            family, address, probe.request = plan
            mark = 0
            if target.tunnel:
                if self._mark_of is None:
                    raise _Refused("via: tunnel, but this checker has no tunnel (only the node's has)")
                mark = self._mark_of(target)
            sock = _socket.socket(family, _STREAM_NONBLOCK)
        except (_Refused, LookupError) as exc:  # LookupError: the tunnel has no mark for it
            return self._fail_soon(probe, str(exc))
        except OSError as exc:  # out of file descriptors, typically
            return self._fail_soon(probe, self._os_reason(exc))
        probe.sock = sock
        probe.fd = sock.fileno()
        sock.setsockopt(_SOL_SOCKET, _SO_LINGER, LINGER_RST)
        if mark:
            try:
                sock.setsockopt(_SOL_SOCKET, _SO_MARK, mark)
            except OSError as exc:  # EPERM: SO_MARK needs CAP_NET_ADMIN
                sock.close()
                return self._fail_soon(probe, f"cannot mark the tunnel probe: {self._os_reason(exc)}")
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return self._fail_soon(probe, self._os_reason(OSError(err, _strerror(err))))
        self._epoll.register(probe.fd, _EV_OUT)
        self._by_fd[probe.fd] = probe
        probe.slot = slot = math.ceil(probe.deadline / TIMER_GRAIN)
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = set()
            heapq.heappush(self._slot_heap, slot)
            if slot * TIMER_GRAIN < self._timer_at:
                self._arm(slot * TIMER_GRAIN)
        bucket.add(probe)
        return probe

    def _plan(self, target: Target) -> tuple[int, tuple[Any, ...], bytes]:
        """(family, socket address, request bytes) of a target, worked out once: formatting an
        address and a request per probe is a noticeable share of a probe's cost."""
        port = target.probe_port
        if port is None:
            raise _Refused("no port to probe: set the check's port or the backend's port")
        request = b"" if target.check.type != "http" else _http_request(target, port, self._user_agent)
        address = target.probe_address
        if address.version == 6:
            plan = (socket.AF_INET6, (str(address), port, 0, 0), request)
        else:
            plan = (socket.AF_INET, (str(address), port), request)
        if len(self._plans) >= PLAN_CACHE_MAX:
            self._plans.clear()  # targets come and go with reloads; start over rather than grow
        self._plans[target] = plan
        return plan

    def _fail_soon(self, probe: _Probe, reason: str) -> _Probe:
        """A verdict known at start still reaches the caller from the loop, never re-entrantly."""
        probe.sock = _NO_SOCKET
        self.loop.call_soon(self._finish, probe, False, reason, 0.0)
        return probe

    # ------------------------------------------------------------------ readiness

    def poll_now(self) -> None:
        """Read the verdicts already in, without waiting for the event loop to report the epoll
        fd. The scheduler calls it right after starting a batch: a connect to a nearby backend
        (same host, same rack) is often complete by then, and judging it in the same callback
        saves a whole event-loop wake-up (an epoll_wait and a loop iteration), which on a VM
        costs more than the probe's own system calls. Never from inside ``start``: a verdict
        must not reach its caller before ``start`` has returned the handle."""
        self._on_ready()

    def _on_ready(self) -> None:
        finished: list[tuple[_Probe, bool, str]] = []
        by_fd = self._by_fd
        for fd, events in self._epoll.poll(0):
            probe = by_fd.get(fd)
            if probe is None or probe.finished:
                continue
            if probe.http is not None:
                verdict = self._step_http(probe)
                if verdict is not None:
                    finished.append((probe, *verdict))
            elif events & _EV_FAILED:
                finished.append((probe, *(self._connected(probe) or _CONNECTED)))
            else:
                # Writable with no error or hang-up: the handshake completed. The kernel reports
                # a failed connect as EPOLLERR, so a success needs no SO_ERROR system call.
                finished.append((probe, True, "connected"))
        # Callbacks run after the whole batch: a callback that starts a probe could get a closed
        # probe's fd number, and a stale event of this batch must not be read as its own.
        now = self.loop.time()
        for probe, ok, reason in finished:
            self._finish_guarded(probe, ok, reason, now)

    def _connected(self, probe: _Probe) -> tuple[bool, str] | None:
        err = probe.sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
        if err:
            return False, self._os_reason(OSError(err, _strerror(err)))
        return None

    def _step_http(self, probe: _Probe) -> tuple[bool, str] | None:
        try:
            if probe.request:
                return self._send(probe)
            return self._receive(probe)
        except OSError as exc:
            return False, self._os_reason(exc)

    def _send(self, probe: _Probe) -> tuple[bool, str] | None:
        failed = self._connected(probe)
        if failed:
            return failed
        try:
            sent = probe.sock.send(probe.request)
        except BlockingIOError:
            return None
        probe.request = probe.request[sent:]
        if not probe.request:
            self._epoll.modify(probe.fd, _EV_IN)
        return None

    def _receive(self, probe: _Probe) -> tuple[bool, str] | None:
        eof = False
        while True:
            try:
                data = probe.sock.recv(_READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            probe.buf += data
            if len(data) < _READ_SIZE:
                break
        return self._judge(probe, eof)

    # ------------------------------------------------------------------ http

    def _judge(self, probe: _Probe, eof: bool) -> tuple[bool, str] | None:
        """The verdict once enough of the response is in, None while more is needed."""
        buf = probe.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _HEAD_LIMIT:
                    return False, f"bad HTTP response: headers longer than {_HEAD_LIMIT} bytes"
                if eof:
                    return False, ("server closed the connection without a response" if not buf
                                   else "bad HTTP response: closed inside the headers")
                return None
            head, body = buf[:end], buf[end + 4:]
            parsed = _parse_head(head)
            if isinstance(parsed, str):
                return False, f"bad HTTP response: {parsed}"
            status, headers = parsed
            if 100 <= status < 200 and status != 101:
                buf = probe.buf = body  # an interim response (100 Continue): the real one follows
                continue
            break
        return self._judge_final(probe, status, headers, body, eof)

    def _judge_final(self, probe: _Probe, status: int, headers: dict[bytes, bytes],
                     body: bytes, eof: bool) -> tuple[bool, str] | None:
        check: Any = probe.http
        if not _status_ok(status, self._status_ranges(check.expect_status)):
            return False, f"HTTP {status}"
        if check.body is None and check.body_regex is None:
            return True, f"HTTP {status}"
        framed = _body_so_far(check.method, status, headers, body, eof, self._body_limit)
        if isinstance(framed, str):
            return False, f"bad HTTP response: {framed}"
        if framed is None:
            return None
        text = framed[: self._body_limit].decode("utf-8", errors="replace")
        if check.body is not None and check.body not in text:
            return False, "body did not match"
        if check.body_regex is not None and not self._regex(check.body_regex).search(text):
            return False, "body did not match"
        return True, f"HTTP {status}, body matched"

    # ------------------------------------------------------------------ ending

    def _finish(self, probe: _Probe, ok: bool, reason: str, now: float, expired: bool = False) -> None:
        if probe.finished:
            return
        probe.finished = True
        overrun = 0.0
        if now >= probe.deadline:
            # Decided after its deadline. By the probe's contract that is a timeout, unless this
            # process was merely late reading an answer that came in time: a loop held up for
            # less than the stall grace would otherwise fail healthy backends by the hundred.
            # The kernel knows when the socket last received (SYN-ACK or data), so ask it.
            overrun = now - probe.deadline
            if expired or overrun > self._stall_grace or not _answered_in_time(probe):
                ok, reason = False, f"timeout after {probe.timeout:g} s"
            else:
                overrun = 0.0
        self._release(probe)
        latency = time.perf_counter() - probe.started
        probe.done(self._verdict(ok, reason, latency, overrun))

    def _finish_guarded(self, probe: _Probe, ok: bool, reason: str, now: float,
                        expired: bool = False) -> None:
        """_finish for one probe of a batch: a callback that raises must not cost the rest of
        the batch their verdicts (their targets would never be probed again)."""
        try:
            self._finish(probe, ok, reason, now, expired)
        except Exception:  # noqa: BLE001
            log.exception("health: a probe's verdict callback failed")

    def _release(self, probe: _Probe) -> None:
        """Close the socket (RST, SO_LINGER 0; it also leaves the epoll set) and forget it."""
        probe.sock.close()
        if self._by_fd.get(probe.fd) is probe:
            del self._by_fd[probe.fd]  # the fd number may already be another probe's
        bucket = self._slots.get(probe.slot)
        if bucket is not None:
            bucket.discard(probe)
            if not bucket:
                del self._slots[probe.slot]

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        at = max(at, self._last_sweep + TIMER_GRAIN)
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        """Time out every probe whose slot has come; re-arm for the earliest slot left."""
        self._timer, self._timer_at = None, math.inf
        now = self._last_sweep = self.loop.time()
        heap, slots = self._slot_heap, self._slots
        expired: list[_Probe] = []
        while heap and (heap[0] * TIMER_GRAIN <= now or heap[0] not in slots):
            expired.extend(slots.pop(heapq.heappop(heap), ()))
        for probe in expired:
            self._finish_guarded(probe, False, "", max(now, probe.deadline), expired=True)
        if heap and self._timer is None:
            self._arm(heap[0] * TIMER_GRAIN)


def _answered_in_time(probe: _Probe) -> bool:
    """Whether the socket's last receive (the SYN-ACK of a connect, the last data of a reply)
    came before the probe's deadline, from TCP_INFO's tcpi_last_data_recv (ms ago)."""
    try:
        info = probe.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return False
    if len(info) < _TCP_INFO_LEN:
        return False
    (last_recv_ms,) = struct.unpack_from("I", info, _LAST_DATA_RECV)
    received_at = time.monotonic() - last_recv_ms / 1000
    return received_at <= probe.deadline + _JIFFY


class _Refused(Exception):
    pass


class _Closed:
    def close(self) -> None:
        pass


_NO_SOCKET: Any = _Closed()


def _strerror(err: int) -> str:
    return os.strerror(err)


def _status_ok(status: int, ranges: list[tuple[int, int]]) -> bool:
    for lo, hi in ranges:
        if lo <= status <= hi:
            return True
    return False


def _http_request(target: Target, port: int, user_agent: str) -> bytes:
    """The request bytes; refuses a method, path or Host that would break the request line."""
    check: Any = target.check
    if not _TOKEN.fullmatch(check.method):
        # Worded as aiohttp (the https path) words it, so both paths report it alike.
        raise _Refused(f"probe error: ValueError: Method cannot contain non-token characters "
                       f"{check.method!r}")
    host = check.host
    if host is None:
        address = target.probe_address  # the VIP of a tunnel check: what clients name
        host = f"[{address}]" if address.version == 6 else str(address)
        if port != 80:
            host += f":{port}"
    if any(c in host for c in "\r\n\0 \t"):
        raise _Refused(f"probe error: Host header {host!r} has whitespace or control characters")
    path = quote(check.path.partition("#")[0], safe=_PATH_SAFE)
    return (f"{check.method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1", errors="strict")


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]] | str:
    """(status, lower-cased headers) of a response head, or what is wrong with it."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        return f"invalid status line {lines[0][:60]!r}"
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return f"invalid header line {line[:60]!r}"
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _body_so_far(method: str, status: int, headers: dict[bytes, bytes], body: bytes, eof: bool,
                 limit: int) -> bytes | str | None:
    """The body if complete (or ``limit`` bytes of it), None if more is to come, str if broken."""
    if method == "HEAD" or status in (204, 304):
        return b""
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return _dechunk(body, eof, limit)
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            return f"invalid Content-Length {length[:20]!r}"
        want = min(int(length), limit)
        if len(body) >= want:
            return body[:want]
        return "closed before the end of the body" if eof else None
    return body if eof or len(body) >= limit else None


def _dechunk(data: bytes, eof: bool, limit: int) -> bytes | str | None:
    out = bytearray()
    pos = 0
    while len(out) < limit:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return f"invalid chunk size {size_text[:20]!r}"
        if size == 0:
            return bytes(out)
        start = line_end + 2
        chunk = data[start:start + size]
        out += chunk
        if len(chunk) < size:
            break
        pos = start + size + 2
    if len(out) >= limit:
        return bytes(out[:limit])
    return "closed inside a chunked body" if eof else None
