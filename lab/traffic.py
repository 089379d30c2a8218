"""Client traffic for the lab: short requests and long-lived keep-alive connections to the VIPs.

Sockets are made inside the client namespace (lab.nssocket) and then driven by asyncio in this
process, so the demo and the tests can count, per backend, what the client really got back.
Each reply names its backend (`X-Backend` header), which is how the lab sees the Maglev
promise: a long-lived connection must keep getting answers from the same backend, whichever
node the router sends it through.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from lab.nssocket import family_of, socket_in
from lab.plan import CLIENT_NS, VIP_PORT


class RequestError(Exception):
    """A request that failed; `kind` is reset, timeout, refused, eof or http."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    return type(exc).__name__


async def connect(host: str, port: int = VIP_PORT, *, ns: str = CLIENT_NS,
                  timeout: float = 3.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket_in(ns, family_of(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                   path: str = "/", *, close: bool = False, timeout: float = 3.0) -> tuple[str, bytes]:
    """One request on an open connection; returns (backend name, body)."""
    hosthdr = f"[{host}]" if ":" in host else host
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split()
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    if len(status) < 2 or status[1] != "200":
        raise RequestError("http", f"status {' '.join(status[1:])}")
    return headers.get("x-backend", "?"), body


async def request(host: str, path: str = "/", *, port: int = VIP_PORT, ns: str = CLIENT_NS,
                  timeout: float = 3.0) -> str:
    """One request on a new connection; returns the backend's name or raises RequestError."""
    writer = None
    try:
        reader, writer = await connect(host, port, ns=ns, timeout=timeout)
        name, _ = await exchange(reader, writer, host, path, close=True, timeout=timeout)
        return name
    except RequestError:
        raise
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        raise RequestError(_classify(exc), f"{host}:{port}{path}: {exc!r}") from None
    finally:
        if writer is not None:
            writer.close()


@dataclass
class BurstResult:
    by_backend: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(self.by_backend.values())


async def burst(host: str, count: int, *, concurrency: int = 16, ns: str = CLIENT_NS,
                timeout: float = 3.0) -> BurstResult:
    """`count` requests, each on its own connection (a new source port, hence a new flow)."""
    result = BurstResult()
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one() -> None:
        async with sem:
            try:
                result.by_backend[await request(host, ns=ns, timeout=timeout)] += 1
            except RequestError as exc:
                result.failures.append(str(exc))

    await asyncio.gather(*(one() for _ in range(count)))
    result.seconds = time.monotonic() - start
    return result


@dataclass
class LongLived:
    """A keep-alive connection sending a request every `period` seconds and checking that the
    same backend answers every time."""

    host: str
    period: float = 0.1
    timeout: float = 10.0  # covers a node crash: ~3 s of hold time plus TCP retransmits
    ns: str = CLIENT_NS
    backend: str | None = None
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    switched: list[str] = field(default_factory=list)  # answers from another backend (a broken promise)
    max_gap: float = 0.0  # the longest wait for one reply, seconds
    _task: asyncio.Task | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def open(self) -> None:
        self._reader, self._writer = await connect(self.host, ns=self.ns, timeout=self.timeout)
        self.backend, _ = await exchange(self._reader, self._writer, self.host, timeout=self.timeout)
        self.requests = 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                name, _ = await exchange(self._reader, self._writer, self.host, timeout=self.timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is a result here
                self.errors.append(f"{_classify(exc)}: {exc!r}")
                return
            self.max_gap = max(self.max_gap, time.monotonic() - t0)
            self.requests += 1
            if name != self.backend:
                self.switched.append(name)
            try:
                await asyncio.wait_for(self._stop.wait(), self.period)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task
        self._writer.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self.errors


async def open_long_lived(hosts: list[str], count: int, **kw) -> list[LongLived]:
    """`count` long-lived connections spread over `hosts` (round robin), opened and started."""
    conns = [LongLived(hosts[i % len(hosts)], **kw) for i in range(count)]
    await asyncio.gather(*(c.open() for c in conns))
    for c in conns:
        c.start()
    return conns


@dataclass
class Load:
    """Steady request load: `workers` loops per host, each a new connection per request (new
    flows all the time), counting answers per backend and every failure with its time."""

    hosts: list[str]
    workers: int = 3
    pause: float = 0.02
    timeout: float = 3.0
    ns: str = CLIENT_NS
    by_backend: Counter = field(default_factory=Counter)
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic, host, error)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        for host in self.hosts:
            for _ in range(self.workers):
                self._tasks.append(asyncio.create_task(self._worker(host)))

    async def _worker(self, host: str) -> None:
        while not self._stop.is_set():
            try:
                self.by_backend[await request(host, ns=self.ns, timeout=self.timeout)] += 1
            except RequestError as exc:
                self.failures.append((time.monotonic(), host, str(exc)))
            try:
                await asyncio.wait_for(self._stop.wait(), self.pause)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    @property
    def ok(self) -> int:
        return sum(self.by_backend.values())
