"""One probe of one target, for every check type.

A probe never raises for a network problem: it returns a ProbeResult with a short reason an
operator can act on. The whole probe (connect, request, reading the reply) is bounded by the
check's timeout.

tcp and plain http run on the lean path (healthcheck.lean): callbacks on one epoll set, a few
system calls per probe, so one process checks thousands of backends a second. https goes
through one aiohttp session per Prober whose connector has ``force_close`` (aiohttp does the TLS
and the certificate checks). Either way every probe opens a new connection, which is the point
(a backend that cannot accept new connections is not healthy, whatever a kept-alive socket says).
TCP and HTTP probe sockets close with RST (see healthcheck.lean.LINGER_RST), and a timeout that only fired because
this process was stalled is reported as inconclusive (see Prober.probe).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import random
import re
import signal
import socket
import ssl
import time
from typing import Any, Awaitable, Callable, Protocol

import aiohttp

from healthcheck import dns
from healthcheck.lean import LEAN_TYPES, LINGER_RST as _LINGER_RST, LeanProbes
from healthcheck.types import ProbeResult, Target

BODY_LIMIT = 64 * 1024  # bytes of an HTTP body searched for the expected text
UDP_REPLY_LIMIT = 65535
USER_AGENT = "maglev-lb-healthcheck/1"
# A timeout firing later than this past its deadline means the event loop was stalled.
STALL_GRACE = 0.1
STALL_LOG_EVERY = 10.0  # seconds between stall warnings
log = logging.getLogger("maglev.health")

_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
    errno.ETIMEDOUT: "connection timed out",
}


class ProbeFailed(Exception):
    """Raised inside a probe with the reason to report."""


def os_reason(exc: OSError) -> str:
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


def decode_bytes_option(text: str) -> bytes:
    """Config payloads: plain text, or 'hex:' followed by hex digits for raw bytes."""
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return text.encode()


def _sockaddr(target: Target, port: int) -> tuple[Any, ...]:
    address = target.probe_address
    if address.version == 6:
        return (str(address), port, 0, 0)
    return (str(address), port)


def _family(target: Target) -> int:
    return socket.AF_INET6 if target.address.version == 6 else socket.AF_INET


class Tunnel(Protocol):
    """What the prober needs of the node's tunnel (node.forwarder.hc_tunnel.HealthTunnel)."""

    def mark_for(self, address: Any) -> int:
        """SO_MARK steering a probe to this backend; LookupError(reason) when there is none."""
        ...


def tunnel_reason(target: Target, result: ProbeResult) -> ProbeResult:
    """Say what a tunnel probe's verdict means for the path. No answer at all is what a backend
    without the VIP on lo or without its decap gives (the probe dies inside it, silently);
    a refusal or an ICMP port unreachable came back from the VIP, so decap and VIP work."""
    vip = f"[{target.vip}]" if target.vip is not None and target.vip.version == 6 else str(target.vip)
    where = f"{vip}:{target.probe_port}"
    reason = result.reason
    if result.ok:
        reason += " through the tunnel"
    elif reason.startswith("timeout") or reason in ("connection timed out", "host unreachable",
                                                     "network unreachable"):
        reason = (f"no answer through the tunnel ({reason}): backend {target.address} may lack "
                  f"VIP {target.vip} on lo or its GRE decap")
    elif reason in ("connection refused", "port unreachable (ICMP)"):
        reason = (f"{reason} through the tunnel: backend {target.address} decapsulated the probe "
                  f"but nothing serves {where}")
    else:
        reason += " (through the tunnel)"
    return dataclasses.replace(result, reason=reason)




def _rst_on_close(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    return sock


def _http_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's socket_factory: the sockets of HTTP probes also close with RST."""
    family, type_, proto, _, _ = addr_info
    return _rst_on_close(socket.socket(family=family, type=type_, proto=proto))


def _marked_socket(mark: int) -> Callable[[tuple[Any, ...]], socket.socket]:
    """aiohttp's socket_factory for the tunnel: the HTTP socket, marked for one backend."""
    def factory(addr_info: tuple[Any, ...]) -> socket.socket:
        sock = _http_socket(addr_info)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            sock.close()
            raise
        return sock
    return factory


def _need_port(target: Target) -> int:
    port = target.probe_port
    if port is None:
        raise ProbeFailed("no port to probe: set the check's port or the backend's port")
    return port


def status_ok(status: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= status <= hi for lo, hi in ranges)


class Prober:
    """Runs probes; owns the shared HTTP session. Use ``async with`` or ``close()``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, tunnel: Tunnel | None = None) -> None:
        self.clock = clock
        self.tunnel = tunnel  # the node's; None: tunnel checks fail with a reason saying so
        self._session: aiohttp.ClientSession | None = None
        self._tunnel_sessions: dict[int, aiohttp.ClientSession] = {}  # https, one per mark
        self._lean: LeanProbes | None = None
        self._stalled = 0
        self._worst_stall = 0.0
        self._stall_logged_at = -STALL_LOG_EVERY
        self._regex_cache: dict[str, re.Pattern[str]] = {}
        self._status_cache: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        self._probes: dict[str, Callable[[Target], Awaitable[str]]] = {
            "http": self._http,  # reached only through probe_generic: see _lean_engine
            "https": self._http,
            "udp": self._udp,
            "dns": self._dns,
            "exec": self._exec,
        }

    async def __aenter__(self) -> "Prober":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
            self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for session in self._tunnel_sessions.values():
            await session.close()
        self._tunnel_sessions.clear()

    def mark_of(self, target: Target) -> int:
        """The SO_MARK of a tunnel probe of target; LookupError(reason) when there is none."""
        if self.tunnel is None:
            raise LookupError("via: tunnel, but this checker has no tunnel (only the node's has)")
        return self.tunnel.mark_for(target.address)

    async def probe(self, target: Target) -> ProbeResult:
        """One probe; never raises except CancelledError.

        A timeout that fired well after its deadline means this process was stalled (CPU
        starvation, a long GC pause), not that the backend was slow: the reply may be sitting
        unread in the socket. Such a verdict is no evidence either way, so it is marked
        ``inconclusive`` and the state machine does not count it. Without this a stall of the
        checker would fail every in-flight probe together: a mass false DOWN. (Retrying at once
        was tried: in an overloaded moment the burst of retries made the next stall worse.)
        """
        if target.check.type in LEAN_TYPES:
            result = await self._lean_probe(target)
        else:
            start = time.perf_counter()
            ok, reason, overrun = await self._attempt(target)
            result = self._verdict(ok, reason, time.perf_counter() - start, overrun)
        return tunnel_reason(target, result) if target.tunnel else result

    async def probe_generic(self, target: Target) -> ProbeResult:
        """An http probe through aiohttp rather than the lean path: what http cost before the
        lean path, kept as the scale bench's baseline (https always goes this way)."""
        start = time.perf_counter()
        ok, reason, overrun = await self._attempt(target)
        return self._verdict(ok, reason, time.perf_counter() - start, overrun)

    def start(self, target: Target, done: Callable[[ProbeResult], None]) -> Any:
        """Start one probe and return at once; ``done(result)`` is called from the event loop
        unless the returned handle's ``cancel()`` is called first. What the monitor's scheduler
        uses: tcp and http cost no task at all, the other types one task per probe."""
        if target.check.type in LEAN_TYPES:
            if target.tunnel:
                return self._lean_engine().start(target, lambda r: done(tunnel_reason(target, r)))
            return self._lean_engine().start(target, done)
        task = asyncio.get_running_loop().create_task(self.probe(target))
        task.add_done_callback(lambda t: None if t.cancelled() else done(t.result()))
        return task

    def settle(self) -> None:
        """Judge the lean probes whose answer is already in (see LeanProbes.poll_now); the
        scheduler calls it after each batch of starts."""
        if self._lean is not None:
            self._lean.poll_now()

    def _lean_engine(self) -> LeanProbes:
        loop = asyncio.get_running_loop()
        if self._lean is None or self._lean.loop is not loop:
            self._lean = LeanProbes(
                loop, self._verdict, self._status_ranges, self._regex, BODY_LIMIT, USER_AGENT, os_reason,
                STALL_GRACE, self.mark_of,
            )
        return self._lean

    async def _lean_probe(self, target: Target) -> ProbeResult:
        future: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()
        handle = self._lean_engine().start(target, lambda r: future.done() or future.set_result(r))
        try:
            return await future
        finally:
            handle.cancel()  # a no-op once the probe has its verdict

    def _verdict(self, ok: bool, reason: str, latency: float, overrun: float) -> ProbeResult:
        if not ok and overrun > STALL_GRACE:
            self._note_stall(overrun)
            reason += f", but this checker was stalled {overrun:.2f} s past the deadline: not counted"
            return ProbeResult(ok, reason, latency, self.clock(), inconclusive=True)
        return ProbeResult(ok, reason, latency, self.clock())

    def _note_stall(self, overrun: float) -> None:
        """One log line per STALL_LOG_EVERY seconds, not one per probe: a stall hits hundreds."""
        self._stalled += 1
        self._worst_stall = max(self._worst_stall, overrun)
        now = time.monotonic()
        if now - self._stall_logged_at >= STALL_LOG_EVERY:
            log.warning(
                "health: this checker's event loop was stalled up to %.0f ms past probe deadlines "
                "(CPU starvation or a long pause); %d timed-out probe(s) were not counted against "
                "their backends. Give the node more CPU or fewer/longer-interval checks.",
                self._worst_stall * 1000, self._stalled,
            )
            self._stall_logged_at, self._stalled, self._worst_stall = now, 0, 0.0

    async def _attempt(self, target: Target) -> tuple[bool, str, float]:
        """(ok, reason, overrun): overrun is how late a timeout fired, 0 for other verdicts."""
        timeout = target.check.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                return True, await self._probes[target.check.type](target), 0.0
        except ProbeFailed as exc:
            return False, str(exc), 0.0
        except TimeoutError:
            return False, f"timeout after {timeout:g} s", loop.time() - deadline
        except OSError as exc:
            return False, os_reason(exc), 0.0
        except Exception as exc:  # noqa: BLE001 - a probe that raised would stop its target's schedule
            log.warning("health: probe of %s failed unexpectedly: %r", target.describe(), exc)
            return False, f"probe error: {type(exc).__name__}: {_short(exc)}", 0.0

    # ---------------------------------------------------------------- http

    def _http_session(self, mark: int = 0) -> aiohttp.ClientSession:
        """The shared session; a tunnel probe gets one per mark (aiohttp's socket factory is
        per connector, and the mark must be on the socket before it connects)."""
        if mark:
            session = self._tunnel_sessions.get(mark)
            if session is None:
                session = self._tunnel_sessions[mark] = self._new_session(_marked_socket(mark))
            return session
        if self._session is None:
            self._session = self._new_session(_http_socket)
        return self._session

    def _new_session(self, socket_factory: Callable[..., socket.socket]) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            force_close=True, limit=0, ttl_dns_cache=None, socket_factory=socket_factory
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # a backend's cookies must not follow us
            timeout=aiohttp.ClientTimeout(total=None),  # the probe's own timeout bounds all
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT},
        )

    def _tunnel_mark(self, target: Target) -> int:
        """0 for a direct probe; the tunnel's mark, or ProbeFailed saying why there is none."""
        if not target.tunnel:
            return 0
        try:
            return self.mark_of(target)
        except LookupError as exc:
            raise ProbeFailed(str(exc)) from None

    def _status_ranges(self, expect: list[str]) -> list[tuple[int, int]]:
        key = tuple(expect)
        if key not in self._status_cache:
            from node.config import parse_status_range

            self._status_cache[key] = [parse_status_range(s) for s in expect]
        return self._status_cache[key]

    async def _http(self, target: Target) -> str:
        check: Any = target.check
        port = _need_port(target)
        address = target.probe_address
        host = f"[{address}]" if address.version == 6 else str(address)
        url = f"{check.type}://{host}:{port}{check.path}"
        mark = self._tunnel_mark(target)
        kwargs: dict[str, Any] = {"allow_redirects": False}
        if check.host:
            kwargs["headers"] = {"Host": check.host}
        if check.type == "https":
            kwargs["ssl"] = None if check.tls_verify else False
            if check.host and check.tls_verify:
                kwargs["server_hostname"] = check.host  # verify the name the clients use
        try:
            async with self._http_session(mark).request(check.method, url, **kwargs) as resp:
                status = resp.status
                if not status_ok(status, self._status_ranges(check.expect_status)):
                    raise ProbeFailed(f"HTTP {status}")
                if check.body is None and check.body_regex is None:
                    return f"HTTP {status}"
                body = await _read_limited(resp)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ProbeFailed(f"TLS certificate not trusted: {_cert_detail(exc)}") from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise ProbeFailed(f"TLS handshake failed: {_short(exc.os_error)}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ProbeFailed(os_reason(exc.os_error)) from None
        except aiohttp.ServerDisconnectedError:
            raise ProbeFailed("server closed the connection without a response") from None
        except aiohttp.ClientResponseError as exc:
            raise ProbeFailed(f"bad HTTP response: {exc.message}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise ProbeFailed(f"connection failed: {_short(exc)}") from None
        except ssl.SSLError as exc:
            raise ProbeFailed(f"TLS error: {_short(exc)}") from None
        text = body.decode("utf-8", errors="replace")
        if check.body is not None and check.body not in text:
            raise ProbeFailed("body did not match")
        if check.body_regex is not None and not self._regex(check.body_regex).search(text):
            raise ProbeFailed("body did not match")
        return f"HTTP {status}, body matched"

    def _regex(self, text: str) -> re.Pattern[str]:
        pattern = self._regex_cache.get(text)
        if pattern is None:
            pattern = self._regex_cache.setdefault(text, re.compile(text))
        return pattern

    # ---------------------------------------------------------------- udp

    async def _udp_exchange(self, target: Target, port: int, payload: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        mark = self._tunnel_mark(target)
        sock = socket.socket(_family(target), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            # connect() makes the kernel drop datagrams from anyone else and turns an ICMP port
            # unreachable into ECONNREFUSED on the next receive: a fast, precise "down".
            await loop.sock_connect(sock, _sockaddr(target, port))
            await loop.sock_sendall(sock, payload)
            return await loop.sock_recv(sock, UDP_REPLY_LIMIT)
        except ConnectionRefusedError:
            raise ProbeFailed("port unreachable (ICMP)") from None
        finally:
            sock.close()

    async def _udp(self, target: Target) -> str:
        check: Any = target.check
        reply = await self._udp_exchange(target, _need_port(target), decode_bytes_option(check.payload))
        if check.expect is not None and decode_bytes_option(check.expect) not in reply:
            raise ProbeFailed("reply did not match")
        return f"reply of {len(reply)} bytes"

    # ---------------------------------------------------------------- dns

    async def _dns(self, target: Target) -> str:
        check: Any = target.check
        query_id = random.getrandbits(16)
        try:
            query = dns.build_query(query_id, check.query_name, check.query_type)
        except ValueError as exc:
            raise ProbeFailed(str(exc)) from None
        reply = await self._udp_exchange(target, _need_port(target), query)
        ok, reason = dns.judge_reply(reply, query_id, check.query_type)
        if not ok:
            raise ProbeFailed(reason)
        return reason

    # ---------------------------------------------------------------- exec

    async def _exec(self, target: Target) -> str:
        check: Any = target.check
        port = target.probe_port
        env = dict(os.environ)
        env["MAGLEV_BACKEND_ADDRESS"] = str(target.address)
        env["MAGLEV_BACKEND_PORT"] = "" if port is None else str(port)
        try:
            # Own process group, so the timeout kills the whole tree (a script's children too).
            proc = await asyncio.create_subprocess_exec(
                *check.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise ProbeFailed(f"command not found: {check.command[0]}") from None
        except PermissionError:
            raise ProbeFailed(f"command not executable: {check.command[0]}") from None
        try:
            output, _ = await proc.communicate()
        finally:
            # On a timeout, a cancel, and even after a normal exit: nothing the check started
            # may outlive it (a backgrounded child would pile up, one per interval).
            _kill_group(proc.pid)
            # Reap even if we are being cancelled: no zombies.
            await asyncio.shield(proc.wait())
        line = _first_line(output)
        if proc.returncode == 0:
            return "exit 0" + (f": {line}" if line else "")
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            raise ProbeFailed(f"killed by {name}" + (f": {line}" if line else ""))
        raise ProbeFailed(f"exit {proc.returncode}" + (f": {line}" if line else ""))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _first_line(output: bytes | None) -> str:
    if not output:
        return ""
    text = output.decode("utf-8", errors="replace").strip()
    return text.splitlines()[0][:120] if text else ""


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks = bytearray()
    while len(chunks) < BODY_LIMIT:
        chunk = await resp.content.read(BODY_LIMIT - len(chunks))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _cert_detail(exc: aiohttp.ClientConnectorCertificateError) -> str:
    cert_error = exc.certificate_error
    detail = getattr(cert_error, "verify_message", None) or _short(cert_error)
    return str(detail)


async def probe(target: Target) -> ProbeResult:
    """One probe with a throw-away Prober: what `maglev check` uses."""
    async with Prober() as prober:
        return await prober.probe(target)
