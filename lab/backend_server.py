"""The lab's backend: a tiny asyncio HTTP/1.1 server that says who it is.

It listens on the VIPs (port 80; the VIPs sit on `lo`, put there by `maglev backend setup`) so
it answers packets the forwarder encapsulated and the decap program unwrapped, and replies
straight to the client (DSR). Keep-alive matters: the lab's long-lived connections prove that a
flow stays on its backend when the router moves it to another node.

Paths: `/` -> "<name>\\n" (and an `X-Backend` header), `/healthz` -> "ok <name>" (also served on
the health port, on every address, so health checks need no VIP), `/bytes/N` -> N bytes (large
transfers exercise MTU and GRE overhead), `/stats` -> JSON request and connection counts.

Run: `python -m lab.backend_server --name backend-1 --vip 10.100.0.1 --vip fd00:100::1`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from dataclasses import dataclass

IP_FREEBIND = 15
MAX_HEADER = 16384
MAX_BYTES = 64 * 1024 * 1024


@dataclass
class Stats:
    requests: int = 0
    connections: int = 0
    open_connections: int = 0


class BackendServer:
    def __init__(self, name: str):
        self.name = name
        self.stats = Stats()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.open_connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.stats.open_connections -= 1
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed between requests: normal end of keep-alive
        if len(head) > MAX_HEADER:
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            await self._send(writer, 400, b"bad request line\n", close=True)
            return False
        method, path, version = parts
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)  # bodies are accepted and ignored
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        self.stats.requests += 1
        status, body, ctype = self.route(path)
        await self._send(writer, status, b"" if method == "HEAD" else body, close=close, ctype=ctype,
                         length=len(body))
        return not close

    def route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz":
            return 200, f"ok {self.name}\n".encode(), "text/plain"
        if path == "/stats":
            data = {"name": self.name, **self.stats.__dict__}
            return 200, (json.dumps(data) + "\n").encode(), "application/json"
        if path.startswith("/bytes/"):
            n = path.removeprefix("/bytes/")
            if not n.isdigit() or int(n) > MAX_BYTES:
                return 400, f"/bytes/N with N <= {MAX_BYTES}\n".encode(), "text/plain"
            return 200, b"x" * int(n), "application/octet-stream"
        return 200, f"{self.name}\n".encode(), "text/plain"

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, *, close: bool,
                    ctype: str = "text/plain", length: int | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request"}.get(status, "OK")
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"X-Backend: {self.name}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket; FREEBIND lets it bind a VIP before (or while) it is put on lo."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    if family == socket.AF_INET6:
        # '::' also takes IPv4 on the health port; a VIP address is one family anyway.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve(name: str, vips: list[str], port: int, health_port: int) -> None:
    server = BackendServer(name)
    servers = []
    for host in vips:
        servers.append(await asyncio.start_server(server.handle, sock=listen_socket(host, port)))
    servers.append(await asyncio.start_server(server.handle, sock=listen_socket("::", health_port)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = ", ".join(f"{h}:{port}" for h in vips)
    print(f"{name}: serving on {where}; health on *:{health_port}/healthz", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    print(f"{name}: stopped after {server.stats.requests} requests", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="answered to every request")
    p.add_argument("--vip", action="append", default=[], help="address to listen on (repeat)")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--health-port", type=int, default=8080)
    args = p.parse_args(argv)
    if not args.vip:
        p.error("give at least one --vip")
    try:
        asyncio.run(serve(args.name, args.vip, args.port, args.health_port))
    except OSError as exc:
        print(f"{args.name}: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
