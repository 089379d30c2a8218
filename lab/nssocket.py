"""Sockets inside a lab namespace, from a process that lives outside it.

A socket belongs to the network namespace its creator was in when it was made, and keeps it. So
the lab (status, demo) and the end-to-end tests switch the calling thread into the namespace
(setns), create the socket, and switch straight back: one process can then talk as the client,
query every node's API on its own 127.0.0.1 and probe backends, without a subprocess per
request. Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace `name` (from /run/netns), then switch back."""
    with _lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            try:
                target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            except FileNotFoundError:
                raise OSError(f"network namespace {name!r} does not exist (is the lab up?)") from None
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)


def socket_in(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    with in_netns(name):
        return socket.socket(family, type)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def http_get(ns: str, host: str, port: int, path: str, *, timeout: float = 2.0,
             headers: dict[str, str] | None = None, method: str = "GET",
             body: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request with `Connection: close` from inside namespace `ns`.

    Small on purpose: status and the tests need status code and body, nothing else."""
    sock = socket_in(ns, family_of(host))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        hdrs = {"Host": host if ":" not in host else f"[{host}]", "Connection": "close"}
        hdrs.update(headers or {})
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        sock.sendall(head.encode() + (body or b""))
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head_b, _, payload = raw.partition(b"\r\n\r\n")
    status_line = head_b.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad HTTP answer from {host}:{port}{path}: {status_line!r}")
    if b"transfer-encoding: chunked" in head_b.lower():
        payload = _dechunk(payload)
    return int(parts[1]), payload


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_s, _, rest = data.partition(b"\r\n")
        size = int(size_s.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)


def get_json(ns: str, host: str, port: int, path: str, *, timeout: float = 2.0) -> Any:
    status, body = http_get(ns, host, port, path, timeout=timeout)
    if status != 200:
        raise OSError(f"GET {path} on {ns} answered {status}: {body[:200]!r}")
    return json.loads(body)
