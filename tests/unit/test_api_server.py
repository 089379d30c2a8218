"""The API's connection guard with real loopback sockets (the controller behind it is faked):
a connection cap that answers 503 past it, deadlines for a missing or trickled request head
and for a trickled body, and the file-handle reserve at start."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys

import pytest

from node import api
from node.api import make_app
from node.api_server import api_connection_cap, start_api
from tests.unit.test_controller import REPO, Env, vip

TOKEN = "s3cret-token"


@pytest.fixture
async def served(tmp_path):
    env = Env(tmp_path, [vip()])
    await env.start()
    server = await start_api(make_app(env.c, TOKEN), "127.0.0.1", 0, max_connections=4,
                             header_timeout=0.5, idle_timeout=0.5)
    port = server.port
    yield env, server, port
    await server.close()


async def raw_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def get_status(port: int) -> tuple[int, bytes]:
    reader, writer = await raw_connect(port)
    writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(data.split(b" ", 2)[1]), data


async def closed_by_server(reader: asyncio.StreamReader, within: float = 10) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def test_at_the_cap_new_connections_wait_until_idle_ones_are_cut(served):
    env, server, port = served
    idle = [await raw_connect(port) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert server.guard.stats.open == 4
    # The fifth is not accepted (no handle spent on it): it waits in the listen queue and is
    # served once the idle ones, which never sent a request head, are cut.
    status, body = await get_status(port)
    assert status == 200 and json.loads(body.split(b"\r\n\r\n", 1)[1])["node_id"] == "lb-1"
    for reader, _ in idle:
        assert await closed_by_server(reader)
    assert server.guard.stats.at_limit >= 1 and server.guard.stats.timed_out == 4
    assert server.guard.stats.open == 0


async def test_a_trickled_request_head_is_cut(served):
    env, server, port = served
    reader, writer = await raw_connect(port)
    for byte in b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n":
        if reader.at_eof():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    assert await closed_by_server(reader)
    assert server.guard.stats.timed_out == 1


async def test_keep_alive_then_idle_deadline(served):
    env, server, port = served
    reader, writer = await raw_connect(port)
    for _ in range(3):  # requests on one connection keep it open, each well within the deadline
        writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
    assert await closed_by_server(reader)  # then it idles past the deadline


async def test_a_trickled_body_gets_408(served, monkeypatch):
    env, server, port = served
    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.3)
    reader, writer = await raw_connect(port)
    writer.write(b"PUT /api/v1/vips/api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"addr")
    data = await asyncio.wait_for(reader.read(), 10)
    assert data.startswith(b"HTTP/1.1 408") and b"not received within" in data
    assert sorted(p.name for p in env.vip_dir.iterdir()) == ["main.yaml"]


async def test_guard_metrics(served):
    env, server, port = served
    status, body = await get_status(port)
    reader, writer = await raw_connect(port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), 10)).decode()
    assert "maglev_api_connection_limit 4" in text and "maglev_api_connections 1" in text


def test_connection_cap_is_a_fraction_of_the_file_limit():
    assert api_connection_cap(1024) == 128
    assert api_connection_cap(1 << 20) == 256
    assert api_connection_cap(40) == 8


def _limit_then(code: str, soft: int, hard: int) -> subprocess.CompletedProcess:
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=preexec)


def test_reserve_raises_soft_to_hard_and_refuses_a_tiny_limit():
    code = ("import resource\nfrom node.api_server import reserve_file_handles\n"
            "print(reserve_file_handles(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    r = _limit_then(code, 300, 4096)
    assert r.returncode == 0 and r.stdout.split() == ["4096", "4096"], r.stderr
    r = _limit_then(code, 200, 200)
    assert r.returncode == 1 and "open-file limit (RLIMIT_NOFILE) is 200" in r.stderr
    assert "ulimit -n" in r.stderr


def test_node_refuses_to_start_with_a_tiny_file_limit(tmp_path):
    r = _limit_then(f"import sys; from node.cli import main; "
                    f"sys.argv = ['maglev', 'node', '--config', '{REPO / 'configs/node.yaml'}']; sys.exit(main())",
                    200, 200)
    assert r.returncode == 2 and "RLIMIT_NOFILE) is 200" in r.stderr, r.stderr



async def test_accept_loop_survives_running_out_of_file_handles(served):
    """EMFILE on accept is counted, reported and retried; the API serves again once handles free."""
    import os

    env, server, port = served
    errors: list[str] = []
    server.on_error = errors.append
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients = []
    try:
        # Room for our client sockets only: the server's accept() finds no free handle.
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 2, hard))
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for _ in range(100):
            if server.guard.stats.accept_errors:
                break
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server.guard.stats.accept_errors >= 1 and "API accept failed" in errors[0]
    assert not server.task.done()
    status, _ = await get_status(port)
    assert status == 200


async def test_accept_loop_survives_an_error_that_is_not_an_os_error(served, monkeypatch):
    """The failure report itself must not end the loop (it read exc.strerror, which only an
    OSError has: the API would have stopped accepting for good)."""
    env, server, port = served
    errors: list[str] = []
    server.on_error = errors.append
    loop = asyncio.get_running_loop()
    real = loop.connect_accepted_socket
    failed = []

    async def fails_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug in the transport")
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "connect_accepted_socket", fails_once)
    client = socket.create_connection(("127.0.0.1", port))
    try:
        for _ in range(100):
            if server.guard.stats.accept_errors:
                break
            await asyncio.sleep(0.05)
    finally:
        client.close()
    assert errors and "RuntimeError('a bug in the transport')" in errors[0]
    assert not server.task.done()
    status, _ = await get_status(port)
    assert status == 200
