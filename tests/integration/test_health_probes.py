"""Every probe type against real servers on loopback, and `maglev check` as a subprocess.

The servers run in a background thread with their own event loop, so the same servers answer the
in-process probes and the CLI subprocesses, and are started once per module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import TypeAdapter

from healthcheck import Target, probe
from healthcheck import dns
from node.config import HealthCheck

pytestmark = pytest.mark.integration

LOCAL = ipaddress.ip_address("127.0.0.1")
_checks = TypeAdapter(HealthCheck)
MAGLEV = [sys.executable, "-m", "node.cli"]


def target(backend_port: int | None, address: str = "127.0.0.1", **check: Any) -> Target:
    return Target(ipaddress.ip_address(address), backend_port, _checks.validate_python(check))


# --------------------------------------------------------------------------- servers


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text=f"all good host={request.host}")


async def _fail(request: web.Request) -> web.Response:
    return web.Response(status=503, text="draining")


async def _count(request: web.Request) -> web.Response:
    await asyncio.sleep(0.02)
    return web.Response(text="counted")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(1.0)
    return web.Response(text="late")


class DnsResponder(asyncio.DatagramProtocol):
    """ok.test has A and AAAA records; missing.test is NXDOMAIN; empty.test has no records."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        qid, _flags = struct.unpack_from("!HH", data)
        end = data.index(b"\0", 12) + 1
        name_wire, qtype = data[12:end], struct.unpack_from("!H", data, end)[0]
        question = data[12 : end + 4]
        rcode, answers = 0, b""
        if name_wire == dns.encode_name("missing.test"):
            rcode = 3
        elif name_wire == dns.encode_name("ok.test"):
            rdata = bytes([127, 0, 0, 1]) if qtype == 1 else ipaddress.ip_address("::1").packed
            answers = b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 30, len(rdata)) + rdata
        header = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
        self.transport.sendto(header + question + answers, addr)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(b"pong:" + data, addr)


class Servers:
    def __init__(self, certdir: Path) -> None:
        self.certdir = certdir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ok", _ok)
        app.router.add_get("/fail", _fail)
        app.router.add_get("/slow", _slow)
        app.router.add_get("/count", _count)  # answers in 20 ms
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        site6 = web.TCPSite(self.runner, "::1", 0)
        await site6.start()
        self.http6_port = site6._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.certdir / "cert.pem", self.certdir / "key.pem")
        tsite = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls)
        await tsite.start()
        self.https_port = tsite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        self.echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        self.udp_port = self.echo.get_extra_info("sockname")[1]
        self.dns, _ = await loop.create_datagram_endpoint(DnsResponder, local_addr=("127.0.0.1", 0))
        self.dns_port = self.dns.get_extra_info("sockname")[1]

    async def _stop(self) -> None:
        self.echo.close()
        self.dns.close()
        await self.runner.cleanup()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    certdir = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(certdir / "key.pem"), "-out", str(certdir / "cert.pem"),
         "-days", "1", "-subj", "/CN=backend.test",
         "-addext", "subjectAltName=DNS:backend.test,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    s = Servers(certdir)
    yield s
    s.close()


@pytest.fixture
def silent_udp_port():
    """A bound UDP socket that never answers: no ICMP error, just silence."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# --------------------------------------------------------------------------- http / https


async def test_http_200(servers: Servers):
    r = await probe(target(servers.http_port, type="http", path="/ok"))
    assert r.ok and r.reason == "HTTP 200"
    assert 0 < r.latency < 0.5


async def test_http_ipv6(servers: Servers):
    r = await probe(target(servers.http6_port, "::1", type="http", path="/ok", body="all good"))
    assert r.ok, r.reason


async def test_http_503(servers: Servers):
    r = await probe(target(servers.http_port, type="http", path="/fail"))
    assert not r.ok and r.reason == "HTTP 503"


async def test_http_expected_status_list(servers: Servers):
    r = await probe(target(servers.http_port, type="http", path="/fail", expect_status=["503"]))
    assert r.ok
    r = await probe(target(servers.http_port, type="http", path="/missing", expect_status=["200-299"]))
    assert not r.ok and r.reason == "HTTP 404"


async def test_http_body_substring_and_regex(servers: Servers):
    assert (await probe(target(servers.http_port, type="http", path="/ok", body="all good"))).ok
    r = await probe(target(servers.http_port, type="http", path="/ok", body="not there"))
    assert not r.ok and r.reason == "body did not match"
    assert (await probe(target(servers.http_port, type="http", path="/ok", body_regex=r"good\s+host"))).ok
    r = await probe(target(servers.http_port, type="http", path="/ok", body_regex=r"^bad"))
    assert not r.ok and r.reason == "body did not match"


async def test_http_host_header(servers: Servers):
    r = await probe(target(servers.http_port, type="http", path="/ok", host="www.example.test",
                           body="host=www.example.test"))
    assert r.ok, r.reason


async def test_http_slow_response_times_out(servers: Servers):
    started = time.monotonic()
    r = await probe(target(servers.http_port, type="http", path="/slow", timeout=0.2, interval=1))
    assert not r.ok and r.reason == "timeout after 0.2 s"
    assert 0.2 <= r.latency < 0.5 and time.monotonic() - started < 0.5


async def test_a_stall_of_the_checker_is_not_blamed_on_the_backend(servers: Servers):
    """The backend answers in 20 ms, but this process freezes for 0.3 s across the probe's
    0.1 s deadline: the late timeout is marked inconclusive, not a failure of the backend."""
    loop = asyncio.get_running_loop()
    loop.call_later(0.005, time.sleep, 0.3)  # block the event loop, as a starved CPU would
    r = await probe(target(servers.http_port, type="http", path="/count", timeout=0.1, interval=1))
    assert r.inconclusive and not r.ok
    assert r.reason.startswith("timeout after 0.1 s, but this checker was stalled 0.")
    assert r.reason.endswith("past the deadline: not counted")


async def test_a_real_timeout_counts(servers: Servers):
    r = await probe(target(servers.http_port, type="http", path="/count", timeout=0.01, interval=1))
    assert not r.ok and not r.inconclusive and r.reason == "timeout after 0.01 s"


async def test_http_connection_refused(closed_port: int):
    r = await probe(target(closed_port, type="http"))
    assert not r.ok and r.reason == "connection refused"


async def test_https_self_signed_fails_with_verification(servers: Servers):
    r = await probe(target(servers.https_port, type="https", path="/ok"))
    assert not r.ok
    assert r.reason.startswith("TLS certificate not trusted") and "self-signed" in r.reason


async def test_https_self_signed_passes_without_verification(servers: Servers):
    r = await probe(target(servers.https_port, type="https", path="/ok", tls_verify=False, body="all good"))
    assert r.ok, r.reason


async def test_http_opens_a_new_connection_per_probe(servers: Servers):
    """Two probes through one Prober must be two TCP connections (no keep-alive reuse)."""
    from healthcheck import Prober

    t = target(servers.http_port, type="http", path="/ok")
    before = _established_count(servers.http_port)
    async with Prober() as prober:
        for _ in range(3):
            assert (await prober.probe(t)).ok
        # With force_close every connection is gone as soon as its response is read.
        assert _established_count(servers.http_port) == before


def _established_count(port: int) -> int:
    return _socket_count("established", port)


def _socket_count(state: str, port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", state, f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


async def test_probes_leave_no_time_wait_sockets(servers: Servers):
    """Thousands of probes a second must not fill the kernel's TIME_WAIT table."""
    for _ in range(3):
        assert (await probe(target(servers.http_port, type="http", path="/ok"))).ok
        assert (await probe(target(servers.https_port, type="https", path="/ok", tls_verify=False))).ok
        assert (await probe(target(servers.http_port, type="tcp"))).ok
    assert _socket_count("time-wait", servers.http_port) == 0
    assert _socket_count("time-wait", servers.https_port) == 0


# --------------------------------------------------------------------------- tcp / udp / dns


async def test_tcp_open(servers: Servers):
    r = await probe(target(servers.http_port, type="tcp"))
    assert r.ok and r.reason == "connected"


async def test_tcp_closed(closed_port: int):
    r = await probe(target(closed_port, type="tcp"))
    assert not r.ok and r.reason == "connection refused"


async def test_check_port_overrides_target_port(servers: Servers, closed_port: int):
    assert (await probe(target(closed_port, type="tcp", port=servers.http_port))).ok


async def test_udp_echo(servers: Servers):
    r = await probe(target(servers.udp_port, type="udp", payload="hello", expect="pong:hello"))
    assert r.ok and r.reason == "reply of 10 bytes"
    r = await probe(target(servers.udp_port, type="udp", payload="hex:0001", expect="hex:706f6e673a0001"))
    assert r.ok, r.reason


async def test_udp_reply_mismatch(servers: Servers):
    r = await probe(target(servers.udp_port, type="udp", payload="hello", expect="other"))
    assert not r.ok and r.reason == "reply did not match"


async def test_udp_silence_times_out(silent_udp_port: int):
    r = await probe(target(silent_udp_port, type="udp", timeout=0.2, interval=1))
    assert not r.ok and r.reason == "timeout after 0.2 s"


async def test_udp_closed_port_is_refused_fast(closed_port: int):
    r = await probe(target(closed_port, type="udp", timeout=0.5, interval=1))
    assert not r.ok and r.reason == "port unreachable (ICMP)" and r.latency < 0.2


async def test_dns_answer(servers: Servers):
    r = await probe(target(servers.dns_port, type="dns", query_name="ok.test"))
    assert r.ok and r.reason == "DNS NOERROR, 1 answer(s)"
    assert (await probe(target(servers.dns_port, type="dns", query_name="ok.test", query_type="AAAA"))).ok


async def test_dns_failures(servers: Servers):
    r = await probe(target(servers.dns_port, type="dns", query_name="missing.test"))
    assert not r.ok and r.reason == "DNS NXDOMAIN"
    r = await probe(target(servers.dns_port, type="dns", query_name="empty.test"))
    assert not r.ok and r.reason == "DNS NOERROR but no A answer"


# --------------------------------------------------------------------------- exec


def _gone(pid: int, within: float = 1.0, zombie_ok: bool = False) -> bool:
    """True once no process has this pid. ``zombie_ok``: a dead process waiting for its parent
    (init, for an orphaned grandchild; reaping it is not ours to do) counts as gone."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if zombie_ok and stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


async def test_exec_exit_0_sees_the_backend_in_its_environment():
    r = await probe(target(8080, "127.0.0.9", type="exec",
                           command=["sh", "-c", 'echo "$MAGLEV_BACKEND_ADDRESS $MAGLEV_BACKEND_PORT"']))
    assert r.ok and r.reason == "exit 0: 127.0.0.9 8080"


async def test_exec_exit_1():
    r = await probe(target(80, type="exec", command=["sh", "-c", "echo backend overloaded; exit 1"]))
    assert not r.ok and r.reason == "exit 1: backend overloaded"


async def test_exec_no_shell_interpretation():
    # Without a shell, ';' and '$X' are plain arguments handed to echo.
    r = await probe(target(80, type="exec", command=["echo", "a;", "exit", "1", "$HOME"]))
    assert r.ok and r.reason == "exit 0: a; exit 1 $HOME"


async def test_exec_missing_command():
    r = await probe(target(80, type="exec", command=["/nonexistent/maglev-probe"]))
    assert not r.ok and r.reason == "command not found: /nonexistent/maglev-probe"


async def test_exec_hang_is_killed_with_its_children_and_reaped(tmp_path: Path):
    pids = tmp_path / "pids"
    script = f'sleep 30 & echo "$$ $!" > {pids}; wait'
    r = await probe(target(80, type="exec", command=["sh", "-c", script], timeout=0.3, interval=1))
    assert not r.ok and r.reason == "timeout after 0.3 s"
    shell, child = (int(p) for p in pids.read_text().split())
    assert _gone(shell), "the probe's process is still there (a zombie?)"
    assert _gone(child, zombie_ok=True), "the probe's child survived the timeout"


async def test_exec_leaves_nothing_running_after_a_normal_exit(tmp_path: Path):
    pids = tmp_path / "pids"
    script = f"sleep 30 >/dev/null 2>&1 & echo $! > {pids}; exit 0"
    r = await probe(target(80, type="exec", command=["sh", "-c", script]))
    assert r.ok and r.reason == "exit 0"
    assert _gone(int(pids.read_text()), zombie_ok=True), "a background child of the check survived"


# --------------------------------------------------------------------------- maglev check


def maglev_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAGLEV, "check", *args], capture_output=True, text=True, timeout=20)


def test_cli_healthy(servers: Servers):
    p = maglev_check("--type", "http", "--address", "127.0.0.1", "--port", str(servers.http_port),
                     "--path", "/ok", "--timeout", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"healthy: 127.0.0.1:{servers.http_port} (http /ok): HTTP 200 (")
    assert p.stdout.rstrip().endswith(" ms)")


def test_cli_unhealthy(servers: Servers):
    p = maglev_check("--type", "http", "--address", "127.0.0.1", "--port", str(servers.http_port),
                     "--path", "/fail")
    assert p.returncode == 1 and "unhealthy" in p.stdout and "HTTP 503" in p.stdout


def test_cli_every_type(servers: Servers, closed_port: int):
    ok = [
        ["--type", "tcp", "--port", str(servers.http_port)],
        ["--type", "https", "--port", str(servers.https_port), "--path", "/ok", "--no-tls-verify"],
        ["--type", "udp", "--port", str(servers.udp_port), "--payload", "x", "--expect", "pong:x"],
        ["--type", "dns", "--port", str(servers.dns_port), "--query-name", "ok.test", "--query-type", "AAAA"],
        ["--type", "exec", "--port", "80", "--", "sh", "-c", 'test "$MAGLEV_BACKEND_PORT" = 80'],
    ]
    for args in ok:
        p = maglev_check("--address", "127.0.0.1", *args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    p = maglev_check("--address", "127.0.0.1", "--type", "tcp", "--port", str(closed_port))
    assert p.returncode == 1 and "connection refused" in p.stdout
    p = maglev_check("--address", "127.0.0.1", "--type", "https", "--port", str(servers.https_port))
    assert p.returncode == 1 and "TLS certificate not trusted" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--type", "bogus", "--address", "127.0.0.1"], "invalid choice"),
        (["--type", "tcp", "--address", "not-an-ip", "--port", "80"], "not an IPv4 or IPv6 address"),
        (["--type", "tcp", "--address", "127.0.0.1", "--port", "80", "--path", "/x"], "--path does not apply"),
        (["--type", "tcp", "--address", "127.0.0.1"], "needs --port"),
        (["--type", "dns", "--address", "127.0.0.1"], "--query-name: Field required"),
        (["--type", "http", "--address", "127.0.0.1", "--path", "x"], "must start with '/'"),
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str], message: str):
    p = maglev_check(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr


async def test_a_probe_never_raises(closed_port: int):
    # aiohttp refuses this method before connecting; the probe must report it, not raise,
    # or the target's schedule would silently end.
    r = await probe(target(closed_port, type="http", method="BAD METHOD"))
    assert not r.ok and r.reason.startswith("probe error: ValueError: Method cannot contain")
